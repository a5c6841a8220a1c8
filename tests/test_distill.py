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
import rankkd.distill
from rankkd import losses
from rankkd.distill import DistillConfig, Distiller, distill_losses
from rankkd.recipes import (CIFAR100_DKD_BETA, CIFAR100_PAIRS, LOSS_RECIPES, cifar100_recipe, cifar100_recipe_name,
                            get_recipe)


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


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_rank_precision_reaches_the_op(monkeypatch, precision):
    seen = []

    def recording_op(*args, **kwargs):
        seen.append(kwargs["precision"])
        return rankkd.kendall_rank_loss(*args, **kwargs)

    monkeypatch.setattr(rankkd.distill, "kendall_rank_loss", recording_op)
    student, teacher, target = batch()
    terms = distill_losses(student, teacher, target, get_recipe("imagenet-kd-rank", rank_precision=precision))
    assert seen == [precision]
    expected = 0.5 * rankkd.kendall_rank_loss(student, teacher, precision=precision)
    assert terms["rank"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_teacher_logits_are_detached():
    student, teacher, target = batch()
    teacher.requires_grad_(True)
    distill_losses(student, teacher, target, get_recipe("cifar100-kd-rank"))["total"].backward()
    assert teacher.grad is None


def test_dkd_warmup_ramps_linearly_and_accepts_a_tensor_epoch():
    student, teacher, target = batch()
    config = get_recipe("cifar100-dkd-res32x4_res8x4")  # β 8, warm-up over 20 epochs
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
        distill_losses(student, teacher, soft, get_recipe("cifar100-dkd-res32x4_res8x4"))


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


def sequence_batch(shape=(3, 5), classes=7):
    """(*shape, C) float64 logits, class targets, and a mask keeping some rows and dropping others; the dropped rows'
    targets are -100, as a language model's labels hold them."""
    student = (3 * torch.randn(*shape, classes, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(*shape, classes, dtype=torch.float64)
    mask = torch.rand(shape) < 0.6
    mask.view(-1)[:2] = torch.tensor([True, False])
    target = torch.randint(0, classes, shape).masked_fill(~mask, -100)
    return student, teacher, target, mask


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "dist"])
def test_leading_dims_are_rows_and_the_mask_leaves_rows_out(method):
    student, teacher, target, mask = sequence_batch()
    config = DistillConfig(method=method, ce_weight=0.7, kd_weight=1.3, temperature=2.0, dkd_beta=3.0,
                           rank_weight=0.3, rank_topk=5)
    terms = distill_losses(student, teacher, target, config, mask=mask)
    # The reference: the kept rows alone, as a (rows, C) batch.
    rows = student.detach()[mask].requires_grad_()
    expected = distill_losses(rows, teacher[mask], target[mask], config)
    assert set(terms) == set(expected)
    for name in expected:
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-12), name
    terms["total"].backward()
    expected["total"].backward()
    torch.testing.assert_close(student.grad[mask], rows.grad, rtol=1e-12, atol=0)
    assert torch.equal(student.grad[~mask], torch.zeros_like(student.grad[~mask]))
    # Without a mask every position is a row.
    unmasked = distill_losses(student, teacher, target.clamp(min=0), config)
    flat = distill_losses(student.reshape(-1, 7), teacher.reshape(-1, 7), target.clamp(min=0).reshape(-1), config)
    for name in flat:
        assert unmasked[name].item() == pytest.approx(flat[name].item(), rel=1e-12), name


def test_soft_targets_of_any_leading_shape():
    student, teacher, _, mask = sequence_batch()
    soft = torch.softmax(torch.randn(*mask.shape, 7, dtype=torch.float64), -1)
    config = get_recipe("imagenet-kd-rank")
    terms = distill_losses(student, teacher, soft, config, mask=mask)
    expected = distill_losses(student[mask], teacher[mask], soft[mask], config)
    for name in expected:
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-12), name


@pytest.mark.parametrize("method", ["ce", "dkd", "dist"])
def test_a_mask_keeping_no_row_gives_zero_terms(method):
    student, teacher, target, mask = sequence_batch()
    config = DistillConfig(method=method, rank_weight=0.5)
    terms = distill_losses(student, teacher, target, config, mask=torch.zeros_like(mask))
    assert set(terms) == {"ce", method, "rank", "total"}  # the same terms as any other batch
    assert all(value.dim() == 0 and value.item() == 0.0 for value in terms.values())
    terms["total"].backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_bad_mask_and_leading_shapes_are_named():
    student, teacher, target, mask = sequence_batch()
    config = get_recipe("imagenet-kd-rank")
    with pytest.raises(ValueError, match=r"mask must have .*\(3, 5\).* got \(3, 4\)"):
        distill_losses(student, teacher, target, config, mask=mask[:, :4])
    with pytest.raises(ValueError, match="mask must have"):
        distill_losses(student, teacher, target, config, mask=mask.reshape(-1))
    with pytest.raises(TypeError, match="mask must be a bool"):
        distill_losses(student, teacher, target, config, mask=mask.long())
    with pytest.raises(ValueError, match=r"target must have shape \(3, 5\)"):
        distill_losses(student, teacher, target.reshape(-1), config, mask=mask)
    with pytest.raises(ValueError, match="teacher shape"):  # the same rows, not merely as many
        distill_losses(student, teacher.reshape(-1, 7), target, config, mask=mask)
    with pytest.raises(ValueError, match="target holds class indices"):  # a dropped row's -100 is read without mask
        distill_losses(student, teacher, target, config)


# ---- config and recipes ----

def test_config_rejects_bad_values_by_name():
    for field, value in (("method", "mse"), ("temperature", 0.0), ("rank_weight", -1.0), ("ce_weight", math.nan),
                         ("rank_teacher_mode", "soft"), ("rank_topk", 1), ("rank_backend", "gpu"), ("rank_k", 0),
                         ("rank_precision", "approx")):
        with pytest.raises(ValueError, match=field):
            DistillConfig(**{field: value})
    with pytest.raises(ValueError, match="standardize"):
        DistillConfig(method="dist", standardize=True)


# Every base recipe, written from its source (see rankkd.recipes' docstring); fields not listed keep the defaults.
_DKD_CIFAR = dict(method="dkd", ce_weight=1.0, temperature=4.0, dkd_alpha=1.0, warmup_epochs=20.0)
_DKD_CIFAR_LS = dict(method="dkd", ce_weight=1.0, temperature=2.0, standardize=True, dkd_alpha=9.0,
                     warmup_epochs=20.0)
PUBLISHED = {
    # mdistiller configs/imagenet/{r34_r18,r50_mv1}/{kd,dkd}.yaml
    "imagenet-kd": dict(method="kd", ce_weight=0.5, kd_weight=0.5, temperature=1.0),
    "imagenet-dkd-r34-r18": dict(method="dkd", ce_weight=1.0, temperature=1.0, dkd_alpha=1.0, dkd_beta=0.5,
                                 warmup_epochs=1.0),
    "imagenet-dkd-r50-mv1": dict(method="dkd", ce_weight=1.0, temperature=1.0, dkd_alpha=1.0, dkd_beta=2.0,
                                 warmup_epochs=1.0),
    # DIST: CE 1 + 2 x DIST(beta 1, gamma 1, tau)
    "imagenet-dist": dict(method="dist", ce_weight=1.0, kd_weight=2.0, temperature=1.0, dist_beta=1.0,
                          dist_gamma=1.0),
    "cifar100-dist": dict(method="dist", ce_weight=1.0, kd_weight=2.0, temperature=4.0, dist_beta=1.0,
                          dist_gamma=1.0),
    # logit standardization: ImageNet CE 1, T 2, KD 6 (log r34_r18_kd_ours_2_6); CIFAR CE 1, KD 9, T 2
    "imagenet-kd-ls": dict(method="kd", ce_weight=1.0, kd_weight=6.0, temperature=2.0, standardize=True),
    "imagenet-dkd-ls-r34-r18": dict(method="dkd", ce_weight=1.0, temperature=2.0, standardize=True, dkd_alpha=9.0,
                                    dkd_beta=4.5, warmup_epochs=1.0),
    "imagenet-dkd-ls-r50-mv1": dict(method="dkd", ce_weight=1.0, temperature=2.0, standardize=True, dkd_alpha=9.0,
                                    dkd_beta=18.0, warmup_epochs=1.0),
    "cifar100-kd-ls": dict(method="kd", ce_weight=1.0, kd_weight=9.0, temperature=2.0, standardize=True),
    # mdistiller CFG.KD defaults
    "cifar100-kd": dict(method="kd", ce_weight=0.1, kd_weight=0.9, temperature=4.0),
    # mdistiller configs/cifar100/dkd/<pair>.yaml: DKD.BETA, 8.0 where the file sets none
    "cifar100-dkd-res56_res20": dict(_DKD_CIFAR, dkd_beta=2.0),
    "cifar100-dkd-res110_res32": dict(_DKD_CIFAR, dkd_beta=2.0),
    "cifar100-dkd-res32x4_res8x4": dict(_DKD_CIFAR, dkd_beta=8.0),
    "cifar100-dkd-wrn40_2_wrn_16_2": dict(_DKD_CIFAR, dkd_beta=6.0),
    "cifar100-dkd-wrn40_2_wrn_40_1": dict(_DKD_CIFAR, dkd_beta=6.0),
    "cifar100-dkd-vgg13_vgg8": dict(_DKD_CIFAR, dkd_beta=6.0),
    "cifar100-dkd-res32x4_shuv1": dict(_DKD_CIFAR, dkd_beta=8.0),
    "cifar100-dkd-res32x4_shuv2": dict(_DKD_CIFAR, dkd_beta=8.0),
    "cifar100-dkd-wrn40_2_shuv1": dict(_DKD_CIFAR, dkd_beta=8.0),
    "cifar100-dkd-vgg13_mv2": dict(_DKD_CIFAR, dkd_beta=6.0),
    "cifar100-dkd-res50_mv2": dict(_DKD_CIFAR, dkd_beta=8.0),
    # the same with α and β times 9 and T 2, standardized
    "cifar100-dkd-ls-res56_res20": dict(_DKD_CIFAR_LS, dkd_beta=18.0),
    "cifar100-dkd-ls-res110_res32": dict(_DKD_CIFAR_LS, dkd_beta=18.0),
    "cifar100-dkd-ls-res32x4_res8x4": dict(_DKD_CIFAR_LS, dkd_beta=72.0),
    "cifar100-dkd-ls-wrn40_2_wrn_16_2": dict(_DKD_CIFAR_LS, dkd_beta=54.0),
    "cifar100-dkd-ls-wrn40_2_wrn_40_1": dict(_DKD_CIFAR_LS, dkd_beta=54.0),
    "cifar100-dkd-ls-vgg13_vgg8": dict(_DKD_CIFAR_LS, dkd_beta=54.0),
    "cifar100-dkd-ls-res32x4_shuv1": dict(_DKD_CIFAR_LS, dkd_beta=72.0),
    "cifar100-dkd-ls-res32x4_shuv2": dict(_DKD_CIFAR_LS, dkd_beta=72.0),
    "cifar100-dkd-ls-wrn40_2_shuv1": dict(_DKD_CIFAR_LS, dkd_beta=72.0),
    "cifar100-dkd-ls-vgg13_mv2": dict(_DKD_CIFAR_LS, dkd_beta=54.0),
    "cifar100-dkd-ls-res50_mv2": dict(_DKD_CIFAR_LS, dkd_beta=72.0),
    # the ranking paper's DeiT setup
    "deit-kd": dict(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=1.0),
    # mdistiller detection/model/config.py KD.DKD (ALPHA 1, BETA 0.25, T 1), added at weight 1 in rcnn.py
    "coco-dkd": dict(method="dkd", ce_weight=1.0, kd_weight=1.0, temperature=1.0, dkd_alpha=1.0, dkd_beta=0.25),
    "coco-kd": dict(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=1.0),  # this project's choice
}


def test_every_recipe_holds_its_sources_numbers():
    base_names = {name for name in LOSS_RECIPES if not name.endswith("-rank")}
    assert base_names == set(PUBLISHED)
    for name, fields in PUBLISHED.items():
        assert LOSS_RECIPES[name] == DistillConfig(**fields), name


def test_rank_recipes_add_the_ranking_loss_at_gamma_equal_alpha():
    assert len(LOSS_RECIPES) == 2 * len(PUBLISHED)
    for name, fields in PUBLISHED.items():
        gamma = 0.5 if name == "deit-kd" else fields["ce_weight"]  # γ = α unless the paper says otherwise
        assert LOSS_RECIPES[f"{name}-rank"] == DistillConfig(**fields, rank_weight=gamma), name
        assert LOSS_RECIPES[name].rank_weight == 0, name


def test_cifar100_dkd_beta_per_pair():
    betas = {"res56_res20": 2.0, "res110_res32": 2.0, "res32x4_res8x4": 8.0, "wrn40_2_wrn_16_2": 6.0,
             "wrn40_2_wrn_40_1": 6.0, "vgg13_vgg8": 6.0, "res32x4_shuv1": 8.0, "res32x4_shuv2": 8.0,
             "wrn40_2_shuv1": 8.0, "vgg13_mv2": 6.0, "res50_mv2": 8.0}
    assert CIFAR100_DKD_BETA == betas and set(CIFAR100_PAIRS) == set(betas)
    for pair, beta in betas.items():
        assert cifar100_recipe(pair, "dkd").dkd_beta == beta
        assert cifar100_recipe(pair, "dkd", standardize=True).dkd_beta == 9 * beta


def test_cifar100_recipe_picks_by_pair_method_and_flags():
    assert cifar100_recipe_name("vgg13_vgg8", "dkd") == "cifar100-dkd-vgg13_vgg8"
    assert cifar100_recipe_name("vgg13_vgg8", "dkd", standardize=True, rank=True) == "cifar100-dkd-ls-vgg13_vgg8-rank"
    assert cifar100_recipe_name("res50_mv2", "kd", rank=True) == "cifar100-kd-rank"
    assert cifar100_recipe_name("res50_mv2", "kd", standardize=True) == "cifar100-kd-ls"
    assert cifar100_recipe_name("res56_res20", "dist") == "cifar100-dist"
    for pair in CIFAR100_PAIRS:
        for method in ("kd", "dkd", "dist"):
            for rank in (False, True):
                name = cifar100_recipe_name(pair, method, rank=rank)
                assert cifar100_recipe(pair, method, rank=rank) == LOSS_RECIPES[name]
    config = cifar100_recipe("res32x4_res8x4", "kd", rank=True, rank_k=5.0)
    assert (config.rank_k, config.rank_weight, LOSS_RECIPES["cifar100-kd-rank"].rank_k) == (5.0, 0.1, 1.0)
    with pytest.raises(ValueError, match="res32x4_res8x4"):  # the message lists the pairs
        cifar100_recipe("resnet32x4_resnet8x4", "kd")
    with pytest.raises(ValueError, match="method"):
        cifar100_recipe("res32x4_res8x4", "crd")
    with pytest.raises(ValueError, match="standardize"):
        cifar100_recipe("res32x4_res8x4", "dist", standardize=True)


def test_get_recipe_copies_overrides_and_explains_mistakes():
    config = get_recipe("imagenet-kd-rank", rank_k=2.0, standardize=True)
    assert (config.rank_k, config.standardize, config.ce_weight) == (2.0, True, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):  # a recipe can't be changed through the copy handed out
        config.ce_weight = 9.0
    assert LOSS_RECIPES["imagenet-kd-rank"].ce_weight == 0.5 and LOSS_RECIPES["imagenet-kd-rank"].rank_k == 1.0
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
    distiller = Distiller(student, teacher, get_recipe("cifar100-dkd-res32x4_res8x4-rank")).train()
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


def test_a_sequence_model_distills_every_kept_position():
    torch.manual_seed(3)
    student, teacher = nn.Linear(6, 7, dtype=torch.float64), nn.Linear(6, 7, dtype=torch.float64)
    _, _, target, mask = sequence_batch()
    inputs = torch.randn(*mask.shape, 6, dtype=torch.float64)
    config = get_recipe("cifar100-dkd-res32x4_res8x4-rank")
    logits, terms = Distiller(student, teacher, config)(inputs, target, epoch=4.0, mask=mask)
    assert logits.shape == (*mask.shape, 7)
    with torch.no_grad():
        expected = distill_losses(student(inputs)[mask], teacher(inputs)[mask], target[mask], config, epoch=4.0)
    for name in expected:
        assert terms[name].item() == pytest.approx(expected[name].item(), rel=1e-12), name


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
    distiller = Distiller(small_cnn(4), small_cnn(8), get_recipe("cifar100-dkd-res32x4_res8x4-rank")).train()
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
    config = get_recipe("cifar100-dkd-res32x4_res8x4-rank", standardize=True)
    compiled = torch.compile(lambda s, t, y, e: distill_losses(s, t, y, config, e)["total"], fullgraph=True)
    got = compiled(student, teacher, target, torch.tensor(3.0))
    (got_grad,) = torch.autograd.grad(got, student)
    expected = distill_losses(student, teacher, target, config, torch.tensor(3.0))["total"]
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-6)
