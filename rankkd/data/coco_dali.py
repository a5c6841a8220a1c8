"""COCO on DALI: the detection batches of data.py's loaders, read by DALI's COCO reader and decoded on the GPU
("mixed" nvJPEG, the hardware JPEG decoder where there is one) or, without a GPU, on the CPU (device_id=None).

Each pass builds one pipeline whose fn.readers.coco reads this rank's images in the order the sharding gives (its
`images` list, reader-side shuffling off), so order and sharding are data.py's. The augmentation draws (shorter side,
flip) are data.py's sample_augmentation, made in Python per position of the pass and fed to the pipeline
(fn.external_source): DALI's own random numbers depend on where a pipeline started, and an iteration schedule
resumes mid-pass. So a sample is resized to the same shape and flipped alike on either backend; only the resampling
filter differs (DALI's antialiased linear against PIL's bilinear).

In the pipeline: decode, ratio-keeping resize (detectron2's shortest-edge rule, which DALI's resize_shorter with
max_size reproduces to the pixel), flip of image and boxes together, to float [0, 1] CHW, padded to the batch's largest
image. The boxes travel relative to the image ([0, 1], so resizing leaves them unchanged) and become pixels here,
clipped, with the ones clipped to nothing dropped; the category ids become the detector's labels by a lookup table.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from rankkd.data.coco import (MAX_SIZE, TEST_SIZE, TRAIN_SIZES, CocoSplit, drop_empty_boxes, pass_samples,
                                   sample_augmentation)
from rankkd.data.dali import READER_NAME, decoder_args, run_pipeline
from rankkd.data.sharding import TrainShard, ValShard

_TRAIN_OUTPUTS = ("images", "sizes", "boxes", "labels", "box_counts")
_VAL_OUTPUTS = ("images", "sizes", "image_ids")


def _per_sample(values: np.ndarray):
    """An external_source callable serving values[i] for the pass's sample i (the reader's padding of a last
    partial batch reads past the end and gets the last value, which the iterator trims away with its sample)."""
    return lambda info: values[min(info.idx_in_epoch, len(values) - 1)]


def _coco_graph(*, image_dir, annotation_file, images, shorter_sides, flips, category_ids, max_size, decode_on_gpu,
                with_targets):
    from nvidia.dali import fn, types

    encoded, boxes, categories, image_ids = fn.readers.coco(
        file_root=image_dir, annotations_file=annotation_file, images=images, ltrb=True, ratio=True,
        include_iscrowd=False, avoid_class_remapping=True, image_ids=True, pad_last_batch=True, name=READER_NAME)
    shorter = fn.external_source(source=_per_sample(shorter_sides), batch=False)
    flip = fn.external_source(source=_per_sample(flips), batch=False)
    pixels = fn.decoders.image(encoded, output_type=types.RGB, **decoder_args(decode_on_gpu))
    pixels = fn.resize(pixels, resize_shorter=shorter, max_size=float(max_size), interp_type=types.INTERP_LINEAR,
                       antialias=True)
    sizes = pixels.shape()
    pixels = fn.crop_mirror_normalize(pixels, dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3,
                                      std=[255.0] * 3, mirror=flip)
    outputs = [fn.pad(pixels, axis_names="HW"), sizes]
    if not with_targets:
        return (*outputs, image_ids)
    boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
    labels = fn.lookup_table(categories, keys=list(category_ids), values=list(range(1, len(category_ids) + 1)),
                             default_value=0, dtype=types.INT64)
    return (*outputs, fn.pad(boxes, axes=(0,)), fn.pad(labels, axes=(0,)), labels.shape())


def _image_views(batch) -> list[torch.Tensor]:
    """Each image of the padded batch, as a view of its own size."""
    return [batch["images"][i, :, :height, :width] for i, (height, width, _) in enumerate(batch["sizes"].tolist())]


def _read_pass(split: CocoSplit, category_ids: list[int], positions: list[int], shorter_sides, flips, *,
               with_targets: bool, batch_size: int, device: torch.device, decode_on_gpu: bool, num_threads: int,
               max_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pipeline reading the split's images at `positions`, in order, with the given draws per sample."""
    graph_args = dict(image_dir=str(split.image_dir), annotation_file=str(split.annotation_file),
                      images=[str(split.files[i].relative_to(split.image_dir)) for i in positions],
                      shorter_sides=np.asarray(shorter_sides, dtype=np.float32),
                      flips=np.asarray(flips, dtype=np.int32), category_ids=category_ids, max_size=max_size,
                      with_targets=with_targets)
    return run_pipeline(_coco_graph, graph_args, [str(split.files[i]) for i in positions],
                        _TRAIN_OUTPUTS if with_targets else _VAL_OUTPUTS, batch_size=batch_size,
                        num_threads=num_threads, device=device, decode_on_gpu=decode_on_gpu, seed=0)


class DaliCocoTrainLoader(TrainShard):
    """One rank's training batches on DALI, as coco_loaders.CocoTrainLoader's; call set_epoch(epoch) before each
    pass."""

    backend = "dali"

    def __init__(self, split: CocoSplit, category_ids: list[int], *, batch_size: int, rank: int, world_size: int,
                 device: torch.device, decode_on_gpu: bool, seed: int, num_threads: int,
                 sizes: tuple[int, ...] = TRAIN_SIZES, max_size: int = MAX_SIZE, flip: bool = True):
        super().__init__(len(split), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self._split, self._category_ids, self._sizes, self._flip = split, category_ids, tuple(sizes), flip
        self._device = torch.device(device)
        self._pipeline = dict(device=self._device, decode_on_gpu=decode_on_gpu, num_threads=num_threads,
                              max_size=max_size)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        return self.batches_from(0)

    def batches_from(self, step: int) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        """The pass's batches from batch `step` on, exactly as a whole pass yields them."""
        indices, seeds = pass_samples(self)
        start = step * self._batch_size
        draws = [sample_augmentation(int(seed), self._sizes, self._flip) for seed in seeds[start:]]
        batches = _read_pass(self._split, self._category_ids, indices[start:].tolist(),
                             [shorter for shorter, _ in draws], [flip for _, flip in draws], with_targets=True,
                             batch_size=self._batch_size, **self._pipeline)
        for batch in batches:
            images = _image_views(batch)
            targets = []
            for image, boxes, labels, count in zip(images, batch["boxes"], batch["labels"],
                                                   batch["box_counts"].reshape(-1).tolist()):
                height, width = image.shape[1:]
                pixels = boxes[:count].clamp(0, 1) * torch.tensor([width, height, width, height], dtype=boxes.dtype)
                pixels, labels = drop_empty_boxes(pixels, labels[:count])
                targets.append({"boxes": pixels.to(self._device, non_blocking=True),
                                "labels": labels.to(self._device, non_blocking=True)})
            yield [image.to(self._device, non_blocking=True) for image in images], targets


class DaliCocoValLoader(ValShard):
    """This rank's block of the val images on DALI, as coco_loaders.CocoValLoader's: yields (images, image ids)."""

    backend = "dali"

    def __init__(self, split: CocoSplit, category_ids: list[int], *, batch_size: int, rank: int, world_size: int,
                 device: torch.device, decode_on_gpu: bool, num_threads: int, size: int = TEST_SIZE,
                 max_size: int = MAX_SIZE):
        super().__init__(len(split), batch_size=batch_size, rank=rank, world_size=world_size)
        self._split, self._category_ids, self._size = split, category_ids, size
        self._device = torch.device(device)
        self._pipeline = dict(device=self._device, decode_on_gpu=decode_on_gpu, num_threads=num_threads,
                              max_size=max_size)
        self.image_ids = [split.image_ids[i] for i in self.indices.tolist()]

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[int]]]:
        # A fresh pipeline per pass, so that a pass abandoned early does not leave the next one starting mid-way.
        positions = self.indices.tolist()
        batches = _read_pass(self._split, self._category_ids, positions, [self._size] * len(positions),
                             [0] * len(positions), with_targets=False, batch_size=self._batch_size, **self._pipeline)
        for batch in batches:
            yield ([image.to(self._device, non_blocking=True) for image in _image_views(batch)],
                   batch["image_ids"].reshape(-1).tolist())
