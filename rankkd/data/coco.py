"""COCO 2017 detection data: checked before training, read per rank, resized and flipped as detectron2 does.

Layout (the official zips unpacked into one root): train2017/, val2017/, annotations/instances_train2017.json,
annotations/instances_val2017.json. check_coco(root) reads both annotation files and refuses, with one line naming
the file and the fix, anything that would otherwise fail hours into a run: a missing file or folder, an annotation
naming an image the listing lacks or whose file is missing, an unknown category, a box of non-positive size.

Labels: the K category ids, sorted, map to 1..K (0 is the background column of the detector); label_to_category
maps back for evaluation. Training, as detectron2: crowd annotations are ignored and images with no other annotation
skipped; the shorter side is resized to a size drawn from train_sizes (detectron2: 640-800 step 32) with the longer
side capped at max_size (1333), then a horizontal flip with probability 0.5 moves the boxes with the image.
Validation: every listed image, resized to test_size / max_size (800 / 1333), each read by exactly one rank.

The loaders are rankkd.data.coco_loaders (torchvision's) and rankkd.data.coco_dali.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rankkd.data.demo import default_cache_dir
from rankkd.data.folder import default_check_workers, image_problem
from rankkd.data.sharding import TrainShard

TRAIN_SIZES = (640, 672, 704, 736, 768, 800)  # detectron2's MIN_SIZE_TRAIN of Base-RCNN-FPN
TEST_SIZE = 800
MAX_SIZE = 1333
SPLITS = ("train2017", "val2017")


@dataclass
class CocoSplit:
    """One split as the loaders read it: per image its id, file, original (height, width), and for training the
    non-crowd boxes (xyxy, original pixels) with their contiguous labels."""
    name: str
    image_dir: Path
    annotation_file: Path
    image_ids: list[int]
    files: list[Path]
    sizes: list[tuple[int, int]]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (file, why) of unreadable images

    def __len__(self) -> int:
        return len(self.image_ids)

    def left_out_note(self) -> str | None:
        """One line naming the unreadable images this split leaves out (the first three), or None."""
        if not self.left_out:
            return None
        shown = "; ".join(f"{file} ({why})" for file, why in self.left_out[:3])
        more = f"; and {len(self.left_out) - 3} more" if len(self.left_out) > 3 else ""
        total = len(self) + len(self.left_out)
        return f"{self.name}: trains without {len(self.left_out)} unreadable image(s) of {total}: {shown}{more}"


@dataclass
class CocoDataset:
    root: Path
    train: CocoSplit
    val: CocoSplit
    category_ids: list[int]                  # sorted; label i + 1 is category_ids[i]
    category_names: list[str]

    @property
    def num_classes(self) -> int:
        """Class columns of the detector: the categories plus the background."""
        return len(self.category_ids) + 1

    @property
    def label_to_category(self) -> dict[int, int]:
        return {label: category for label, category in enumerate(self.category_ids, start=1)}

    @property
    def category_to_label(self) -> dict[int, int]:
        return {category: label for label, category in enumerate(self.category_ids, start=1)}


def _refuse(problem, fix):
    raise ValueError(f"{problem}; {fix}")


# ---------------------------------------------------------------------------------------------------------------------
# The annotation files: read whole, then every field the trainer, the loaders and COCOeval read checked for its type
# and range, so that nothing malformed reaches DALI's reader or pycocotools mid-run.


def _load_json(path):
    """An annotation file's JSON. Python's reader stops at its recursion limit (about a thousand levels; a COCO
    instances file nests five), which is the nesting limit: deeper is refused like any other malformed file."""
    redownload = "re-download annotations_trainval2017.zip"
    try:
        return json.loads(path.read_bytes())
    except OSError as error:
        _refuse(f"cannot read {str(path)!r}: {error.strerror or error}", "check its permissions")
    except RecursionError:
        _refuse(f"{str(path)!r} nests arrays or objects deeper than the JSON reader's limit (a COCO instances file "
                "nests 5 levels)", redownload)
    except ValueError as error:  # JSONDecodeError, and UnicodeDecodeError for bytes that are no UTF-8 text
        _refuse(f"{str(path)!r} is not a JSON file ({error})", redownload)


class _Schema:
    """Type and range checks of one annotation file's values, refusing with the file and the value's JSON path."""

    def __init__(self, path):
        self.path = path

    def refuse(self, where, problem):
        _refuse(f"{str(self.path)!r} at {where}: {problem}", "fix that value, or re-download the file")

    def field(self, record, where, key, kind):
        """record[key], refused unless present and of `kind` (a predicate whose docstring names what it accepts).
        where: the record's JSON path ("" at the top level)."""
        if key not in record:
            self.refuse(where or "the top level", f"missing {key!r}")
        value = record[key]
        if not kind(value):
            self.refuse(f"{where}.{key}" if where else key, f"expected {kind.__doc__}, got {_shown(value)}")
        return value

    def records(self, content, key):
        value = self.field(content, "", key, _is_list)
        for index, record in enumerate(value):
            if not isinstance(record, dict):
                self.refuse(f"{key}[{index}]", f"expected an object, got {_json_type(record)}")
        return value


def _is_list(value):
    """a list"""
    return isinstance(value, list)


def _is_int(value):
    """an integer"""
    return type(value) is int


def _is_size(value):
    """an integer >= 1"""
    return type(value) is int and value >= 1


def _is_name(value):
    """a non-empty string"""
    return isinstance(value, str) and bool(value)


def _is_finite(value):
    """a finite number"""
    return type(value) in (int, float) and math.isfinite(value)


def _is_box(value):
    """a list of 4 numbers (x, y, width, height)"""
    return isinstance(value, list) and len(value) == 4


def _json_type(value):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _shown(value):
    return _json_type(value) if isinstance(value, (dict, list)) else repr(value)[:40]


def _check_records(path, content):
    """The images, annotations and categories of one instances file, every value read from them checked."""
    schema = _Schema(path)
    images, annotations, categories = (schema.records(content, key) for key in ("images", "annotations",
                                                                                 "categories"))
    for key, records, fields in (("categories", categories, (("id", _is_int), ("name", _is_name))),
                                 ("images", images, (("id", _is_int), ("file_name", _is_name), ("height", _is_size),
                                                     ("width", _is_size)))):
        seen = set()
        for index, record in enumerate(records):
            for name, kind in fields:
                schema.field(record, f"{key}[{index}]", name, kind)
            if record["id"] in seen:
                schema.refuse(f"{key}[{index}].id", f"id {record['id']} is listed twice")
            seen.add(record["id"])
    seen = set()
    for index, annotation in enumerate(annotations):
        where = f"annotations[{index}]"
        for name, kind in (("id", _is_int), ("image_id", _is_int), ("category_id", _is_int), ("bbox", _is_box),
                           ("area", _is_finite)):  # COCOeval sorts the ground truth into size ranges by area
            schema.field(annotation, where, name, kind)
        for position, value in enumerate(annotation["bbox"]):
            if not _is_finite(value):
                schema.refuse(f"{where}.bbox[{position}]", f"expected a finite number, got {_shown(value)}")
        if annotation["id"] in seen:
            schema.refuse(f"{where}.id", f"id {annotation['id']} is listed twice")
        seen.add(annotation["id"])
    return images, annotations, categories


def _read_annotations(root, split):
    path, folder = root / "annotations" / f"instances_{split}.json", root / split
    if not path.is_file():
        _refuse(f"COCO annotation file {str(path)!r} is missing",
                f"unzip annotations_trainval2017.zip (cocodataset.org) into {str(root)!r}")
    if not folder.is_dir():
        _refuse(f"COCO image folder {str(folder)!r} is missing", f"unzip {split}.zip (cocodataset.org) into "
                f"{str(root)!r}")
    content = _load_json(path)
    if not isinstance(content, dict):
        _refuse(f"{str(path)!r} is not a COCO instances file (its top level is {_json_type(content)}, not an object)",
                "re-download annotations_trainval2017.zip")
    return path, folder, *_check_records(path, content)


def _check_annotation(annotation, path, images_by_id, category_ids):
    where = f"annotation {annotation['id']} of {str(path)!r}"
    if annotation["image_id"] not in images_by_id:
        _refuse(f"{where} names image id {annotation['image_id']!r}, which the file's 'images' list lacks",
                "fix or remove that annotation, or re-download the file")
    if annotation["category_id"] not in category_ids:
        _refuse(f"{where} has category_id {annotation['category_id']!r}, not in the file's 'categories' "
                f"{sorted(category_ids)}", "fix or remove that annotation")
    if type(annotation.get("iscrowd", 0)) is not int or annotation.get("iscrowd", 0) not in (0, 1):
        # DALI's COCO reader misreads the annotations that follow any other value (a JSON true, for one).
        _refuse(f"{where} has iscrowd {annotation.get('iscrowd')!r}; COCO writes 0 or 1",
                "write iscrowd as the integer 0 or 1")
    box = annotation["bbox"]
    if not (box[2] > 0 and box[3] > 0):
        _refuse(f"{where} has a box of non-positive size, bbox {box!r} (x, y, width, height)",
                "fix or remove that annotation")


# ---------------------------------------------------------------------------------------------------------------------
# The image files: each one's real size read from its header and compared with the size the annotation file claims
# (boxes are scaled by it, in training and in scoring), and its integrity checked as far as that is cheap.


# A file renamed so (rankkd.data.folder.EXCLUDE_HINT) is left out: of training, with a note.
_EXCLUDED_SUFFIX = ".unreadable"


def _image_header(path):
    """(height, width) as the file's header states them, and why the file can't be read (None: it can). The image is
    decoded whole: damage inside a complete JPEG (a broken entropy-coded segment, a bad marker) is found only so, and
    found here it leaves one training image out instead of stopping a run mid-epoch. PIL's decoder refuses more
    damaged files than DALI's does, so what passes here decodes in the loaders too."""
    from PIL import Image

    problem = image_problem(str(path), full=True)
    if problem is not None:
        return None, problem
    with Image.open(path) as image:
        return (image.height, image.width), None


def _read_headers(folder, names, *, cache_dir):
    """_image_header of each of `names` in `folder`, read by threads (PIL decodes without holding the GIL), and
    cached in `cache_dir` by the files' size and modification time: a second run reads none of the files again."""
    cache_file = Path(cache_dir) / "coco-image-headers" / (
        hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16] + ".json")
    try:
        cached = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cached = {}

    def header(name):
        stat = os.stat(folder / name)
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = cached.get(name)
        if not (isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("decoded")):
            size, problem = _image_header(folder / name)
            entry = {"stamp": stamp, "size": size, "problem": problem, "decoded": True}
        return name, entry

    with ThreadPoolExecutor(default_check_workers()) as pool:
        found = dict(pool.map(header, names))
    if found != {name: cached.get(name) for name in names}:
        _write_cache(cache_file, cached | found)
    return {name: (tuple(entry["size"]) if entry["size"] else None, entry["problem"]) for name, entry in found.items()}


def _write_cache(path, entries):
    """Replace the cache file whole (a temporary file renamed over it). The cache only saves time: a cache folder
    that can't be written is no reason to stop."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(descriptor, "w") as file:
            json.dump(entries, file)
        os.replace(temporary, path)
    except OSError:
        pass


def _check_image_files(root, split, folder, path, images_by_id, kept, *, training, cache_dir):
    """The ids of `kept` whose files are whole and of the size the annotation file states, and (file, reason) of
    the training images left out: renamed to FILE.unreadable, or found unreadable. Any problem in a validation image
    refuses the set instead: box AP over fewer images than the file lists would not compare with anyone's."""
    present = set(os.listdir(folder))
    readable, left_out = [], {}
    for image_id in kept:
        name = images_by_id[image_id]["file_name"]
        if name in present:
            readable.append(image_id)
        elif name + _EXCLUDED_SUFFIX in present and training:
            left_out[image_id] = (str(folder / name), f"renamed to {name}{_EXCLUDED_SUFFIX}")
        else:
            excluded = " (renamed to .unreadable: validation images can't be left out)" if (
                name + _EXCLUDED_SUFFIX in present) else ""
            _refuse(f"image file {str(folder / name)!r} (image id {image_id} of {str(path)!r}) is missing{excluded}",
                    f"unzip {split}.zip (cocodataset.org) into {str(root)!r} again")
    headers = _read_headers(folder, [images_by_id[i]["file_name"] for i in readable], cache_dir=cache_dir)
    whole = []
    for image_id in readable:
        image = images_by_id[image_id]
        size, problem = headers[image["file_name"]]
        file = str(folder / image["file_name"])
        if problem is not None and training:
            left_out[image_id] = (file, problem)
            continue
        if problem is not None:
            _refuse(f"validation image {file!r} (image id {image_id} of {str(path)!r}) can't be read: {problem}",
                    f"replace it (unzip {split}.zip again), or remove it and its annotations from the file")
        if size != (image["height"], image["width"]):
            _refuse(f"image file {file!r} is {size[1]}x{size[0]} pixels, but image id {image_id} of {str(path)!r} "
                    f"claims {image['width']}x{image['height']} (width x height)",
                    "fix its width and height in the file, or re-download the file and the images")
        whole.append(image_id)
    return whole, [left_out[image_id] for image_id in sorted(left_out)]


@dataclass
class _Annotated:
    """One split's annotation file, read and checked, before its image files are."""
    split: str
    path: Path
    folder: Path
    images_by_id: dict
    objects: dict                            # image id -> its annotations the split uses
    category_ids: list[int]
    category_names: list[str]
    training: bool


def _read_split_annotations(root, split, *, training):
    path, folder, images, annotations, categories = _read_annotations(root, split)
    category_ids = sorted(category["id"] for category in categories)
    images_by_id = {image["id"]: image for image in images}
    objects = {image_id: [] for image_id in images_by_id}
    for annotation in annotations:
        _check_annotation(annotation, path, images_by_id, set(category_ids))
        if not (training and annotation.get("iscrowd", 0)):  # detectron2 trains without crowd boxes
            objects[annotation["image_id"]].append(annotation)
    if not training and not any(not annotation.get("iscrowd", 0) for annotation in annotations):
        _refuse(f"{str(path)!r} has no annotation but crowd ones: box AP would be undefined (NaN) at every epoch",
                "use the full val2017 annotations")
    names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
    return _Annotated(split, path, folder, images_by_id, objects, category_ids, names, training)


def _read_split(root, annotated, cache_dir):
    images_by_id, objects = annotated.images_by_id, annotated.objects
    label_of = {category: label for label, category in enumerate(annotated.category_ids, start=1)}
    # Training skips images without (non-crowd) objects, as detectron2's FILTER_EMPTY_ANNOTATIONS.
    kept = sorted(i for i in images_by_id if objects[i] or not annotated.training)
    kept, left_out = _check_image_files(root, annotated.split, annotated.folder, annotated.path, images_by_id, kept,
                                        training=annotated.training, cache_dir=cache_dir)
    boxes, labels = [], []
    for image_id in kept:
        xywh = np.array([a["bbox"] for a in objects[image_id]], dtype=np.float32).reshape(-1, 4)
        boxes.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
        labels.append(np.array([label_of[a["category_id"]] for a in objects[image_id]], dtype=np.int64))
    files = [annotated.folder / images_by_id[i]["file_name"] for i in kept]
    return CocoSplit(annotated.split, annotated.folder, annotated.path, kept, files,
                     [(images_by_id[i]["height"], images_by_id[i]["width"]) for i in kept], boxes, labels, left_out)


def check_coco(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> CocoDataset:
    """Reads and checks a COCO-2017-layout root (module docstring): both annotation files first, then the image
    files they list. A ValueError of one line names the first problem's file and the fix. Returns the parsed
    dataset, so nothing is read twice. cache_dir keeps what the image headers said (default: $RANKKD_CACHE, else
    ~/.cache/rankkd)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        _refuse(f"COCO root {str(root)!r} is not a folder", "pass the folder holding train2017/, val2017/ and "
                "annotations/")
    train, val = (_read_split_annotations(root, split, training=split == SPLITS[0]) for split in SPLITS)
    if train.category_ids != val.category_ids:
        _refuse(f"the categories of {str(train.path)!r} and {str(val.path)!r} differ",
                "use the annotation files of one release")
    if not any(train.objects.values()):
        _refuse(f"{str(train.path)!r} has no image with a non-crowd annotation", "nothing to train on")
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    train_split, val_split = (_read_split(root, annotated, cache_dir) for annotated in (train, val))
    if not len(train_split):
        file, problem = train_split.left_out[0]
        _refuse(f"all {len(train_split.left_out)} images of {str(train.path)!r} with a non-crowd annotation are "
                f"unreadable (the first: {file}, {problem})", "replace the files")
    return CocoDataset(root, train_split, val_split, train.category_ids, train.category_names)


def resized_shape(height: int, width: int, shorter: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge: the shorter side to `shorter` unless the longer then exceeds max_size."""
    scale = shorter / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def sample_augmentation(seed: int | None, sizes: tuple[int, ...], flip: bool) -> tuple[int, bool]:
    """The shorter side and the flip of the sample whose augmentation seed is `seed` (None: sizes[0], no flip).
    Every loader draws them here, so the backends augment a given sample of a pass alike."""
    if seed is None:
        return sizes[0], False
    rng = np.random.default_rng(seed)
    shorter = int(sizes[rng.integers(len(sizes))])
    return shorter, bool(flip and rng.random() < 0.5)


def pass_samples(shard: TrainShard) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the split, augmentation seeds) of the shard's current pass, in reading order."""
    indices = shard.epoch_indices()
    return indices, np.random.default_rng(shard.epoch_augmentation_seed()).integers(0, 2**63 - 1, size=len(indices))


def drop_empty_boxes(boxes: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Without the boxes that clipping to the image left with no area (they lay outside it): they cannot be
    matched."""
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """xyxy boxes of an image of `width` pixels, mirrored left to right."""
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return flipped
