"""Mixup / CutMix and label smoothing on the device-resident batch, with torchvision's transforms.v2.

DeiT trains with mixup alpha 0.8, cutmix alpha 1.0, one of the two per batch with probability 0.5 each, and label
smoothing 0.1 (through timm's Mixup). Here the mixing is torchvision's MixUp / CutMix under RandomChoice: the data
extra already depends on torchvision, it works for every batch size (timm's Mixup needs an even one), and the
same transforms serve every student, timm model or not. What timm's Mixup adds on top, label smoothing, is applied
to the mixed one-hot rows: (1 - eps) * mixed + eps / C, which equals timm's mixing of smoothed one-hot rows.

Per batch: one mode (mixup or cutmix) and one lambda, drawn on the host (no device sync); each image is mixed with
its neighbour in the batch (torchvision pairs image i with image i - 1; timm with image N - 1 - i). CutMix pastes
one box, the same for the whole batch, and weights the labels by the area it actually covers.

Randomness: torchvision draws from the global CPU generator; each call here runs under its own seed, drawn from
(seed, epoch, rank) and the call's position in the epoch, with the global CPU generator saved and restored around
it, so the mixing of an epoch is a function of (seed, epoch, rank) and nothing else touches it.
"""
from __future__ import annotations

import numpy as np
import torch


class BatchMixer:
    """(images (N, 3, H, W), labels int64 (N,)) -> (images, targets float32 (N, C) rows summing to 1), on the
    batch's device. Call set_epoch(epoch) before each epoch; build it with make_batch_mixer."""

    def __init__(self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                 label_smoothing: float, seed: int, rank: int):
        from torchvision.transforms import v2

        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if len(mixers) == 2:
            self._mix = v2.RandomChoice(mixers, p=[1 - switch_prob, switch_prob])
        else:
            self._mix = mixers[0] if mixers else None
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self._seed = seed
        self._rank = rank
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch must be >= 0, got {epoch}")
        self._call_seeds = np.random.default_rng([self._seed, epoch, self._rank, 0x6D6978])  # "mix"

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"BatchMixer: labels must be int64 of shape ({images.shape[0]},), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if self._mix is None:
            targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        else:
            memory_format = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(self._call_seeds.integers(2**63)))
                images, targets = self._mix(images, labels)
            images = images.contiguous(memory_format=memory_format)  # a no-op unless the mixing lost the layout
        if self.label_smoothing:
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets


def make_batch_mixer(num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                     switch_prob: float = 0.5, label_smoothing: float = 0.0, seed: int = 0,
                     rank: int = 0) -> BatchMixer | None:
    """The batch mixer for these settings, or None when mixup, cutmix and label smoothing are all off.

    DeiT: mixup_alpha 0.8, cutmix_alpha 1.0, switch_prob 0.5, label_smoothing 0.1. An alpha of 0 turns that mode
    off; with both on, switch_prob is the probability of cutmix for a batch. With both off and label_smoothing > 0
    the targets are the smoothed one-hot rows (1 - eps + eps / C on the label, eps / C elsewhere), so the soft-target
    cross-entropy on them is the label-smoothed cross-entropy. seed, rank: with the epoch (set_epoch), they
    determine every draw.
    """
    checks = [("num_classes", num_classes, num_classes >= 2, ">= 2"),
              ("mixup_alpha", mixup_alpha, mixup_alpha >= 0, ">= 0"),
              ("cutmix_alpha", cutmix_alpha, cutmix_alpha >= 0, ">= 0"),
              ("switch_prob", switch_prob, 0 <= switch_prob <= 1, "in [0, 1]"),
              ("label_smoothing", label_smoothing, 0 <= label_smoothing < 1, "in [0, 1)"),
              ("seed", seed, seed >= 0, ">= 0"), ("rank", rank, rank >= 0, ">= 0")]
    for name, value, ok, requirement in checks:
        if not ok:
            raise ValueError(f"make_batch_mixer: {name} must be {requirement}, got {value!r}")
    if mixup_alpha == 0 and cutmix_alpha == 0 and label_smoothing == 0:
        return None
    return BatchMixer(num_classes, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob,
                      label_smoothing=label_smoothing, seed=seed, rank=rank)
