"""CIFAR-100 (and any small image set held in memory) served from the device, augmented there.

CIFAR-100 is 60,000 images of 32x32: 184 MB as uint8, so the whole set lives on the GPU and a training step never
waits on the host. Each epoch's order and augmentation are drawn up front in set_epoch, from (seed, epoch, rank)
alone; a batch is then a gather of uint8 rows, a zero pad, one gather that crops and flips every sample at once,
and one fused multiply-add that converts to float32 and normalizes.

- load_cifar100(path): the official `cifar-100-python` pickles, from the folder, its parent, or the .tar.gz.
- demo_arrays(): the embedded handwritten-digits demo, with the demo tree's train/val split.
- synthetic_arrays(...): random images of CIFAR's size, for timing the whole path.
- make_device_loaders(arrays, ...): the train/val loader pair (backend "device").

The train transform is mdistiller's: a random 32x32 crop of the image zero-padded by 4 pixels on every side, then a
random horizontal flip; validation images are only normalized.
"""
from __future__ import annotations

import io
import numbers
import os
import pickle
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rankkd.data.sharding import TrainShard, ValShard

# mdistiller's CIFAR-100 channel statistics (RGB, pixel values in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR100_NUM_CLASSES = 100
CIFAR_IMAGE_SIZE = 32
CROP_PADDING = 4

_FOLDER_NAME = "cifar-100-python"
_ARCHIVE_NAME = "cifar-100-python.tar.gz"
_ROW_LENGTH = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE


class CifarDataError(ValueError):
    """A CIFAR file is missing or does not hold what the format says; the message names the file."""


@dataclass(frozen=True)
class ImageArrays:
    """A labelled image set held in memory, in the form make_device_loaders takes.

    train_images, val_images: uint8 (N, 3, H, W), one H and W for both; train_labels, val_labels: int64 (N,) in
    [0, num_classes); classes: one name per class; mean, std: the per-channel statistics (for pixel values in
    [0, 1]) that the loaders normalize with. Checked on construction.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __post_init__(self):
        if not self.classes:
            raise ValueError("ImageArrays: classes is empty")
        _check_channel_stats(self.mean, self.std, "ImageArrays")
        image_shape = None
        for split in ("train", "val"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
                raise ValueError(f"ImageArrays: {split}_images must be a non-empty uint8 (N, 3, H, W) tensor, got "
                                 f"{images.dtype} {tuple(images.shape)}")
            if image_shape is not None and images.shape[2:] != image_shape:
                raise ValueError(f"ImageArrays: train images are {tuple(image_shape)} but val images are "
                                 f"{tuple(images.shape[2:])}")
            image_shape = images.shape[2:]
            if labels.dtype != torch.int64 or labels.shape != (len(images),):
                raise ValueError(f"ImageArrays: {split}_labels must be int64 of shape ({len(images)},), got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"ImageArrays: {split}_labels span [{low}, {high}], outside [0, {self.num_classes})")


def _check_channel_stats(mean: Sequence[float], std: Sequence[float], owner: str) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"{owner}: mean and std need one value per RGB channel, got {mean!r} and {std!r}")
    if not all(isinstance(s, numbers.Real) and s > 0 for s in std):
        raise ValueError(f"{owner}: std values must be > 0, got {std!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the official pickles

# A CIFAR pickle holds dicts, lists, strings and numpy arrays; unpickling anything else could run arbitrary code.
# (_codecs.encode is how Python 3 writes bytes at pickle protocol 2.)
_ALLOWED_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        module = re.sub(r"^numpy\.core(?=\.|$)", "numpy._core", module)  # numpy 1 names, as in the official files
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}: a CIFAR file holds only "
                                         "dicts, lists, strings and numpy arrays")
        return super().find_class(module, name)


def _unpickle(raw: bytes, source: str) -> dict[str, object]:
    """The dict in a CIFAR pickle, with str keys (Python 2 files give str keys under latin-1; bytes keys, written by
    some converters, are decoded too)."""
    try:
        content = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as error:  # a damaged pickle raises almost anything (UnpicklingError, EOFError, ValueError, ...)
        raise CifarDataError(f"{source}: not a readable CIFAR pickle ({type(error).__name__}: {error})") from error
    if not isinstance(content, dict):
        raise CifarDataError(f"{source}: expected a pickled dict, found {type(content).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in content.items()}


def _get(content: dict[str, object], key: str, source: str) -> object:
    if key not in content:
        raise CifarDataError(f"{source}: missing key {key!r} (found {sorted(map(str, content))})")
    return content[key]


def _split_arrays(raw: bytes, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    content = _unpickle(raw, source)
    data = _get(content, "data", source)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LENGTH:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise CifarDataError(f"{source}: 'data' must be a uint8 array of shape (N, {_ROW_LENGTH}) (rows of 3x32x32 "
                             f"pixels, channel-major), found {found}")
    if len(data) == 0:
        raise CifarDataError(f"{source}: 'data' has no rows")
    try:
        labels = np.asarray(_get(content, "fine_labels", source), dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as error:
        raise CifarDataError(f"{source}: 'fine_labels' is not a list of integers ({error})") from error
    if labels.shape != (len(data),):
        raise CifarDataError(f"{source}: {labels.size} fine_labels for {len(data)} rows of data")
    if labels.min() < 0 or labels.max() >= CIFAR100_NUM_CLASSES:
        raise CifarDataError(f"{source}: fine_labels must lie in [0, {CIFAR100_NUM_CLASSES}), found values in "
                             f"[{labels.min()}, {labels.max()}]")
    images = np.require(data, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    images = images.reshape(-1, 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _class_names(raw: bytes, source: str) -> list[str]:
    names = _get(_unpickle(raw, source), "fine_label_names", source)
    if not isinstance(names, list) or len(names) != CIFAR100_NUM_CLASSES:
        raise CifarDataError(f"{source}: 'fine_label_names' must be a list of {CIFAR100_NUM_CLASSES} names")
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


def _read_folder(folder: Path) -> dict[str, tuple[bytes, str]]:
    """{member: (bytes, source)} for train, test and, when present, meta."""
    files = {}
    for member in ("train", "test", "meta"):
        path = folder / member
        if path.is_file():
            files[member] = (path.read_bytes(), str(path))
        elif member != "meta":
            raise CifarDataError(f"{path}: missing file (a {_FOLDER_NAME} folder holds 'train', 'test' and 'meta')")
    return files


def _read_archive(archive: Path) -> dict[str, tuple[bytes, str]]:
    """Same as _read_folder, straight from the archive in one sequential pass (a gzip stream does not seek back)."""
    wanted = {f"{_FOLDER_NAME}/{member}": member for member in ("train", "test", "meta")}
    files = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for entry in tar:
                if entry.name in wanted and entry.isfile():
                    files[wanted[entry.name]] = (tar.extractfile(entry).read(), f"{archive}:{entry.name}")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CifarDataError(f"{archive}: not a readable tar archive ({type(error).__name__}: {error})") from error
    for name, member in wanted.items():
        if member != "meta" and member not in files:
            raise CifarDataError(f"{archive}: missing member {name}")
    return files


def load_cifar100(path: str | os.PathLike) -> ImageArrays:
    """CIFAR-100 from the official Python-pickle release, in memory as ImageArrays (train = the `train` file, val =
    the `test` file; fine labels; class names from `meta` when present, else "0".."99").

    path: the `cifar-100-python` folder, a folder holding it (or holding only `cifar-100-python.tar.gz`), or the
    archive itself, read without extracting. Any number of rows is accepted. A missing file, a file that is not a
    CIFAR pickle, a missing key, data not shaped (N, 3072) uint8, a label count that differs from the row count, or
    a label outside 0..99 raises CifarDataError (a ValueError) naming the file.
    """
    path = Path(path).expanduser()
    if path.is_file():
        files = _read_archive(path)
    elif path.is_dir():
        if path.name == _FOLDER_NAME or (path / "train").exists() or (path / "test").exists():
            files = _read_folder(path)
        elif (path / _FOLDER_NAME).is_dir():
            files = _read_folder(path / _FOLDER_NAME)
        elif (path / _ARCHIVE_NAME).is_file():
            files = _read_archive(path / _ARCHIVE_NAME)
        else:
            raise CifarDataError(f"{path}: holds neither 'train'/'test' pickles, a {_FOLDER_NAME} folder, nor "
                                 f"{_ARCHIVE_NAME}")
    else:
        raise CifarDataError(f"{path}: no such file or folder (expected the {_FOLDER_NAME} folder, its parent, or "
                             f"{_ARCHIVE_NAME})")
    train_images, train_labels = _split_arrays(*files["train"])
    val_images, val_labels = _split_arrays(*files["test"])
    classes = _class_names(*files["meta"]) if "meta" in files else [str(label) for label in
                                                                     range(CIFAR100_NUM_CLASSES)]
    return ImageArrays(train_images, train_labels, val_images, val_labels, classes, CIFAR100_MEAN, CIFAR100_STD)


# ---------------------------------------------------------------------------------------------------------------------
# Other sources of arrays

def demo_arrays(cache_dir: str | os.PathLike | None = None) -> ImageArrays:
    """The handwritten-digits demo (10 classes, 32x32 RGB) as ImageArrays: the very images and train/val split of
    the demo tree that prepare_demo builds (and caches in cache_dir), normalized with their own train-set mean/std."""
    from PIL import Image

    from rankkd.data.demo import prepare_demo
    from rankkd.data.folder import list_image_folder

    listing = list_image_folder(prepare_demo(cache_dir))
    splits = []
    for split in (listing.train, listing.val):
        pixels = []
        for file in split.files:
            with Image.open(file) as image:
                pixels.append(np.asarray(image.convert("RGB")))
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
        splits += [images, torch.tensor(split.labels, dtype=torch.int64)]
    train_pixels = splits[0].double() / 255
    mean = tuple(train_pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_pixels.std(dim=(0, 2, 3)).tolist())
    return ImageArrays(*splits, listing.classes, mean, std)


def synthetic_arrays(num_train: int = 50000, num_val: int = 10000, num_classes: int = CIFAR100_NUM_CLASSES,
                     seed: int = 0) -> ImageArrays:
    """Uniformly random uint8 images of CIFAR's size and random labels, for timing the full data path."""
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"synthetic_arrays: {name} must be an integer >= 1, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    shape = (3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE)
    arrays = [tensor for count in (num_train, num_val)
              for tensor in (torch.randint(256, (count, *shape), generator=generator, dtype=torch.uint8),
                             torch.randint(num_classes, (count,), generator=generator))]
    return ImageArrays(*arrays, [str(label) for label in range(num_classes)], CIFAR100_MEAN, CIFAR100_STD)


# ---------------------------------------------------------------------------------------------------------------------
# The device-resident loaders

@dataclass(frozen=True)
class EpochPlan:
    """One rank's training epoch, decided in set_epoch: sample i of the epoch (batch i // batch_size) is train image
    indices[i], cropped at rows top[i]..top[i]+H-1 and columns left[i]..left[i]+W-1 of the zero-padded image
    (both offsets in [0, 2 * CROP_PADDING]), then mirrored left-right where flip[i]. All on the data's device."""

    indices: torch.Tensor  # int64 (L,)
    top: torch.Tensor  # int64 (L,)
    left: torch.Tensor  # int64 (L,)
    flip: torch.Tensor  # bool (L,)


def _normalizer(mean: Sequence[float], std: Sequence[float], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1) float32, with (pixel / 255 - mean) / std == pixel * scale + shift."""
    mean = torch.tensor(mean, dtype=torch.float64)
    std = torch.tensor(std, dtype=torch.float64)
    scale, shift = 1 / (255 * std), -mean / std
    return (scale.view(1, 3, 1, 1).to(device, torch.float32), shift.view(1, 3, 1, 1).to(device, torch.float32))


def _normalize(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # addcmul promotes the uint8 pixels to float32 itself: conversion and normalization in one kernel, which keeps
    # the input's memory format.
    out = torch.addcmul(shift, images, scale)
    return out if channels_last else out.contiguous()


class DeviceTrainLoader(TrainShard):
    """One rank's training batches from device-resident uint8 images; call set_epoch(epoch) before each epoch.

    The epoch's sample order is TrainShard's (one permutation per (seed, epoch), the same on every rank, cut into
    equal per-rank slices of full batches); crop offsets and flips come from a generator on the data's device seeded
    by (seed, epoch, rank). Both are drawn once in set_epoch, so iterating does no host work beyond slicing and
    never waits on the device. The same (seed, epoch, rank) and device give bit-identical batches.
    """

    backend = "device"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, rank: int, world_size: int,
                 seed: int, scale: torch.Tensor, shift: torch.Tensor, channels_last: bool):
        super().__init__(len(images), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self._images = images
        self._labels = labels
        self._scale = scale
        self._shift = shift
        self._channels_last = channels_last
        device = images.device
        height, width = images.shape[2:]
        self._rows = torch.arange(height, device=device)
        self._columns = torch.arange(width, device=device)
        self._mirrored_columns = self._columns.flip(0)
        self._batch_index = torch.arange(batch_size, device=device).view(-1, 1, 1)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        device = self._images.device
        indices = torch.from_numpy(self.epoch_indices()).to(device)
        generator = torch.Generator(device=device).manual_seed(self.epoch_augmentation_seed())
        count, span = len(indices), 2 * CROP_PADDING + 1
        top = torch.randint(span, (count,), generator=generator, device=device)
        left = torch.randint(span, (count,), generator=generator, device=device)
        flip = torch.randint(2, (count,), generator=generator, device=device).bool()
        self.plan = EpochPlan(indices, top, left, flip)
        # Per-sample source rows and columns in the padded image, (L, H) and (L, W): a batch's crop and flip is then
        # a single gather.
        self._source_rows = top[:, None] + self._rows
        self._source_columns = left[:, None] + torch.where(flip[:, None], self._mirrored_columns, self._columns)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = CROP_PADDING
        for start in range(0, len(self.plan.indices), self._batch_size):
            batch = slice(start, start + self._batch_size)
            indices = self.plan.indices[batch]
            padded = F.pad(self._images.index_select(0, indices), (p, p, p, p))
            # Indexing dims 0, 2 and 3 around the channel slice puts the indexed dims first: (B, H, W, 3), which
            # permuted back to (B, 3, H, W) is channels_last without a copy.
            crops = padded[self._batch_index, :, self._source_rows[batch, :, None],
                           self._source_columns[batch, None, :]].permute(0, 3, 1, 2)
            yield (_normalize(crops, self._scale, self._shift, self._channels_last),
                   self._labels.index_select(0, indices))


class DeviceValLoader(ValShard):
    """This rank's contiguous block of the validation images, in order, normalized; the last batch may be partial."""

    backend = "device"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, rank: int, world_size: int,
                 scale: torch.Tensor, shift: torch.Tensor, channels_last: bool):
        super().__init__(len(images), batch_size=batch_size, rank=rank, world_size=world_size)
        block = torch.from_numpy(self.indices).to(images.device)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Stored in the output's memory format, so that normalization writes batches in it directly.
        self._images = images.index_select(0, block).contiguous(memory_format=memory_format)
        self._labels = labels.index_select(0, block)
        self._scale = scale
        self._shift = shift
        self._channels_last = channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self._images), self._batch_size):
            batch = slice(start, start + self._batch_size)
            yield _normalize(self._images[batch], self._scale, self._shift, self._channels_last), self._labels[batch]


def make_device_loaders(arrays: ImageArrays, *, batch_size: int, device: torch.device | str, rank: int = 0,
                        world_size: int = 1, seed: int = 0, mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None, channels_last: bool = True,
                        val_batch_size: int | None = None):
    """Train and val loaders for this rank, serving `arrays` from `device` (backend "device").

    The uint8 images move to `device` once (each rank keeps the whole train set and its own val block). train:
    len(train) = len(arrays.train_images) // (batch_size * world_size) full batches per epoch, mdistiller's random
    crop (zero padding 4) and horizontal flip, see DeviceTrainLoader. val: batches of val_batch_size (default
    batch_size) over this rank's block; the blocks of all ranks cover every val image once. Batches are float32
    (N, 3, H, W) normalized with mean/std (default: the arrays' own), channels_last when asked, and int64 labels.
    """
    from rankkd.data import DataLoaders, resolve_device  # the package re-exports this module

    val_batch_size = batch_size if val_batch_size is None else val_batch_size
    for name, value, minimum in (("batch_size", batch_size, 1), ("val_batch_size", val_batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"make_device_loaders: {name} must be an integer >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"make_device_loaders: rank must be in [0, world_size={world_size}), got {rank}")
    num_train = len(arrays.train_images)
    if num_train < batch_size * world_size:
        raise ValueError(f"make_device_loaders: {num_train} train images are fewer than batch_size * world_size = "
                         f"{batch_size} * {world_size}: no full batch per rank")
    mean = arrays.mean if mean is None else tuple(mean)
    std = arrays.std if std is None else tuple(std)
    _check_channel_stats(mean, std, "make_device_loaders")
    device = resolve_device(device)
    scale, shift = _normalizer(mean, std, device)
    common = {"rank": rank, "world_size": world_size, "scale": scale, "shift": shift, "channels_last": channels_last}
    train = DeviceTrainLoader(arrays.train_images.to(device), arrays.train_labels.to(device), batch_size=batch_size,
                              seed=seed, **common)
    val = DeviceValLoader(arrays.val_images.to(device), arrays.val_labels.to(device), batch_size=val_batch_size,
                          **common)
    return DataLoaders(train=train, val=val, num_classes=arrays.num_classes, classes=list(arrays.classes))
