"""Input pipelines for the distillation trainer.

- make_loaders(root, ...): train/val loaders over an ImageFolder tree (root/train/<class>/*, root/val/<class>/*),
  on DALI (GPU "mixed" decoding, or CPU-only) or on torchvision as the fallback; both yield the same tensors.
- prepare_demo(): the handwritten-digits demo tree (scikit-learn's load_digits), built once into a cache.
- synthetic_loader(...): device-resident random batches, for timing the training step without I/O.

Every loader follows one protocol: set_epoch(epoch), len(loader) (batches this rank yields), iteration yielding
(images float32 (N, 3, H, W) normalized with the ImageNet mean/std, labels int64 (N,)) on the rank's device, and
num_samples (images this rank yields per pass).

Nothing here imports DALI until a DALI loader is built.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from rankkd.data.dali import RAND_AUGMENT_MAX_MAGNITUDE
from rankkd.data.demo import DEMO_IMAGE_SIZE, DEMO_NUM_CLASSES, prepare_demo
from rankkd.data.folder import BadImageError, ImageFolderError, list_image_folder
from rankkd.data.synthetic import SyntheticLoader

LOADER_BACKENDS = ("auto", "dali", "torchvision")
DECODE_DEVICES = ("auto", "cpu", "gpu")


class BatchLoader(Protocol):
    """What every loader here provides."""

    backend: str  # "dali", "torchvision" or "synthetic"

    @property
    def num_samples(self) -> int: ...  # images this rank yields per pass

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...  # batches this rank yields per pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class DataLoaders:
    """train: set_epoch(epoch) before each epoch; len(train) full batches, equal on every rank (the remainder is
    dropped so DDP ranks stay in step); (seed, epoch, rank) alone determine its order and augmentation.

    val: every val image exactly once across all ranks, no padding; the last batch may be partial. Ranks can differ
    by one batch (their blocks differ by at most one image), so sum correct counts per rank and all-reduce once
    after the pass, not per step.
    """

    train: BatchLoader
    val: BatchLoader
    num_classes: int
    classes: list[str]

    @property
    def backend(self) -> str:
        return self.train.backend


def resolve_device(device: torch.device | str) -> torch.device:
    """`device` checked, a CUDA device with its index (DALI needs one)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    return device


def resolve_loader_backend(backend: str) -> str:
    """"dali" or "torchvision" for a backend option of LOADER_BACKENDS ("auto": DALI when it is importable)."""
    from rankkd.data.dali import dali_available

    if backend not in LOADER_BACKENDS:
        raise ValueError(f"backend must be one of {LOADER_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "torchvision"
    if backend == "dali" and not dali_available():
        raise ImportError("backend='dali' but DALI is not importable: pip install nvidia-dali-cuda130 (or the "
                          "build matching your CUDA), or pass backend='torchvision'")
    return backend


@dataclass(frozen=True)
class TrainAugmentation:
    """How training images are augmented; all of DeiT's augmentations are off by default (DeiT: 2, 9, 0.5, 0.25, 3).

    min_scale, hflip: random-resized-crop (area min_scale..1, aspect 3/4..4/3) and random horizontal flip.
    rand_augment_ops: RandAugment layers per train image (0: off), at rand_augment_magnitude on timm's 0..10 scale.
        DALI: timm's "rand-m{magnitude}-mstd{magnitude_std}-inc1" (see dali.py for what differs); torchvision:
        transforms.v2.RandAugment(num_ops, magnitude, 101 bins), which has no magnitude noise (magnitude_std unused).
    random_erasing: probability per train image of erasing one random rectangle with N(0, 1) noise, after
        normalization (timm's mode "pixel").
    repeats: repeated augmentation (DeiT's RASampler): every image of an epoch is read `repeats` times, the copies
        dealt to different ranks; the epoch keeps its length. Validation is unaffected."""
    min_scale: float = 0.08
    hflip: bool = True
    rand_augment_ops: int = 0
    rand_augment_magnitude: float = 9.0
    rand_augment_magnitude_std: float = 0.5
    random_erasing: float = 0.0
    repeats: int = 1

    def __post_init__(self):
        checks = [("min_scale", 0 < self.min_scale <= 1, "in (0, 1]"),
                  ("rand_augment_ops", self.rand_augment_ops >= 0, ">= 0"),
                  ("rand_augment_magnitude", 0 <= self.rand_augment_magnitude <= RAND_AUGMENT_MAX_MAGNITUDE,
                   f"in [0, {RAND_AUGMENT_MAX_MAGNITUDE}]"),
                  ("rand_augment_magnitude_std", self.rand_augment_magnitude_std >= 0, ">= 0"),
                  ("random_erasing", 0 <= self.random_erasing <= 1, "in [0, 1]"),
                  ("repeats", self.repeats >= 1, ">= 1")]
        for name, ok, requirement in checks:
            if not ok:
                raise ValueError(f"TrainAugmentation: {name} must be {requirement}, got {getattr(self, name)!r}")


def make_loaders(root: str | os.PathLike, *, batch_size: int, image_size: int = 224, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", seed: int = 0, backend: str = "auto",
                 num_threads: int = 4, channels_last: bool = True, val_resize_ratio: float = 256 / 224,
                 decode_device: str = "auto", augment: TrainAugmentation = TrainAugmentation()) -> DataLoaders:
    """Train and val loaders for this rank over the ImageFolder tree at `root`.

    train: augmented as `augment` says, resized to image_size, normalized. val: shorter side resized to
    round(image_size * val_resize_ratio), center crop of image_size, normalized. channels_last: images come in
    torch.channels_last memory format (DALI writes NHWC, viewed as NCHW without a copy); otherwise contiguous NCHW.

    backend: "auto" (DALI if importable, else torchvision), "dali" or "torchvision".
    decode_device (DALI only): "auto" decodes on the GPU ("mixed") when `device` is CUDA and on the CPU otherwise;
    "cpu" forces CPU decoding (results are then copied to `device`); "gpu" requires a CUDA `device`.
    num_threads: DALI's CPU threads, or the torchvision backend's DataLoader worker processes (per loader).

    The tree is checked up front: a missing train/ or val/, a class folder without images, or class folders that
    differ between train/ and val/ raise an error naming the path. A file that does not decode raises
    BadImageError naming it when its batch is reached.
    """
    checks = [("batch_size", batch_size, batch_size >= 1, ">= 1"), ("image_size", image_size, image_size >= 1, ">= 1"),
              ("world_size", world_size, world_size >= 1, ">= 1"),
              ("rank", rank, 0 <= rank < world_size, f"in [0, world_size={world_size})"),
              ("seed", seed, seed >= 0, ">= 0"), ("num_threads", num_threads, num_threads >= 1, ">= 1"),
              ("val_resize_ratio", val_resize_ratio, val_resize_ratio >= 1, ">= 1")]
    for name, value, ok, requirement in checks:
        if not ok:
            raise ValueError(f"make_loaders: {name} must be {requirement}, got {value!r}")
    if decode_device not in DECODE_DEVICES:
        raise ValueError(f"decode_device must be one of {DECODE_DEVICES}, got {decode_device!r}")
    device = resolve_device(device)
    backend = resolve_loader_backend(backend)
    listing = list_image_folder(root)
    if len(listing.train) < batch_size * world_size:
        raise ValueError(f"make_loaders: {listing.root / 'train'} has {len(listing.train)} images, fewer than "
                         f"batch_size * world_size = {batch_size} * {world_size}: no full batch per rank")
    resize_shorter = round(image_size * val_resize_ratio)
    common = {"batch_size": batch_size, "image_size": image_size, "rank": rank, "world_size": world_size,
              "device": device, "channels_last": channels_last}
    augment = dataclasses.asdict(augment)
    magnitude_std = augment.pop("rand_augment_magnitude_std")

    if backend == "dali":
        from rankkd.data.dali import DaliTrainLoader, DaliValLoader

        if decode_device == "gpu" and device.type != "cuda":
            raise ValueError(f"decode_device='gpu' needs a CUDA device, got device={device}")
        decode_on_gpu = device.type == "cuda" and decode_device != "cpu"
        train = DaliTrainLoader(listing.train, seed=seed, num_threads=num_threads, decode_on_gpu=decode_on_gpu,
                                rand_augment_magnitude_std=magnitude_std, **augment, **common)
        val = DaliValLoader(listing.val, resize_shorter=resize_shorter, num_threads=num_threads,
                            decode_on_gpu=decode_on_gpu, **common)
    else:
        from rankkd.data.torchvision_loader import TorchvisionTrainLoader, TorchvisionValLoader

        if decode_device == "gpu":
            raise ValueError("decode_device='gpu' needs backend='dali'; the torchvision fallback decodes on the CPU")
        train = TorchvisionTrainLoader(listing.train, seed=seed, num_workers=num_threads, **augment, **common)
        val = TorchvisionValLoader(listing.val, resize_shorter=resize_shorter, num_workers=num_threads, **common)
    return DataLoaders(train=train, val=val, num_classes=len(listing.classes), classes=listing.classes)


def synthetic_loader(*, batch_size: int, image_size: int, num_classes: int, steps: int,
                     device: torch.device | str, channels_last: bool = True, seed: int = 0) -> SyntheticLoader:
    """`steps` device-resident random batches per epoch (one batch generated once and reused), same protocol."""
    for name, value in (("batch_size", batch_size), ("image_size", image_size), ("num_classes", num_classes),
                        ("steps", steps)):
        if value < 1:
            raise ValueError(f"synthetic_loader: {name} must be >= 1, got {value}")
    return SyntheticLoader(batch_size=batch_size, image_size=image_size, num_classes=num_classes, steps=steps,
                           device=resolve_device(device), channels_last=channels_last, seed=seed)


__all__ = ["LOADER_BACKENDS", "resolve_device", "resolve_loader_backend", "DEMO_IMAGE_SIZE", "DEMO_NUM_CLASSES", "BadImageError", "BatchLoader", "DataLoaders",
           "ImageFolderError", "TrainAugmentation", "make_loaders", "prepare_demo", "synthetic_loader"]
