"""The optimizer and the learning-rate schedules (rankkd.training.optim)."""
import bisect
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from rankkd.training.optim import learning_rate, make_optimizer

CPU = torch.device("cpu")


def reference_learning_rate(epoch, *, schedule, lr, epochs, warmup_epochs, warmup_lr, milestones, decay, min_lr):
    """The schedules as their recipes state them, written another way: the warm-up as an interpolation, the step
    schedule's drops counted by bisection, the cosine as cos^2 of half the angle."""
    if epoch < warmup_epochs:
        return float(np.interp(epoch, [0.0, warmup_epochs], [warmup_lr, lr]))
    if schedule == "step":
        return lr * decay ** bisect.bisect_right(sorted(milestones), epoch)
    fraction = min(1.0, (epoch - warmup_epochs) / (epochs - warmup_epochs))
    return min_lr + (lr - min_lr) * math.cos(math.pi * fraction / 2) ** 2


@pytest.mark.parametrize("schedule", ["step", "cosine"])
@pytest.mark.parametrize("warmup_epochs", [0.0, 2.5])
def test_learning_rate_follows_the_schedule_everywhere(schedule, warmup_epochs):
    rng = np.random.default_rng()
    epochs = int(rng.integers(20, 400))
    settings = dict(schedule=schedule, lr=float(rng.uniform(1e-4, 1.0)), epochs=epochs, warmup_epochs=warmup_epochs,
                    warmup_lr=float(rng.uniform(0, 1e-4)), decay=float(rng.uniform(0.05, 0.5)),
                    milestones=tuple(sorted(rng.choice(np.arange(warmup_epochs + 1, epochs), 3, replace=False)
                                            .tolist())) + (epochs - 0.5,),  # a fractional one too (COCO's)
                    min_lr=float(rng.uniform(0, 1e-5)))
    # Random fractional epochs (step / steps per epoch), and each boundary with its neighbours on either side.
    boundaries = [0.0, warmup_epochs, epochs, *settings["milestones"]]
    points = [*rng.uniform(0, epochs, 200), *(b + d for b in boundaries for d in (-1e-6, 0.0, 1e-6) if b + d >= 0)]
    for epoch in points:
        assert learning_rate(epoch, **settings) == pytest.approx(reference_learning_rate(epoch, **settings),
                                                                 rel=1e-12, abs=1e-15), (epoch, settings)


def test_learning_rate_at_the_boundaries():
    cosine = dict(schedule="cosine", lr=0.4, epochs=30, warmup_epochs=5, warmup_lr=0.01, min_lr=0.002)
    assert learning_rate(0, **cosine) == 0.01  # the warm-up starts at warmup_lr
    assert learning_rate(5, **cosine) == pytest.approx(0.4)  # and reaches the peak where the cosine starts
    assert learning_rate(30, **cosine) == pytest.approx(0.002)  # the last epoch's end is min_lr
    assert learning_rate(45, **cosine) == pytest.approx(0.002)  # and it stays there past the end
    after_warmup = [learning_rate(e, **cosine) for e in np.linspace(5, 30, 101)]
    assert all(np.diff(after_warmup) < 0)
    step = dict(schedule="step", lr=0.1, epochs=90, milestones=(30, 60), decay=0.1)
    assert learning_rate(0, **step) == 0.1  # no warm-up: the peak from the first step
    assert learning_rate(30 - 1e-9, **step) == 0.1 and learning_rate(30, **step) == pytest.approx(0.01)
    assert learning_rate(60, **step) == pytest.approx(0.001) and learning_rate(89.9, **step) == pytest.approx(0.001)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be 'step' or 'cosine', got 'linear'"):
        learning_rate(3.0, schedule="linear", lr=0.1, epochs=10)


@dataclasses.dataclass(frozen=True)
class Optim:
    """The fields of the optim settings that make_optimizer reads."""
    optimizer: str = "sgd"
    scaled_lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.05
    decay_norm_and_bias: bool = False


class TinyViT(nn.Module):
    """A convolution, norms, biases and DeiT's named embeddings (3-D, yet kept out of weight decay by name)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8))
        self.norm = nn.LayerNorm(8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 8, bias=False))
        self.head = nn.Linear(8, 7)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4, 3)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


# Weights of convolutions and linear layers; not norms, biases or the ViT's named embeddings.
TINY_VIT_DECAYED = {"patch.weight", "block.0.weight", "block.2.weight", "head.weight"}


@pytest.mark.parametrize(("model_type", "decayed"), [
    (TinyViT, TINY_VIT_DECAYED),
    (TinyCNN, {"body.0.weight", "body.2.weight", "head.weight"}),
])
def test_weight_decay_spares_norms_biases_and_named_embeddings(model_type, decayed):
    model = model_type()
    decay, no_decay = make_optimizer(model, Optim(), CPU).param_groups
    assert (_names(model, decay), decay["weight_decay"]) == (decayed, 0.05)
    assert (_names(model, no_decay), no_decay["weight_decay"]) == ({n for n, _ in model.named_parameters()} - decayed,
                                                                   0.0)
    # decay_norm_and_bias: one group, every parameter decayed.
    (group,) = make_optimizer(model, Optim(decay_norm_and_bias=True), CPU).param_groups
    assert _names(model, group) == {n for n, _ in model.named_parameters()} and group["weight_decay"] == 0.05


def test_no_empty_group():
    norms_only = nn.Sequential(nn.LayerNorm(6), nn.BatchNorm1d(6))
    (group,) = make_optimizer(norms_only, Optim(), CPU).param_groups
    assert len(group["params"]) == 4 and group["weight_decay"] == 0.0


@pytest.mark.parametrize(("kind", "nesterov"), [("sgd", False), ("sgd", True), ("adamw", False)])
def test_one_step_decays_exactly_the_decayed_parameters(kind, nesterov):
    """With zero gradients a step is weight decay alone: the decayed tensors shrink by lr * weight_decay (AdamW's
    decoupled decay; SGD's L2 term through the momentum buffer, times 1 + momentum with Nesterov), the others stay
    put."""
    model = TinyViT()
    optimizer = make_optimizer(model, Optim(optimizer=kind, nesterov=nesterov, scaled_lr=0.3, momentum=0.8,
                                            weight_decay=0.1), CPU)
    assert type(optimizer) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[kind]
    assert all(group["lr"] == 0.3 for group in optimizer.param_groups)
    if kind == "sgd":
        assert all(g["momentum"] == 0.8 and g["nesterov"] == nesterov for g in optimizer.param_groups)
    shrink = 1 - 0.3 * 0.1 * (1 + 0.8 if nesterov else 1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * shrink if name in TINY_VIT_DECAYED else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)
