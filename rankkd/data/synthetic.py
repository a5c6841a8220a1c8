"""Random batches already on the device, for timing the training step without any input pipeline."""
from __future__ import annotations

from collections.abc import Iterator

import torch


class RepeatedBatchLoader:
    """The loader protocol (set_epoch, len = steps per pass, num_samples, backend "synthetic") over one batch made
    once, yielded `steps` times per pass: an epoch does no host work per step. The batch's tensors are shared between
    steps, so a training step must not modify them in place."""

    backend = "synthetic"

    def __init__(self, batch: tuple, *, batch_size: int, steps: int):
        self.batch = batch
        self._steps = steps
        self.num_samples = steps * batch_size

    def set_epoch(self, epoch: int) -> None:
        """Every epoch is the same; accepted so that all loaders share one protocol."""

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[tuple]:
        for _ in range(self._steps):
            yield self.batch


class SyntheticLoader(RepeatedBatchLoader):
    """Random device-resident (images, labels): images (batch, 3, image_size, image_size) from a standard normal,
    labels in [0, num_classes)."""

    def __init__(self, *, batch_size: int, image_size: int, num_classes: int, steps: int, device: torch.device,
                 channels_last: bool, seed: int):
        generator = torch.Generator(device=device).manual_seed(seed)
        images = torch.randn((batch_size, 3, image_size, image_size), generator=generator, device=device)
        images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        labels = torch.randint(num_classes, (batch_size,), generator=generator, device=device)
        super().__init__((images, labels), batch_size=batch_size, steps=steps)
