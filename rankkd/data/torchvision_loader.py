"""The fallback for machines without DALI: PIL decoding and torchvision transforms in DataLoader worker processes.

Same files, sharding, transforms (up to the resampling kernels' rounding) and output tensors as the DALI loaders.
Determinism: every training sample carries its own augmentation seed, drawn from (seed, epoch, rank) and its
position in the epoch, and its transform runs under that seed; so an epoch's batches do not depend on the number
of workers, on which worker took which batch, or on earlier epochs.

DeiT's augmentations here are torchvision's own (transforms.v2): RandAugment (its operation set, without magnitude
noise or timm's per-operation probability: see make_loaders) and RandomErasing with value "random".
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rankkd.data.dali import RANDOM_ERASING_RATIO, RANDOM_ERASING_SCALE
from rankkd.data.folder import BadImageError, SplitListing
from rankkd.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from rankkd.data.sharding import TrainShard, ValShard


class _ImageFiles(Dataset):
    """Indexed by (file index, augmentation seed or None); the seed travels with the key so that workers started
    once (persistent_workers) still see each epoch's seeds."""

    def __init__(self, listing: SplitListing, transform):
        self._listing = listing
        self._transform = transform

    def __len__(self) -> int:
        return len(self._listing)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, sample_seed = key
        path = self._listing.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as error:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise BadImageError.for_file(path, error) from error
        if sample_seed is None:
            return self._transform(image), self._listing.labels[index]
        # torchvision's random transforms draw from the global torch generator; fork it so the seeding stays local.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self._transform(image), self._listing.labels[index]


class KeySampler(Sampler):
    """Yields the keys set for the current pass, (sample index, augmentation seed or None) pairs: a train loader sets
    `keys` at the start of every pass, and the dataset reads each sample's seed from its key, so workers started once
    (persistent_workers) see every pass's seeds."""

    def __init__(self, keys: list[tuple[int, int | None]]):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def make_keyed_loader(dataset: Dataset, keys: KeySampler, *, batch_size: int, num_workers: int,
                      device: torch.device, collate_fn, drop_last: bool = False) -> DataLoader:
    """The DataLoader over `dataset` indexed by `keys` (KeySampler): batches decoded in num_workers worker processes
    kept across passes, pinned for a CUDA device."""
    # A generator of its own: without one, starting the workers would draw their base seed from the global generator,
    # shifting the training's random streams (dropout, drop-path) by where a resumed run first iterates. The samples
    # are seeded by their keys, so the workers' seeds do not matter.
    return DataLoader(dataset, batch_size=batch_size, sampler=keys, num_workers=num_workers, collate_fn=collate_fn,
                      drop_last=drop_last, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator())


def _collate(samples: list[tuple[torch.Tensor, int]], *, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = [image for image, _ in samples]
    if channels_last:
        # Stacking HWC views writes an NHWC buffer, which viewed as NCHW is channels_last: one copy, in the worker.
        batch = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    else:
        batch = torch.stack(images)
    return batch, torch.tensor([label for _, label in samples], dtype=torch.int64)


def _to_device(batches: DataLoader, device: torch.device, channels_last: bool
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for images, labels in batches:
            # .contiguous is a no-op unless pinning lost the channels_last strides.
            yield (images.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                   labels.to(device, non_blocking=True))
    except BadImageError as error:
        # Raised in a worker, it arrives with the worker's traceback in its message: keep the line naming the file.
        lines = [line for line in str(error).splitlines() if "cannot decode image file" in line]
        if not lines:
            raise
        raise BadImageError(lines[-1][lines[-1].index("cannot decode image file"):]) from None


def _normalize_transforms():
    from torchvision import transforms

    return [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


class TorchvisionTrainLoader(TrainShard):
    """One rank's training batches; call set_epoch(epoch) before iterating each epoch."""

    backend = "torchvision"

    def __init__(self, listing: SplitListing, *, batch_size: int, image_size: int, rank: int, world_size: int,
                 device: torch.device, seed: int, num_workers: int, channels_last: bool, min_scale: float,
                 hflip: bool, rand_augment_ops: int = 0, rand_augment_magnitude: float = 9.0,
                 random_erasing: float = 0.0, repeats: int = 1):
        from torchvision import transforms
        from torchvision.transforms import v2

        bilinear = transforms.InterpolationMode.BILINEAR
        augment = [transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3),
                                                interpolation=bilinear, antialias=True)]
        if hflip:
            augment.append(transforms.RandomHorizontalFlip())
        if rand_augment_ops:
            # 101 bins: bin b is b / 100 of each operation's range, timm's magnitude b / 10 on its 0..10 scale.
            # Uncovered pixels are filled with the mean colour, as timm does.
            augment.append(v2.RandAugment(num_ops=rand_augment_ops, magnitude=round(rand_augment_magnitude * 10),
                                          num_magnitude_bins=101, interpolation=bilinear,
                                          fill=[round(255 * m) for m in IMAGENET_MEAN]))
        erase = []
        if random_erasing:
            erase.append(v2.RandomErasing(p=random_erasing, scale=RANDOM_ERASING_SCALE, ratio=RANDOM_ERASING_RATIO,
                                          value="random"))
        super().__init__(len(listing), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                         repeats=repeats)
        self._device = device
        self._channels_last = channels_last
        self._keys = KeySampler([])
        transform = transforms.Compose(augment + _normalize_transforms() + erase)
        self._batches = make_keyed_loader(_ImageFiles(listing, transform), self._keys, batch_size=batch_size,
                                          num_workers=num_workers, device=device,
                                          collate_fn=partial(_collate, channels_last=channels_last), drop_last=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices()
        sample_seeds = np.random.default_rng(self.epoch_augmentation_seed()).integers(0, 2**63 - 1,
                                                                                      size=len(indices))
        self._keys.keys = list(zip(indices.tolist(), sample_seeds.tolist()))
        return _to_device(self._batches, self._device, self._channels_last)


class TorchvisionValLoader(ValShard):
    """This rank's block of the validation set, in sorted order; the last batch may be partial."""

    backend = "torchvision"

    def __init__(self, listing: SplitListing, *, batch_size: int, image_size: int, resize_shorter: int, rank: int,
                 world_size: int, device: torch.device, num_workers: int, channels_last: bool):
        from torchvision import transforms

        super().__init__(len(listing), batch_size=batch_size, rank=rank, world_size=world_size)
        resize = transforms.Resize(resize_shorter, interpolation=transforms.InterpolationMode.BILINEAR,
                                   antialias=True)
        transform = transforms.Compose([resize, transforms.CenterCrop(image_size)] + _normalize_transforms())
        self._device = device
        self._channels_last = channels_last
        self._batches = make_keyed_loader(_ImageFiles(listing, transform),
                                          KeySampler([(i, None) for i in self.indices.tolist()]),
                                          batch_size=batch_size, num_workers=num_workers, device=device,
                                          collate_fn=partial(_collate, channels_last=channels_last))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _to_device(self._batches, self._device, self._channels_last)
