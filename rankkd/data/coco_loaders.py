"""COCO loaders: torchvision's (PIL decoding in worker processes), the choice between them and DALI's
(rankkd.data.coco_dali), and synthetic detection batches that time the step.

Loaders follow the trainers' loader protocol (set_epoch, len = steps per pass, num_samples, backend) and yield
(list of float CHW images in [0, 1] on the device, list of {"boxes": (N, 4) float xyxy, "labels": (N,) int64}) for
training, (images, image ids) for validation. Order and augmentation are functions of (seed, epoch, rank) only
(rankkd.data.sharding), whatever the number of workers; each sample's draws (shorter side, flip) come
from sample_augmentation, which the DALI loaders (rankkd.data.coco_dali) share, so both backends read a pass alike.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from rankkd.data import resolve_device, resolve_loader_backend
from rankkd.data.coco import (MAX_SIZE, TEST_SIZE, TRAIN_SIZES, CocoDataset, CocoSplit, drop_empty_boxes, flip_boxes,
                              pass_samples, resized_shape, sample_augmentation)
from rankkd.data.sharding import TrainShard, ValShard
from rankkd.data.synthetic import RepeatedBatchLoader
from rankkd.data.torchvision_loader import KeySampler, make_keyed_loader


class _CocoImages(Dataset):
    """Indexed by (position in the split, augmentation seed or None): the seed travels with the key, so workers
    started once still see each epoch's seeds, and a sample's augmentation does not depend on the worker."""

    def __init__(self, split: CocoSplit, sizes: tuple[int, ...], max_size: int, flip: bool):
        self._split, self._sizes, self._max_size, self._flip = split, tuple(sizes), max_size, flip

    def __len__(self) -> int:
        return len(self._split)

    def __getitem__(self, key):
        from PIL import Image

        index, seed = key
        with Image.open(self._split.files[index]) as image:
            image = image.convert("RGB")
        width, height = image.size
        shorter, flip = sample_augmentation(seed, self._sizes, self._flip)
        new_height, new_width = resized_shape(height, width, shorter, self._max_size)
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        # Clipped in the image's own pixels, then scaled: a box lying just outside an edge stays empty and is dropped
        # (scaled first, x = width could land a rounding error inside the image), as DALI's relative boxes do.
        boxes = np.clip(self._split.boxes[index], 0, [width, height, width, height])
        boxes = (boxes * np.array([new_width / width, new_height / height] * 2)).astype(np.float32)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = flip_boxes(boxes, new_width)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # uint8 CHW: 4x less to pass around
        boxes, labels = drop_empty_boxes(torch.from_numpy(boxes), torch.from_numpy(self._split.labels[index]))
        return pixels, boxes, labels, self._split.image_ids[index]


def _images_to_device(samples, device):
    return [pixels.to(device, non_blocking=True).float().div_(255) for pixels, *_ in samples]


class CocoTrainLoader(TrainShard):
    """One rank's training batches (module docstring); call set_epoch(epoch) before each pass."""

    backend = "torchvision"

    def __init__(self, split: CocoSplit, *, batch_size: int, rank: int, world_size: int, device: torch.device,
                 seed: int, num_workers: int, sizes: tuple[int, ...] = TRAIN_SIZES, max_size: int = MAX_SIZE,
                 flip: bool = True):
        super().__init__(len(split), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self._device = torch.device(device)
        self._keys = KeySampler([])
        self._batches = make_keyed_loader(_CocoImages(split, sizes, max_size, flip), self._keys,
                                          batch_size=batch_size, num_workers=num_workers, device=self._device,
                                          collate_fn=list)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        return self.batches_from(0)

    def batches_from(self, step: int) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        """The pass's batches from batch `step` on, exactly as a whole pass yields them (iteration-based schedules
        resume mid-pass)."""
        indices, seeds = pass_samples(self)
        start = step * self._batch_size
        self._keys.keys = list(zip(indices.tolist()[start:], seeds.tolist()[start:]))
        for samples in self._batches:
            targets = [{"boxes": boxes.to(self._device, non_blocking=True),
                        "labels": labels.to(self._device, non_blocking=True)} for _, boxes, labels, _ in samples]
            yield _images_to_device(samples, self._device), targets


class CocoValLoader(ValShard):
    """This rank's block of the val images, in image-id order; the last batch may be partial. Yields (images,
    image ids); evaluation maps boxes back to the original size given by the annotation file."""

    backend = "torchvision"

    def __init__(self, split: CocoSplit, *, batch_size: int, rank: int, world_size: int, device: torch.device,
                 num_workers: int, size: int = TEST_SIZE, max_size: int = MAX_SIZE):
        super().__init__(len(split), batch_size=batch_size, rank=rank, world_size=world_size)
        self._device = torch.device(device)
        self.image_ids = [split.image_ids[i] for i in self.indices.tolist()]
        self._batches = make_keyed_loader(_CocoImages(split, (size,), max_size, flip=False),
                                          KeySampler([(i, None) for i in self.indices.tolist()]),
                                          batch_size=batch_size, num_workers=num_workers, device=self._device,
                                          collate_fn=list)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[int]]]:
        for samples in self._batches:
            yield _images_to_device(samples, self._device), [image_id for *_, image_id in samples]


def make_coco_loaders(dataset: CocoDataset, *, batch_size: int, val_batch_size: int, rank: int, world_size: int,
                      device: torch.device, seed: int, num_workers: int, backend: str = "auto",
                      train_sizes: tuple[int, ...] = TRAIN_SIZES, test_size: int = TEST_SIZE,
                      max_size: int = MAX_SIZE):
    """The (train, val) loaders of one rank over a checked dataset (check_coco). backend: "dali" (GPU decoding on a
    CUDA device), "torchvision" (PIL in num_workers processes) or "auto" (DALI when installed). num_workers: the
    DataLoader's worker processes, or DALI's CPU threads (at least one)."""
    device = resolve_device(device)
    if resolve_loader_backend(backend) == "dali":
        from rankkd.data.coco_dali import DaliCocoTrainLoader, DaliCocoValLoader

        common = dict(rank=rank, world_size=world_size, device=device, decode_on_gpu=device.type == "cuda",
                      num_threads=max(1, num_workers), max_size=max_size)
        return (DaliCocoTrainLoader(dataset.train, dataset.category_ids, batch_size=batch_size, seed=seed,
                                    sizes=train_sizes, **common),
                DaliCocoValLoader(dataset.val, dataset.category_ids, batch_size=val_batch_size, size=test_size,
                                  **common))
    train = CocoTrainLoader(dataset.train, batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                            seed=seed, num_workers=num_workers, sizes=train_sizes, max_size=max_size)
    val = CocoValLoader(dataset.val, batch_size=val_batch_size, rank=rank, world_size=world_size, device=device,
                        num_workers=num_workers, size=test_size, max_size=max_size)
    return train, val


class SyntheticDetectionLoader(RepeatedBatchLoader):
    """Random device-resident images and boxes (rankkd.data.synthetic.RepeatedBatchLoader): for timing the training
    step without an input pipeline. Images in [0, 1], boxes_per_image boxes each, at least 8 px a side where the image
    allows, labels in [1, num_classes) (0 is the background)."""

    def __init__(self, *, batch_size: int, image_size: tuple[int, int], num_classes: int, steps: int,
                 device: torch.device, seed: int, boxes_per_image: int = 7):
        generator = torch.Generator().manual_seed(seed)
        height, width = image_size
        images = [torch.rand((3, height, width), generator=generator).to(device) for _ in range(batch_size)]
        targets = []
        for _ in range(batch_size):
            corners = torch.rand((boxes_per_image, 2, 2), generator=generator) * torch.tensor([width, height])
            low, high = corners.min(dim=1).values, corners.max(dim=1).values + 8  # at least 8 px a side
            boxes = torch.cat([low, torch.minimum(high, torch.tensor([width, height]))], dim=1)
            labels = torch.randint(1, num_classes, (boxes_per_image,), generator=generator)
            targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
        super().__init__((images, targets), batch_size=batch_size, steps=steps)
