"""Random batches already on the device, for timing the training step without any input pipeline."""
from __future__ import annotations

from collections.abc import Iterator

import torch


class SyntheticLoader:
    """Yields the same device-resident (images, labels) batch `steps` times per epoch.

    The batch is generated once, so an epoch does no host work per step; the tensors are shared between steps, so
    a training step must not modify them in place.
    """

    backend = "synthetic"

    def __init__(self, *, batch_size: int, image_size: int, num_classes: int, steps: int, device: torch.device,
                 channels_last: bool, seed: int):
        generator = torch.Generator(device=device).manual_seed(seed)
        images = torch.randn((batch_size, 3, image_size, image_size), generator=generator, device=device)
        self.images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self.labels = torch.randint(num_classes, (batch_size,), generator=generator, device=device)
        self._steps = steps
        self.num_samples = steps * batch_size

    def set_epoch(self, epoch: int) -> None:
        """Every epoch is the same; accepted so that all loaders share one protocol."""

    def __len__(self) -> int:
        return self._steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self._steps):
            yield self.images, self.labels
