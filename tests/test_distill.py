"""rankkd.distill: the config, the recipes, distill_losses' wiring and weighting, and the Distiller's guarantees
(frozen teacher, torch.compile without graph breaks or per-epoch recompiles, bf16 autocast, channels_last)."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from torch import nn

import rankkd
from rankkd import losses
from rankkd.distill import RECIPES, DistillConfig, Distiller, distill_losses, get_recipe


def small_cnn(width, classes=10):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))


def batch(size=6, classes=10, dtype=torch.float64):
    return ((3 * torch.randn(size, classes, dtype=dtype)).requires_grad_(), 3 * torch.randn(size, classes, dtype=dtype),
            torch.randint(0, classes, (size,)))


def cross_entropy_numpy(student, target):
    z = student.detach().numpy()
    log_p = z - z.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    return -np.mean(log_p[np.arange(len(z)), target.numpy()])


# ---- distill_losses ----

@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "dist"])
@pytest.mark.parametrize("rank_weight", [0.0, 0.3])
def test_terms_are_weighted_and_sum_to_total(method, rank_weight):
    student, teacher, target = batch()
    config = DistillConfig(method=method, ce_weight=0.7, kd_weight=1.3, temperature=2.0, dkd_alpha=0.5, dkd_beta=3.0,
                           dist_beta=2.0, dist_gamma=0.5, rank_weight=rank_weight, rank_k=2.0, rank_topk=5)
    terms = distill_losses(student, teacher, target, config)
    expected = {"ce": 0.7 * cross_entropy_numpy(student, target)}
    if method == "kd":
        expected["kd"] = 1.3 * losses.kd_loss(student, teacher, temperature=2.0).item()
    if method == "dkd":
        expected["dkd"] = 1.3 * losses.dkd_loss(student, teacher, target, alpha=0.5, beta=3.0, temperature=2.0).item()
    if method == "dist":
        expected["dist"] = 1.3 * losses.dist_loss(student, teacher, beta=2.0, gamma=0.5, temperature=2.0).item()
    if rank_weight:
        expected["rank"] = 0.3 * rankkd.kendall_rank_loss(student, teacher, k=2.0, topk=5).item()
    expected["total"] = sum(expected.values())
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-10), name
    terms["total"].backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_teacher_logits_are_detached():
    student, teacher, target = batch()
    teacher.requires_grad_(True)
    distill_losses(student, teacher, target, get_recipe("cifar100-kd-rank"))["total"].backward()
    assert teacher.grad is None


def test_dkd_warmup_ramps_linearly_and_accepts_a_tensor_epoch():
    student, teacher, target = batch()
    config = get_recipe("cifar100-dkd")  # warm-up over 20 epochs
    full = losses.dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0).item()
    for epoch, factor in ((0.0, 0.0), (5.0, 0.25), (19.0, 0.95), (20.0, 1.0), (60.0, 1.0)):
        for given in (epoch, torch.tensor(epoch)):
            term = distill_losses(student, teacher, target, config, epoch=given)["dkd"]
            assert term.item() == pytest.approx(factor * full, rel=1e-6), (epoch, type(given))
    no_warmup = dataclasses.replace(config, warmup_epochs=0.0)
    assert distill_losses(student, teacher, target, no_warmup, epoch=0.0)["dkd"].item() == pytest.approx(full)


def test_soft_targets_feed_ce_except_for_dkd():
    student, teacher, _ = batch()
    soft = torch.softmax(torch.randn(6, 10, dtype=torch.float64), -1)
    terms = distill_losses(student, teacher, soft, get_recipe("imagenet-kd-rank"))
    log_p = torch.log_softmax(student.detach(), -1)
    assert terms["ce"].item() == pytest.approx(0.5 * -(soft * log_p).sum(-1).mean().item(), rel=1e-10)
    with pytest.raises(TypeError, match="target"):
        distill_losses(student, teacher, soft, get_recipe("cifar100-dkd"))


def test_bad_input_names_the_argument():
    student, teacher, target = batch()
    config = get_recipe("imagenet-kd")
    with pytest.raises(ValueError, match="classes"):
        distill_losses(student, teacher[:, :9], target, config)
    with pytest.raises(TypeError, match="student_logits"):
        distill_losses(student.long(), teacher, target, config)
    with pytest.raises(ValueError, match="student_logits"):
        distill_losses(student[0], teacher, target, config)
    with pytest.raises(ValueError, match="target.*shape"):
        distill_losses(student, teacher, target[:4], config)
    with pytest.raises(ValueError, match="target"):
        distill_losses(student, teacher, target + 10, config)
    with pytest.raises(ValueError, match="teacher_logits"):
        distill_losses(student, None, target, config)
    assert set(distill_losses(student, None, target, DistillConfig(method="ce"))) == {"ce", "total"}


# ---- config and recipes ----

def test_config_rejects_bad_values_by_name():
    for field, value in (("method", "mse"), ("temperature", 0.0), ("rank_weight", -1.0), ("ce_weight", math.nan),
                         ("rank_teacher_mode", "soft"), ("rank_topk", 1), ("rank_backend", "gpu"), ("rank_k", 0)):
        with pytest.raises(ValueError, match=field):
            DistillConfig(**{field: value})
    with pytest.raises(ValueError, match="standardize"):
        DistillConfig(method="dist", standardize=True)


def test_recipes_hold_the_published_numbers():
    def weights(name):
        c = RECIPES[name]
        return (c.method, c.ce_weight, c.kd_weight, c.temperature, c.dkd_alpha, c.dkd_beta, c.warmup_epochs)

    assert weights("imagenet-kd")[:4] == ("kd", 0.5, 0.5, 1.0)
    assert weights("imagenet-dkd-r34-r18") == ("dkd", 1.0, 1.0, 1.0, 1.0, 0.5, 1.0)
    assert weights("imagenet-dkd-r50-mv1") == ("dkd", 1.0, 1.0, 1.0, 1.0, 2.0, 1.0)
    assert weights("cifar100-kd")[:4] == ("kd", 0.1, 0.9, 4.0)
    assert weights("cifar100-dkd") == ("dkd", 1.0, 1.0, 4.0, 1.0, 8.0, 20.0)
    assert weights("deit-kd")[:3] == ("kd", 1.0, 1.0)
    for name, config in RECIPES.items():
        if name.endswith("-rank"):
            base = RECIPES[name.removesuffix("-rank")]
            gamma = 0.5 if name == "deit-kd-rank" else base.ce_weight  # γ = α unless the paper says otherwise
            assert config == dataclasses.replace(base, rank_weight=gamma), name
        else:
            assert config.rank_weight == 0 and f"{name}-rank" in RECIPES


def test_get_recipe_copies_overrides_and_explains_mistakes():
    config = get_recipe("imagenet-kd-rank", rank_k=2.0, standardize=True)
    assert (config.rank_k, config.standardize, config.ce_weight) == (2.0, True, 0.5)
    config.ce_weight = 9.0
    assert RECIPES["imagenet-kd-rank"].ce_weight == 0.5 and RECIPES["imagenet-kd-rank"].rank_k == 1.0
    with pytest.raises(ValueError, match="imagenet-kd-rank"):  # the message lists the known names
        get_recipe("imagenet-kd-ranking")
    with pytest.raises(ValueError, match="rank_weight"):  # ... and the fields
        get_recipe("imagenet-kd", rank_wieght=1.0)
    with pytest.raises(ValueError, match="temperature"):
        get_recipe("imagenet-kd", temperature=-1.0)


# ---- Distiller ----

def test_teacher_stays_frozen_through_training_steps():
    torch.manual_seed(0)
    student, teacher = small_cnn(4), small_cnn(8)
    teacher_before = copy.deepcopy(teacher.state_dict())
    distiller = Distiller(student, teacher, get_recipe("cifar100-dkd-rank")).train()
    assert distiller.student.training and not distiller.teacher.training
    # Even an optimizer over everything, with weight decay, must leave the teacher alone.
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    student_before = copy.deepcopy(student.state_dict())
    images, target = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for epoch in range(2):
        _, terms = distiller(images, target, epoch=float(epoch + 1))
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(value, teacher_before[name]) for name, value in teacher.state_dict().items())
    assert not torch.equal(student.state_dict()["0.weight"], student_before["0.weight"])
    distiller.eval().train()
    assert not distiller.teacher.training


def test_forward_runs_the_teacher_in_eval_under_no_grad():
    student, teacher = small_cnn(4), small_cnn(8)
    seen = {}
    teacher.register_forward_hook(lambda module, args, out: seen.update(grad=torch.is_grad_enabled(),
                                                                         training=module.training))
    distiller = Distiller(student, teacher, get_recipe("imagenet-kd-rank")).train()
    images, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    student_logits, terms = distiller(images, target)
    assert seen == {"grad": False, "training": False}
    assert student_logits.shape == (4, 10) and set(terms) == {"ce", "kd", "rank", "total"}
    with torch.no_grad():
        expected = distill_losses(student_logits, teacher(images), target, distiller.config)
    for name in terms:
        torch.testing.assert_close(terms[name], expected[name])


def test_plain_ce_skips_the_teacher():
    student = small_cnn(4)
    images, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    _, terms = Distiller(student, None, DistillConfig(method="ce"))(images, target)
    assert set(terms) == {"ce", "total"}
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, None, DistillConfig(method="ce", rank_weight=1.0))  # CE + ranking needs the teacher


def test_channels_last_and_bf16_autocast_match_float32():
    torch.manual_seed(1)
    distiller = Distiller(small_cnn(4), small_cnn(8), get_recipe("imagenet-dkd-r34-r18-rank")).eval()
    images, target = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    _, reference = distiller(images, target, epoch=0.5)
    distiller.to(memory_format=torch.channels_last)
    _, channels_last = distiller(images.to(memory_format=torch.channels_last), target, epoch=0.5)
    for name in reference:
        torch.testing.assert_close(channels_last[name], reference[name], rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, low = distiller(images.to(memory_format=torch.channels_last), target, epoch=0.5)
    assert logits.dtype == torch.bfloat16
    for name in reference:
        assert low[name].dtype == torch.float32
        torch.testing.assert_close(low[name], reference[name], rtol=0.05, atol=0.02)
    low["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in distiller.student.parameters())


def test_compiled_training_step_has_no_graph_break_and_no_recompile_per_epoch():
    torch._dynamo.reset()
    torch.manual_seed(2)
    distiller = Distiller(small_cnn(4), small_cnn(8), get_recipe("cifar100-dkd-rank")).train()
    images, target = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def losses_of(images, target, epoch):
        return distiller(images, target, epoch)[1]

    compiled = torch.compile(losses_of, backend=counter, fullgraph=True)  # fullgraph: any graph break raises
    for epoch in (0.0, 0.5, 7.25, 30.0):
        distiller.eval()  # dropout off, so eager and compiled see the same network
        terms = compiled(images, target, torch.tensor(epoch))
        expected = losses_of(images, target, torch.tensor(epoch))
        for name in expected:
            torch.testing.assert_close(terms[name], expected[name], rtol=1e-5, atol=1e-6)
    terms["total"].backward()
    assert counter.frame_count == 1  # one compile for all epochs


def test_distill_losses_compile_with_inductor():
    # The default backend generates its own kernels for the losses (the ranking op stays the fused one).
    torch._dynamo.reset()
    student, teacher, target = batch(dtype=torch.float32)
    config = get_recipe("cifar100-dkd-rank", standardize=True)
    compiled = torch.compile(lambda s, t, y, e: distill_losses(s, t, y, config, e)["total"], fullgraph=True)
    got = compiled(student, teacher, target, torch.tensor(3.0))
    (got_grad,) = torch.autograd.grad(got, student)
    expected = distill_losses(student, teacher, target, config, torch.tensor(3.0))["total"]
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
