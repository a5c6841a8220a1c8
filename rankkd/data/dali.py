"""DALI loaders: decoding and augmentation on the GPU ("mixed" nvJPEG decoding, with the hardware JPEG decoder where
the GPU has one), or a CPU-only pipeline (device_id=None) where there is no GPU.

DALI is imported only when a pipeline is built, so importing rankkd.data works without it.

Each train epoch builds a fresh pipeline over this rank's slice of that epoch's global permutation (see
sharding.py), fed as an explicit file list to fn.readers.file with its own shuffling off, and seeded from
(seed, epoch, rank). The order and the augmentation of an epoch are then a function of (seed, epoch, rank) alone
(DALI draws per-sample random numbers, so not of num_threads either), so a run resumed at epoch e reads exactly
what an uninterrupted run reads there. DALI's reader-side shuffling
(random_shuffle, shuffle_after_epoch) would tie an epoch's order to the reader's history instead. Building costs
milliseconds for small sets and 1-2 s for an ImageNet-sized list of 1.28M files (measured on 2 CPU cores), once per
epoch.

DeiT's training augmentations, both optional and run per sample inside the train pipeline (on the GPU when it
decodes there), from DALI's per-sample random numbers, so they too depend on (seed, epoch, rank) alone:

- RandAugment as timm's "rand-m9-mstd0.5-inc1" (what DeiT trains with), built from DALI's automatic-augmentation
  operations (nvidia.dali.auto_aug): each image gets `num_ops` layers; a layer picks one of timm's 15 "increasing"
  operations uniformly, applies it with probability 0.5, at a magnitude drawn per image and layer from
  N(magnitude, magnitude_std) clipped to timm's 0..10 scale, with a random sign for the signed operations. The
  operations and their ranges at magnitude 10 are timm's: auto-contrast, equalize, invert, rotate 30 degrees,
  posterize to 4..0 bits, solarize at threshold 256..0, solarize-add of 0..110, colour / contrast / brightness /
  sharpness factors 1 +- 0.9, shear 0.3, translate 0.45 of the image side. Runs on the resized uint8 crop, before
  the flip (which commutes with it in distribution: every geometric operation's sign is random).
- Random erasing as timm's RandomErasing(mode="pixel") and torchvision's RandomErasing(value="random"): with
  probability p per image, one rectangle of 2%..1/3 of the image area and aspect ratio 0.3..1/0.3 (log-uniform) at a
  uniformly random position is replaced by N(0, 1) noise per pixel and channel, on the normalized image.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch

from rankkd.data.folder import SplitListing, find_undecodable
from rankkd.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from rankkd.data.sharding import TrainShard, ValShard


READER_NAME = "files"
# Batches DALI works ahead of the consumer (the pipeline's prefetch_queue_depth); also the span of batches that may
# hold a file that failed to decode.
PREFETCH_DEPTH = 2
# nvJPEG preallocation for ImageNet-sized JPEGs (as in NVIDIA's ResNet-50 recipe): one buffer per thread big enough
# for the largest ImageNet image, so decoding never reallocates mid-epoch, and the hardware decoder sized for the
# largest image dimensions in the ImageNet train set.
_DEVICE_MEMORY_PADDING = 211_025_920
_HOST_MEMORY_PADDING = 140_544_512
_HW_DECODER_WIDTH_HINT = 5980
_HW_DECODER_HEIGHT_HINT = 6430
# Share of the JPEGs sent to the hardware decoder (A100, H100 and later have one; elsewhere it is ignored); the rest
# go through nvJPEG's CUDA path so that both work at once. 0.65 is DALI's own measured default, stated here because
# it is a tuning knob of this pipeline.
_HW_DECODER_LOAD = 0.65

# RandAugment magnitudes are on timm's scale, 0..10, resolved to 0.1: DALI maps a magnitude bin b of
# _MAGNITUDE_BINS to the fraction b / (_MAGNITUDE_BINS - 1) of each operation's range, as timm maps magnitude m to
# m / 10.
RAND_AUGMENT_MAX_MAGNITUDE = 10
_MAGNITUDE_BINS_PER_UNIT = 10
_MAGNITUDE_BINS = RAND_AUGMENT_MAX_MAGNITUDE * _MAGNITUDE_BINS_PER_UNIT + 1
_RAND_AUGMENT_OP_PROBABILITY = 0.5  # timm's RandAugment applies each chosen operation with probability 0.5
# What the geometric operations fill uncovered pixels with: DALI takes one value for all channels; timm fills with
# the ImageNet mean, (124, 116, 104).
_RAND_AUGMENT_FILL = 128
# Random erasing's rectangle: area as a fraction of the image, and aspect ratio (timm's and torchvision's defaults).
RANDOM_ERASING_SCALE = (0.02, 1 / 3)
RANDOM_ERASING_RATIO = (0.3, 1 / 0.3)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def decoder_args(decode_on_gpu: bool) -> dict:
    if not decode_on_gpu:
        return {"device": "cpu"}
    return {"device": "mixed", "device_memory_padding": _DEVICE_MEMORY_PADDING,
            "host_memory_padding": _HOST_MEMORY_PADDING, "preallocate_width_hint": _HW_DECODER_WIDTH_HINT,
            "preallocate_height_hint": _HW_DECODER_HEIGHT_HINT, "hw_decoder_load": _HW_DECODER_LOAD}


def _normalize(images, *, channels_last: bool, mirror, crop=None):
    """Normalize with the ImageNet mean/std into float32; HWC for channels_last, CHW otherwise (DALI does both)."""
    from nvidia.dali import fn, types

    crop_args = {} if crop is None else {"crop": crop}
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD],
                                    mirror=mirror, **crop_args)


def _read(files: list[str], labels: list[int], decode_on_gpu: bool):
    from nvidia.dali import fn

    # pad_last_batch repeats the last file to fill a partial batch (the iterator trims it away), so the next pass
    # starts from the first file instead of wrapping into it.
    encoded, labels = fn.readers.file(files=files, labels=labels, name=READER_NAME, pad_last_batch=True)
    return encoded, (labels.gpu() if decode_on_gpu else labels)


def _rand_augment_suite():
    """timm's RandAugment "increasing" operations (_RAND_INCREASING_TRANSFORMS) with timm's ranges, as DALI
    augmentations; the ones whose range differs from DALI's default are re-ranged."""
    from nvidia.dali.auto_aug import augmentations as aug

    return [aug.auto_contrast, aug.equalize, aug.invert, aug.rotate,
            # Bits kept, 4 down to 0 as the magnitude grows; DALI keeps at least 1 bit where timm would keep 0
            # (magnitude 10 only).
            aug.posterize.augmentation(mag_range=(4, 0)),
            aug.solarize, aug.solarize_add, aug.color, aug.contrast, aug.brightness, aug.sharpness,
            aug.shear_x, aug.shear_y,
            aug.translate_x.augmentation(mag_range=(0, 0.45)), aug.translate_y.augmentation(mag_range=(0, 0.45))]


def _rand_augment(images, *, num_ops: int, magnitude: float, magnitude_std: float, image_size: int):
    """RandAugment on a batch of uint8 HWC images of image_size x image_size (needs enable_conditionals)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dali_math
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite = _rand_augment_suite()
    for _ in range(num_ops):
        operation = fn.random.uniform(values=list(range(len(suite))), dtype=types.INT32)
        if magnitude_std > 0:
            level = dali_math.clamp(fn.random.normal(mean=magnitude, stddev=magnitude_std), 0,
                                    RAND_AUGMENT_MAX_MAGNITUDE)
            magnitude_bin = fn.cast(level * _MAGNITUDE_BINS_PER_UNIT, dtype=types.INT32)  # casts round
        else:
            magnitude_bin = round(magnitude * _MAGNITUDE_BINS_PER_UNIT)
        if fn.random.coin_flip(probability=_RAND_AUGMENT_OP_PROBABILITY):
            images = select(suite, operation, images, magnitude_bin=signed_bin(magnitude_bin),
                            num_magnitude_bins=_MAGNITUDE_BINS, shape=(image_size, image_size),
                            fill_value=_RAND_AUGMENT_FILL, interp_type=types.INTERP_LINEAR)
    return images


def _random_erasing(images, *, probability: float, image_size: int, layout: str):
    """Random erasing of normalized float images of `layout` "HWC" or "CHW" (needs enable_conditionals).

    timm and torchvision redraw a rectangle that does not fit inside the image (up to 10 times); here a side that
    would reach the image's size is clamped to size - 1 instead, which changes about 0.3% of the draws.
    """
    from nvidia.dali import fn, types
    from nvidia.dali import math as dali_math

    area = fn.random.uniform(range=[RANDOM_ERASING_SCALE[0] * image_size**2, RANDOM_ERASING_SCALE[1] * image_size**2])
    aspect = dali_math.exp(fn.random.uniform(range=[math.log(RANDOM_ERASING_RATIO[0]),
                                                    math.log(RANDOM_ERASING_RATIO[1])]))
    # Sides rounded to whole pixels (DALI's float-to-int cast rounds to nearest), as timm and torchvision do.
    height = dali_math.min(fn.cast(dali_math.sqrt(area * aspect), dtype=types.INT32), image_size - 1)
    width = dali_math.min(fn.cast(dali_math.sqrt(area / aspect), dtype=types.INT32), image_size - 1)
    # Uniform integers in [0, image_size - side]: uniform draws in [0, 1) scaled and floored.
    top = dali_math.floor(fn.random.uniform(range=[0, 1]) * (image_size - height + 1))
    left = dali_math.floor(fn.random.uniform(range=[0, 1]) * (image_size - width + 1))
    if fn.random.coin_flip(probability=probability):
        region = {"anchor": fn.stack(top, left),
                  "shape": fn.cast(fn.stack(height, width), dtype=types.FLOAT), "axis_names": "HW"}
        # fn.erase fills with a constant; the noise is added back only inside the rectangle.
        noise = fn.reshape(fn.random.normal(images), layout=layout)
        images = fn.erase(images, fill_value=0, **region) + noise - fn.erase(noise, fill_value=0, **region)
    return images


def _train_graph(files, labels, *, image_size, min_scale, hflip, rand_augment_ops, rand_augment_magnitude,
                 rand_augment_magnitude_std, random_erasing, channels_last, decode_on_gpu):
    from nvidia.dali import fn, types

    encoded, labels = _read(files, labels, decode_on_gpu)
    # Decoding only the random crop's region of interest is what makes the fused op cheaper than decode-then-crop.
    images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, random_area=[min_scale, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100,
                                           **decoder_args(decode_on_gpu))
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    if rand_augment_ops:
        # DALI's own augmentations call two operators by deprecated aliases, and DALI resets the warning filters to
        # show that: nothing a user can act on, so those warnings are dropped here and any other is passed on.
        with warnings.catch_warnings(record=True) as caught:
            images = _rand_augment(images, num_ops=rand_augment_ops, magnitude=rand_augment_magnitude,
                                   magnitude_std=rand_augment_magnitude_std, image_size=image_size)
        for warning in caught:
            if "nvidia.dali.fn.experimental." not in str(warning.message):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else False
    images = _normalize(images, channels_last=channels_last, mirror=mirror)
    if random_erasing:
        images = _random_erasing(images, probability=random_erasing, image_size=image_size,
                                 layout="HWC" if channels_last else "CHW")
    return images, labels


def _val_graph(files, labels, *, image_size, resize_shorter, channels_last, decode_on_gpu):
    from nvidia.dali import fn, types

    encoded, labels = _read(files, labels, decode_on_gpu)
    images = fn.decoders.image(encoded, output_type=types.RGB, **decoder_args(decode_on_gpu))
    images = fn.resize(images, resize_shorter=resize_shorter, interp_type=types.INTERP_LINEAR, antialias=True)
    return _normalize(images, channels_last=channels_last, mirror=False, crop=(image_size, image_size)), labels


def run_pipeline(graph, graph_args: dict, files: list[str], output_names: tuple[str, ...], *, batch_size: int,
                 num_threads: int, device: torch.device, decode_on_gpu: bool, seed: int,
                 conditionals: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Builds one pipeline of `graph(**graph_args, decode_on_gpu=...)`, whose reader (named READER_NAME) reads
    `files` in this order, and yields its batches once through as {output name: tensor}, the padded tail trimmed.
    Outputs on the GPU come as tensors on `device`, outputs on the CPU as CPU tensors.

    conditionals: trace `graph` with DALI's conditionals (per-sample `if` on DataNodes), which the automatic
    augmentations and random erasing use. A pipeline failure is reported as the BadImageError of the first file
    in flight that PIL cannot decode, when there is one."""
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    if not files:
        return
    # A shard smaller than one batch gets a smaller pipeline batch rather than a batch mostly made of padding. The
    # dynamic executor (DALI 2's default, stated because graphs rely on it) lets a CPU output read the shapes of GPU
    # data, as the COCO graph does with its decoded images.
    pipeline = pipeline_def(graph, enable_conditionals=conditionals, exec_dynamic=True)(
        **graph_args, decode_on_gpu=decode_on_gpu, batch_size=min(batch_size, len(files)), num_threads=num_threads,
        seed=seed, device_id=device.index if decode_on_gpu else None, prefetch_queue_depth=PREFETCH_DEPTH)
    batches_done = 0
    try:
        # Building the iterator builds the pipeline and starts decoding the first batches.
        batches = DALIGenericIterator(pipeline, list(output_names), reader_name=READER_NAME,
                                      last_batch_policy=LastBatchPolicy.PARTIAL)
        for (batch,) in batches:
            yield batch
            batches_done += 1
    except RuntimeError as error:
        first = batches_done * batch_size
        in_flight = files[first:first + (PREFETCH_DEPTH + 1) * batch_size]
        bad_image = find_undecodable(in_flight)
        if bad_image is not None:
            raise bad_image from error
        raise RuntimeError(f"DALI pipeline failed while reading files {first}..{first + len(in_flight) - 1} of this "
                           "pass; each of them decodes with PIL, so the cause is in the DALI error above") from error


def _classification_batches(graph, graph_args: dict, files: list[str], labels: list[int], *, channels_last: bool,
                            device: torch.device, **pipeline_args) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    graph_args = {**graph_args, "files": files, "labels": labels, "channels_last": channels_last}
    for batch in run_pipeline(graph, graph_args, files, ("images", "labels"), device=device, **pipeline_args):
        images = batch["images"]
        if channels_last:
            images = images.permute(0, 3, 1, 2)  # the NHWC buffer viewed as NCHW has channels_last strides
        # The .to calls are no-ops when the pipeline already produced tensors on `device`.
        yield (images.to(device, non_blocking=True),
               batch["labels"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True))


class DaliTrainLoader(TrainShard):
    """One rank's training batches; call set_epoch(epoch) before iterating each epoch."""

    backend = "dali"

    def __init__(self, listing: SplitListing, *, batch_size: int, image_size: int, rank: int, world_size: int,
                 device: torch.device, decode_on_gpu: bool, seed: int, num_threads: int, channels_last: bool,
                 min_scale: float, hflip: bool, rand_augment_ops: int = 0, rand_augment_magnitude: float = 9.0,
                 rand_augment_magnitude_std: float = 0.5, random_erasing: float = 0.0, repeats: int = 1):
        super().__init__(len(listing), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                         repeats=repeats)
        self._listing = listing
        self._device = device
        self._decode_on_gpu = decode_on_gpu
        self._num_threads = num_threads
        self._channels_last = channels_last
        self._graph_args = {"image_size": image_size, "min_scale": min_scale, "hflip": hflip,
                            "rand_augment_ops": rand_augment_ops, "rand_augment_magnitude": rand_augment_magnitude,
                            "rand_augment_magnitude_std": rand_augment_magnitude_std,
                            "random_erasing": random_erasing}
        self._conditionals = rand_augment_ops > 0 or random_erasing > 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices()
        files = [self._listing.files[i] for i in indices]
        labels = [self._listing.labels[i] for i in indices]
        return _classification_batches(_train_graph, self._graph_args, files, labels, batch_size=self._batch_size,
                                       num_threads=self._num_threads, device=self._device,
                                       decode_on_gpu=self._decode_on_gpu, seed=self.epoch_augmentation_seed(),
                                       channels_last=self._channels_last, conditionals=self._conditionals)


class DaliValLoader(ValShard):
    """This rank's block of the validation set, in sorted order; the last batch may be partial."""

    backend = "dali"

    def __init__(self, listing: SplitListing, *, batch_size: int, image_size: int, resize_shorter: int, rank: int,
                 world_size: int, device: torch.device, decode_on_gpu: bool, num_threads: int, channels_last: bool):
        super().__init__(len(listing), batch_size=batch_size, rank=rank, world_size=world_size)
        self._files = [listing.files[i] for i in self.indices]
        self._labels = [listing.labels[i] for i in self.indices]
        self._device = device
        self._decode_on_gpu = decode_on_gpu
        self._num_threads = num_threads
        self._channels_last = channels_last
        self._graph_args = {"image_size": image_size, "resize_shorter": resize_shorter}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A fresh pipeline per pass: DALI iterators cannot be reset mid-epoch, so a pass abandoned early (a
        # `break`) must not leave the next one starting halfway through.
        return _classification_batches(_val_graph, self._graph_args, self._files, self._labels,
                                       batch_size=self._batch_size, num_threads=self._num_threads, device=self._device,
                                       decode_on_gpu=self._decode_on_gpu, seed=0, channels_last=self._channels_last)

