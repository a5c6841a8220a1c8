"""The embedded demo dataset: scikit-learn's handwritten digits, written once as a JPEG ImageFolder tree.

load_digits() ships 1797 real 8x8 grayscale scans of the digits 0-9 inside scikit-learn (no download). They are
upscaled to DEMO_IMAGE_SIZE x DEMO_IMAGE_SIZE RGB (bicubic, the gray value copied into all three channels) and
saved as JPEG under <cache>/digits-32px-v1/{train,val}/<digit>/<index in load_digits>.jpg, with a stratified
80/20 split under a fixed seed: 1437 train and 360 val images. Being an ordinary JPEG tree, it runs through the
very same loaders as ImageNet does.

build_in_cache writes every generated dataset into the cache (the COCO demo, rankkd.data.coco_demo, too).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from rankkd.data.staging import build_folder

DEMO_NUM_CLASSES = 10
DEMO_IMAGE_SIZE = 32
_DEMO_DIR_NAME = f"digits-{DEMO_IMAGE_SIZE}px-v1"
_SPLIT_SEED = 0
_VAL_FRACTION = 0.2
_JPEG_QUALITY = 95


def default_cache_dir() -> Path:
    return Path(os.environ.get("RANKKD_CACHE") or Path.home() / ".cache" / "rankkd").expanduser()


def build_in_cache(name: str, write: Callable[[Path], None], cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder `name` in the cache (cache_dir, else $RANKKD_CACHE, else ~/.cache/rankkd), which write(folder)
    fills on first use; later calls find it there and write nothing.

    Built whole or not at all (rankkd.data.staging.build_folder)."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return build_folder(cache / name, write)


def _write_tree(target: Path) -> None:
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError("the demo dataset needs scikit-learn (pip install scikit-learn)") from error

    digits = load_digits()
    # Pixel values run 0..16 (ink counts per 4x4 block of the original 32x32 scan).
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_indices, val_indices = train_test_split(np.arange(len(pixels)), test_size=_VAL_FRACTION,
                                                  stratify=digits.target, random_state=_SPLIT_SEED)
    for split, indices in (("train", train_indices), ("val", val_indices)):
        for digit in range(DEMO_NUM_CLASSES):
            (target / split / str(digit)).mkdir(parents=True)
        for index in indices:
            image = Image.fromarray(pixels[index], mode="L")
            image = image.resize((DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB")
            image.save(target / split / str(digits.target[index]) / f"{index:04d}.jpg", quality=_JPEG_QUALITY)


def prepare_demo(cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the root of the digits ImageFolder tree, building it on first use (build_in_cache: cache_dir
    defaults to $RANKKD_CACHE, else ~/.cache/rankkd; an interrupted build leaves no partial tree)."""
    return build_in_cache(_DEMO_DIR_NAME, _write_tree, cache_dir)
