"""A small COCO-format detection set of coloured shapes, generated once: the COCO task's demo and the tests' data.

Every image is DEMO_IMAGE_SIZE px square (JPEG), a noisy background of random tint with 1-4 filled shapes of the
DEMO_CATEGORIES (rectangles, ellipses, triangles; 16-56 px, random colours, possibly overlapping). The layout is
COCO 2017's: <root>/train2017/*.jpg, val2017/*.jpg, annotations/instances_{train,val}2017.json, so the real COCO
loaders read it unchanged. The category ids are not contiguous (1, 3, 7), like COCO's, so the label maps are used.
Deterministic from the seed: the same files (bytes, for one Pillow version) on every machine.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from rankkd.data.demo import build_in_cache

DEMO_CATEGORIES = ({"id": 1, "name": "rectangle"}, {"id": 3, "name": "ellipse"}, {"id": 7, "name": "triangle"})
DEMO_IMAGE_SIZE = 128
DEMO_NUM_TRAIN = 480
DEMO_NUM_VAL = 120
# Loader settings sized for the demo's 128 px images and a 2-core CPU (make_coco_loaders keyword arguments); the
# detector's are rankkd.detection.zoo.DEMO_DETECTOR.
DEMO_LOADER = {"train_sizes": (96, 112, 128, 144, 160), "test_size": 128, "max_size": 213}
_SEED = 0
_DIR_NAME = f"shapes-coco-{DEMO_IMAGE_SIZE}px-v1"
_JPEG_QUALITY = 92


def _draw_image(rng, size):
    """One image (PIL) and its objects as (category id, [x, y, w, h]) in pixels."""
    from PIL import Image, ImageDraw

    tint = rng.integers(40, 216, size=3)
    background = tint + rng.normal(0, 24, size=(size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.integers(1, 5)):
        category = DEMO_CATEGORIES[rng.integers(len(DEMO_CATEGORIES))]["id"]
        w, h = rng.integers(16, 57, size=2)
        x, y = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
        # Far from the background tint so that every object is visible.
        colour = tuple(int(c) for c in (tint + 128 + rng.integers(-40, 41, size=3)) % 256)
        corners = [int(x), int(y), int(x + w - 1), int(y + h - 1)]
        if category == 1:
            draw.rectangle(corners, fill=colour)
        elif category == 3:
            draw.ellipse(corners, fill=colour)
        else:
            apex = int(x + rng.integers(0, w))
            draw.polygon([(apex, int(y)), (int(x), int(y + h - 1)), (int(x + w - 1), int(y + h - 1))], fill=colour)
        objects.append((category, [float(x), float(y), float(w), float(h)]))
    return image, objects


def _write_split(folder, split, count, rng, first_id):
    images, annotations = [], []
    (folder / split).mkdir(parents=True)
    for image_id in range(first_id, first_id + count):
        image, objects = _draw_image(rng, DEMO_IMAGE_SIZE)
        file_name = f"{image_id:012d}.jpg"
        image.save(folder / split / file_name, quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "width": DEMO_IMAGE_SIZE, "height": DEMO_IMAGE_SIZE})
        for category, box in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    content = {"images": images, "annotations": annotations, "categories": [dict(c, supercategory="shape")
                                                                            for c in DEMO_CATEGORIES]}
    (folder / "annotations").mkdir(exist_ok=True)
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))


def _write_set(folder):
    rng = np.random.default_rng(_SEED)
    _write_split(folder, "train2017", DEMO_NUM_TRAIN, rng, first_id=1)
    _write_split(folder, "val2017", DEMO_NUM_VAL, rng, first_id=DEMO_NUM_TRAIN + 1)


def prepare_demo_coco(cache_dir: str | os.PathLike | None = None) -> Path:
    """The root of the demo set, generating it on first use (rankkd.data.demo.build_in_cache: under cache_dir, else
    $RANKKD_CACHE, else ~/.cache/rankkd; an interrupted build leaves no partial set)."""
    return build_in_cache(_DIR_NAME, _write_set, cache_dir)
