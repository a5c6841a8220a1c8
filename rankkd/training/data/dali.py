"""DALI loaders: decoding and augmentation on the GPU ("mixed" nvJPEG decoding, with the hardware JPEG decoder where
the GPU has one), or a CPU-only pipeline (device_id=None) where there is no GPU.

DALI is imported only when a pipeline is built, so importing rankkd.training.data works without it.

Each train epoch builds a fresh pipeline over this rank's slice of that epoch's global permutation (see
sharding.py), fed as an explicit file list to fn.readers.file with its own shuffling off, and seeded from
(seed, epoch, rank). The order and the augmentation of an epoch are then a function of (seed, epoch, rank) alone
(DALI draws per-sample random numbers, so not of num_threads either), so a run resumed at epoch e reads exactly
what an uninterrupted run reads there. DALI's reader-side shuffling
(random_shuffle, shuffle_after_epoch) would tie an epoch's order to the reader's history instead. Building costs
milliseconds for small sets and 1-2 s for an ImageNet-sized list of 1.28M files (measured on 2 CPU cores), once per
epoch.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from rankkd.training.data.folder import SplitListing, find_undecodable
from rankkd.training.data.normalization import IMAGENET_MEAN, IMAGENET_STD
from rankkd.training.data.sharding import TrainShard, val_shard_indices

_READER_NAME = "files"
# Batches DALI works ahead of the consumer (the pipeline's prefetch_queue_depth); also the span of batches that may
# hold a file that failed to decode.
_PREFETCH_DEPTH = 2
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


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def _decoder_args(decode_on_gpu: bool) -> dict:
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
    encoded, labels = fn.readers.file(files=files, labels=labels, name=_READER_NAME, pad_last_batch=True)
    return encoded, (labels.gpu() if decode_on_gpu else labels)


def _train_graph(files, labels, *, image_size, min_scale, hflip, channels_last, decode_on_gpu):
    from nvidia.dali import fn, types

    encoded, labels = _read(files, labels, decode_on_gpu)
    # Decoding only the random crop's region of interest is what makes the fused op cheaper than decode-then-crop.
    images = fn.decoders.image_random_crop(encoded, output_type=types.RGB, random_area=[min_scale, 1.0],
                                           random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100,
                                           **_decoder_args(decode_on_gpu))
    images = fn.resize(images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR,
                       antialias=True)
    mirror = fn.random.coin_flip(probability=0.5) if hflip else False
    return _normalize(images, channels_last=channels_last, mirror=mirror), labels


def _val_graph(files, labels, *, image_size, resize_shorter, channels_last, decode_on_gpu):
    from nvidia.dali import fn, types

    encoded, labels = _read(files, labels, decode_on_gpu)
    images = fn.decoders.image(encoded, output_type=types.RGB, **_decoder_args(decode_on_gpu))
    images = fn.resize(images, resize_shorter=resize_shorter, interp_type=types.INTERP_LINEAR, antialias=True)
    return _normalize(images, channels_last=channels_last, mirror=False, crop=(image_size, image_size)), labels


def _run_pipeline(graph, graph_args: dict, files: list[str], labels: list[int], *, batch_size: int,
                  num_threads: int, device: torch.device, decode_on_gpu: bool, seed: int,
                  channels_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Builds one pipeline over `files` and yields its (images, labels) once through, trimming the padded tail."""
    from nvidia.dali import Pipeline
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    if not files:
        return
    # A shard smaller than one batch gets a smaller pipeline batch rather than a batch mostly made of padding.
    pipeline = Pipeline(batch_size=min(batch_size, len(files)), num_threads=num_threads, seed=seed,
                        device_id=device.index if decode_on_gpu else None, prefetch_queue_depth=_PREFETCH_DEPTH)
    with pipeline:
        pipeline.set_outputs(*graph(files, labels, channels_last=channels_last, decode_on_gpu=decode_on_gpu,
                                    **graph_args))
    batches_done = 0
    try:
        # Building the iterator builds the pipeline and starts decoding the first batches.
        batches = DALIGenericIterator(pipeline, ["images", "labels"], reader_name=_READER_NAME,
                                      last_batch_policy=LastBatchPolicy.PARTIAL)
        for (batch,) in batches:
            images = batch["images"]
            if channels_last:
                images = images.permute(0, 3, 1, 2)  # the NHWC buffer viewed as NCHW has channels_last strides
            # The .to calls are no-ops when the pipeline already produced tensors on `device`.
            yield (images.to(device, non_blocking=True),
                   batch["labels"].reshape(-1).to(device=device, dtype=torch.int64, non_blocking=True))
            batches_done += 1
    except RuntimeError as error:
        first = batches_done * batch_size
        in_flight = files[first:first + (_PREFETCH_DEPTH + 1) * batch_size]
        bad_image = find_undecodable(in_flight)
        if bad_image is not None:
            raise bad_image from error
        raise RuntimeError(f"DALI pipeline failed while reading files {first}..{first + len(in_flight) - 1} of this "
                           "pass; each of them decodes with PIL, so the cause is in the DALI error above") from error


class DaliTrainLoader(TrainShard):
    """One rank's training batches; call set_epoch(epoch) before iterating each epoch."""

    backend = "dali"

    def __init__(self, listing: SplitListing, *, batch_size: int, image_size: int, rank: int, world_size: int,
                 device: torch.device, decode_on_gpu: bool, seed: int, num_threads: int, channels_last: bool,
                 min_scale: float, hflip: bool):
        super().__init__(len(listing), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self._listing = listing
        self._device = device
        self._decode_on_gpu = decode_on_gpu
        self._num_threads = num_threads
        self._channels_last = channels_last
        self._graph_args = {"image_size": image_size, "min_scale": min_scale, "hflip": hflip}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.epoch_indices()
        files = [self._listing.files[i] for i in indices]
        labels = [self._listing.labels[i] for i in indices]
        return _run_pipeline(_train_graph, self._graph_args, files, labels, batch_size=self._batch_size,
                             num_threads=self._num_threads, device=self._device, decode_on_gpu=self._decode_on_gpu,
                             seed=self.epoch_augmentation_seed(), channels_last=self._channels_last)


class DaliValLoader:
    """This rank's block of the validation set, in sorted order; the last batch may be partial."""

    backend = "dali"

    def __init__(self, listing: SplitListing, *, batch_size: int, image_size: int, resize_shorter: int, rank: int,
                 world_size: int, device: torch.device, decode_on_gpu: bool, num_threads: int, channels_last: bool):
        indices = val_shard_indices(len(listing), rank=rank, world_size=world_size)
        self._files = [listing.files[i] for i in indices]
        self._labels = [listing.labels[i] for i in indices]
        self._batch_size = batch_size
        self._device = device
        self._decode_on_gpu = decode_on_gpu
        self._num_threads = num_threads
        self._channels_last = channels_last
        self._graph_args = {"image_size": image_size, "resize_shorter": resize_shorter}

    def set_epoch(self, epoch: int) -> None:
        """Validation is the same every epoch; accepted so that both loaders share one protocol."""

    def __len__(self) -> int:
        return -(-len(self._files) // self._batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A fresh pipeline per pass: DALI iterators cannot be reset mid-epoch, so a pass abandoned early (a
        # `break`) must not leave the next one starting halfway through.
        return _run_pipeline(_val_graph, self._graph_args, self._files, self._labels, batch_size=self._batch_size,
                             num_threads=self._num_threads, device=self._device, decode_on_gpu=self._decode_on_gpu,
                             seed=0, channels_last=self._channels_last)

