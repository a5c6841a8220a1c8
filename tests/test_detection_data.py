"""COCO data (rankkd.data.coco) and the demo set (rankkd.data.coco_demo): checks, labels, loaders, sharding."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import needs_dali, write_coco

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from rankkd.data.coco import check_coco, flip_boxes, resized_shape  # noqa: E402
from rankkd.data.coco_loaders import (CocoTrainLoader, CocoValLoader, SyntheticDetectionLoader,  # noqa: E402
                                      _CocoImages)
from rankkd.data.coco_demo import DEMO_CATEGORIES, DEMO_IMAGE_SIZE, prepare_demo_coco  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def image_header_cache(tmp_path_factory, monkeypatch):
    """check_coco's cache of image headers, private to each test."""
    monkeypatch.setenv("RANKKD_CACHE", str(tmp_path_factory.mktemp("cache")))


def refusal(root):
    with pytest.raises(ValueError) as info:
        check_coco(root)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return prepare_demo_coco(tmp_path_factory.mktemp("cache"))


def test_demo_set_is_valid_coco(demo_root):
    from rankkd.detection.evaluate import load_coco_gt

    for split in ("train2017", "val2017"):
        coco = load_coco_gt(demo_root / "annotations" / f"instances_{split}.json")
        assert [c["id"] for c in coco.loadCats(coco.getCatIds())] == [c["id"] for c in DEMO_CATEGORIES]
        assert len(coco.getImgIds()) >= 100
        for annotation in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = annotation["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= DEMO_IMAGE_SIZE and y + h <= DEMO_IMAGE_SIZE
        for image in coco.loadImgs(coco.getImgIds()):
            assert (demo_root / split / image["file_name"]).is_file()
            assert 1 <= len(coco.getAnnIds(imgIds=image["id"])) <= 4
    assert prepare_demo_coco(demo_root.parent) == demo_root  # cached: found, not rebuilt
    assert not [p for p in demo_root.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_demo_set_checks_and_maps_labels(demo_root):
    dataset = check_coco(demo_root)
    assert dataset.num_classes == len(DEMO_CATEGORIES) + 1
    assert dataset.label_to_category == {1: 1, 2: 3, 3: 7}
    assert dataset.category_to_label == {1: 1, 3: 2, 7: 3}
    assert all(labels.min() >= 1 and labels.max() <= 3 for labels in dataset.train.labels)


def test_missing_annotation_file(tmp_path):
    root = write_coco(tmp_path)
    (root / "annotations" / "instances_val2017.json").unlink()
    assert "instances_val2017.json" in refusal(root) and "annotations_trainval2017.zip" in refusal(root)


def test_missing_image_folder(tmp_path):
    root = write_coco(tmp_path)
    for file in (root / "train2017").iterdir():
        file.unlink()
    (root / "train2017").rmdir()
    assert "train2017" in refusal(root) and "is missing" in refusal(root)


def test_annotation_naming_an_unlisted_image(tmp_path):
    root = write_coco(tmp_path, val=[(1, 40, 30, [{"bbox": [1, 1, 5, 5], "category_id": 2, "image_id": 9}])])
    message = refusal(root)
    assert "instances_val2017.json" in message and "image id 9" in message


def test_annotation_naming_a_missing_image_file(tmp_path):
    root = write_coco(tmp_path)
    (root / "train2017" / "1.png").unlink()
    message = refusal(root)
    assert "1.png" in message and "instances_train2017.json" in message


def test_unknown_category(tmp_path):
    root = write_coco(tmp_path, train=[(1, 40, 30, [{"bbox": [1, 1, 5, 5], "category_id": 4}])])
    message = refusal(root)
    assert "instances_train2017.json" in message and "category_id 4" in message


@pytest.mark.parametrize("box", [[1, 1, 0, 5], [1, 1, 5, -2]])
def test_box_of_non_positive_size(tmp_path, box):
    root = write_coco(tmp_path, val=[(1, 40, 30, [{"bbox": [1, 1, 5, 5], "category_id": 2},
                                                  {"bbox": box, "category_id": 5}])])
    message = refusal(root)
    assert "instances_val2017.json" in message and "non-positive size" in message


@pytest.mark.parametrize("iscrowd", [True, 2, "0"])
def test_iscrowd_other_than_0_or_1(tmp_path, iscrowd):
    root = write_coco(tmp_path, train=[(1, 40, 30, [{"bbox": [1, 1, 5, 5], "category_id": 2, "iscrowd": iscrowd}])])
    message = refusal(root)
    assert "instances_train2017.json" in message and "iscrowd" in message and "0 or 1" in message


def test_crowd_ignored_and_empty_images_skipped_in_training(tmp_path):
    crowd = {"bbox": [20, 10, 8, 8], "category_id": 5, "iscrowd": 1}
    root = write_coco(tmp_path, train=[(1, 40, 30, [{"bbox": [2, 3, 10, 6], "category_id": 5}, crowd]),
                                       (2, 40, 30, [crowd]), (3, 40, 30, [])],
                      val=[(7, 40, 30, [{"bbox": [2, 3, 10, 6], "category_id": 2}, crowd]), (8, 40, 30, [])])
    dataset = check_coco(root)
    assert dataset.train.image_ids == [1]
    np.testing.assert_array_equal(dataset.train.boxes[0], [[2, 3, 12, 9]])
    np.testing.assert_array_equal(dataset.train.labels[0], [2])
    assert dataset.val.image_ids == [7, 8]  # evaluation reads every image


def test_resized_shape_follows_detectron2():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)
    assert resized_shape(30, 40, 30, 100) == (30, 40)


def test_flip_moves_boxes_with_the_image(tmp_path):
    np.testing.assert_array_equal(flip_boxes(np.array([[2.0, 3, 10, 9]]), 40), [[30, 3, 38, 9]])
    root = write_coco(tmp_path, train=[(1, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2}])])
    images = _CocoImages(check_coco(root).train, sizes=(60,), max_size=200, flip=True)
    seen = set()
    for seed in range(12):
        pixels, boxes, labels, image_id = images[(0, seed)]
        assert pixels.shape == (3, 60, 80) and pixels.dtype == torch.uint8 and image_id == 1
        x0, y0, x1, y1 = boxes[0].round().int().tolist()
        seen.add(x0)
        inside = pixels[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1].float().mean()
        assert inside > 250 and pixels.float().sum() / 255 / 3 < (x1 - x0 + 2) * (y1 - y0 + 2)
    assert seen == {8, 52}  # scaled by 2, flipped and not: both happened


def demo_dataset(demo_root):
    return check_coco(demo_root)


def test_every_val_image_once_across_two_ranks(demo_root):
    dataset = demo_dataset(demo_root)
    seen = []
    for rank in range(2):
        loader = CocoValLoader(dataset.val, batch_size=16, rank=rank, world_size=2, device=CPU, num_workers=0,
                               size=64, max_size=100)
        assert loader.backend == "torchvision" and loader.num_samples == len(loader.image_ids)
        batches = list(loader)
        assert len(batches) == len(loader)
        for images, ids in batches:
            assert images[0].dtype == torch.float32 and images[0].shape[0] == 3 and min(images[0].shape[1:]) == 64
            seen += ids
    assert sorted(seen) == sorted(dataset.val.image_ids)


def test_train_loader_protocol_and_determinism(demo_root):
    dataset = demo_dataset(demo_root)
    kwargs = dict(batch_size=4, world_size=2, device=CPU, seed=3, sizes=(48, 64), max_size=100)
    loaders = [CocoTrainLoader(dataset.train, rank=rank, num_workers=0, **kwargs) for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == len(dataset.train) // 8
    assert loaders[0].num_samples == 4 * len(loaders[0])
    first = []
    for loader in loaders:
        loader.set_epoch(1)
        images, targets = next(iter(loader))
        assert len(images) == 4 and all(image.max() <= 1 and image.min() >= 0 for image in images)
        assert all(min(image.shape[1:]) in (48, 64) for image in images)
        assert targets[0]["boxes"].dtype == torch.float32 and targets[0]["labels"].dtype == torch.int64
        first.append((images, targets))
    assert not torch.equal(first[0][0][0], first[1][0][0])  # the ranks read different images
    # The same (seed, epoch, rank) gives the same batch with worker processes as without.
    with_workers = CocoTrainLoader(dataset.train, rank=0, num_workers=1, **kwargs)
    with_workers.set_epoch(1)
    images, targets = next(iter(with_workers))
    assert all(torch.equal(a, b) for a, b in zip(images, first[0][0]))
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, first[0][1]))
    with_workers.set_epoch(2)
    assert not torch.equal(next(iter(with_workers))[0][0], first[0][0][0])


def test_synthetic_loader():
    loader = SyntheticDetectionLoader(batch_size=2, image_size=(40, 60), num_classes=5, steps=3, device=CPU, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 3 and loader.num_samples == 6
    images, targets = batches[0]
    assert images[0].shape == (3, 40, 60)
    boxes = targets[0]["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
    assert targets[0]["labels"].min() >= 1 and targets[0]["labels"].max() < 5


def varied_coco(root):
    """Non-square images of several sizes, two categories, a crowd box (ignored in training) and an image whose only
    box is crowd (skipped in training)."""
    rng = np.random.default_rng(0)
    images = []
    for image_id in range(1, 15):
        width, height = int(rng.integers(30, 90)), int(rng.integers(24, 70))
        x, y = int(rng.integers(0, width - 12)), int(rng.integers(0, height - 10))
        w, h = int(rng.integers(6, width - x)), int(rng.integers(5, height - y))
        annotations = [{"bbox": [x, y, w, h], "category_id": (2, 5)[image_id % 2]},
                       {"bbox": [1, 1, 4, 3], "category_id": (5, 2)[image_id % 2], "iscrowd": int(image_id % 3 == 0)}]
        images.append((image_id, width, height, annotations))
    images.append((99, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2, "iscrowd": 1}]))
    return check_coco(write_coco(root, train=images, val=images))


def coco_loaders(dataset, backend, **overrides):
    from rankkd.data.coco_loaders import make_coco_loaders

    kwargs = dict(batch_size=3, val_batch_size=4, rank=0, world_size=1, device=CPU, seed=5, num_workers=1,
                  train_sizes=(24, 40, 56), test_size=40, max_size=80) | overrides
    return make_coco_loaders(dataset, backend=backend, **kwargs)


def test_backend_auto_picks_an_installed_loader(tmp_path):
    train, val = coco_loaders(varied_coco(tmp_path), "auto")
    expected = "dali" if importlib.util.find_spec("nvidia.dali") else "torchvision"
    assert train.backend == val.backend == expected


@needs_dali
def test_dali_reads_what_the_torchvision_loader_reads(tmp_path):
    """Same order, sizes, flips, boxes and labels on either backend; the pixels differ only by the resampling
    filter; and every white rectangle lies inside its box, so the boxes follow the resized and flipped image."""
    dataset = varied_coco(tmp_path)
    assert 99 not in dataset.train.image_ids and len(dataset.train) == 14
    (dali_train, dali_val), (torchvision_train, torchvision_val) = (coco_loaders(dataset, backend)
                                                                   for backend in ("dali", "torchvision"))
    flipped_and_not = set()
    for epoch in (0, 1):
        for loader in (dali_train, torchvision_train):
            loader.set_epoch(epoch)
        pairs = list(zip(dali_train, torchvision_train, strict=True))
        assert len(pairs) == len(dali_train) == 14 // 3
        for (dali_images, dali_targets), (torchvision_images, torchvision_targets) in pairs:
            for image, target, expected_image, expected in zip(dali_images, dali_targets, torchvision_images,
                                                               torchvision_targets, strict=True):
                assert image.dtype == torch.float32 and image.shape == expected_image.shape
                assert min(image.shape[1:]) in (24, 40, 56) or max(image.shape[1:]) == 80
                assert (image - expected_image).abs().mean() < 0.03
                assert torch.equal(target["labels"], expected["labels"])
                torch.testing.assert_close(target["boxes"], expected["boxes"], atol=1e-3, rtol=0)
                x0, y0, x1, y1 = target["boxes"][0].tolist()
                inside = image[:, math.ceil(y0) + 1:int(y1) - 1, math.ceil(x0) + 1:int(x1) - 1]
                assert inside.numel() == 0 or inside.mean() > 0.9
                flipped_and_not.add(bool(image[:, :, :image.shape[2] // 2].sum() > image[:, :, image.shape[2] // 2:].sum()))
    assert flipped_and_not == {True, False}
    for (images, ids), (expected_images, expected_ids) in zip(dali_val, torchvision_val, strict=True):
        assert ids == expected_ids
        assert [image.shape for image in images] == [image.shape for image in expected_images]
    assert sorted(dali_val.image_ids) == sorted(dataset.val.image_ids)


@needs_dali
def test_dali_resumes_mid_pass_exactly_whatever_the_threads(tmp_path):
    dataset = varied_coco(tmp_path)
    whole, _ = coco_loaders(dataset, "dali", batch_size=2)
    resumed, _ = coco_loaders(dataset, "dali", batch_size=2, num_workers=2)
    for loader in (whole, resumed):
        loader.set_epoch(3)
    expected = list(whole)[4:]
    got = list(resumed.batches_from(4))
    assert len(got) == len(expected) == len(whole) - 4
    for (images, targets), (expected_images, expected_targets) in zip(got, expected):
        assert all(torch.equal(a, b) for a, b in zip(images, expected_images, strict=True))
        assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
                   for a, b in zip(targets, expected_targets, strict=True))


@needs_dali
def test_dali_shards_train_and_val_across_ranks(tmp_path):
    dataset = varied_coco(tmp_path)
    train_labels, val_ids = [], []
    for rank in range(2):
        train, val = coco_loaders(dataset, "dali", rank=rank, world_size=2, batch_size=2)
        train.set_epoch(0)
        train_labels.append([target["labels"].tolist() for _, targets in train for target in targets])
        val_ids += [image_id for _, ids in val for image_id in ids]
        indices = train.epoch_indices()
        assert train_labels[-1] == [dataset.train.labels[i].tolist() for i in indices]
    assert len(train_labels[0]) == len(train_labels[1]) == 6
    assert sorted(val_ids) == sorted(dataset.val.image_ids)


@needs_dali
def test_dali_names_an_image_that_does_not_decode(tmp_path):
    from rankkd.data import BadImageError

    dataset = varied_coco(tmp_path)
    train, _ = coco_loaders(dataset, "dali")
    broken = dataset.train.files[train.epoch_indices()[4]]  # read in the second batch
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with pytest.raises(BadImageError, match=str(broken.name)):
        list(train)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_dali
def test_dali_decodes_on_the_gpu_as_on_the_cpu(tmp_path):
    dataset = varied_coco(tmp_path)
    (gpu_train, _), (cpu_train, _) = coco_loaders(dataset, "dali", device=torch.device("cuda")), \
        coco_loaders(dataset, "dali")
    for (images, targets), (cpu_images, cpu_targets) in zip(gpu_train, cpu_train, strict=True):
        assert all(image.is_cuda for image in images) and all(t["boxes"].is_cuda for t in targets)
        assert all((a.cpu() - b).abs().mean() < 0.03 for a, b in zip(images, cpu_images))
        assert all(torch.equal(a["labels"].cpu(), b["labels"]) for a, b in zip(targets, cpu_targets))



# ---------------------------------------------------------------------------------------------------------------------
# Everything read from disk checked before training: the annotation files to the last field, the images' real sizes
# against the claimed ones, the images' integrity where it is cheap.


class Text(str):
    """What an edit of an annotation file returns to replace its whole text."""


def _edit_annotations(root, split, edit):
    """edit(content) changes the parsed file in place, or returns the file's new Text."""
    path = root / "annotations" / f"instances_{split}.json"
    content = json.loads(path.read_text())
    text = edit(content)
    path.write_text(text if isinstance(text, Text) else json.dumps(content))
    return path


SCHEMA_CASES = {  # name: (edit of the parsed file, expected JSON path, problem)
    "bbox value a string": (lambda c: c["annotations"][0]["bbox"].__setitem__(2, "10"),
                            "annotations[0].bbox[2]", "expected a finite number, got '10'"),
    "infinite bbox width": (lambda c: Text(json.dumps(c).replace("[4, 5, 10, 8]", "[4, 5, Infinity, 8]")),
                            "annotations[0].bbox[2]", "expected a finite number, got inf"),
    "bbox overflowing to inf": (lambda c: Text(json.dumps(c).replace("[4, 5, 10, 8]", "[4, 5, 10, 1e999]")),
                                "annotations[0].bbox[3]", "expected a finite number, got inf"),
    "bbox of 3 values": (lambda c: c["annotations"][0]["bbox"].pop(), "annotations[0].bbox",
                         "expected a list of 4 numbers (x, y, width, height), got a list"),
    "images an object": (lambda c: c.__setitem__("images", {"1": c["images"][0]}), "images",
                         "expected a list, got an object"),
    "image without height": (lambda c: c["images"][0].pop("height"), "images[0]", "missing 'height'"),
    "height a float": (lambda c: c["images"][0].__setitem__("height", 30.0), "images[0].height",
                       "expected an integer >= 1, got 30.0"),
    "file name null": (lambda c: c["images"][0].__setitem__("file_name", None), "images[0].file_name",
                       "expected a non-empty string, got None"),
    "annotation a list": (lambda c: c["annotations"].append([1, 2]), "annotations[1]",
                          "expected an object, got a list"),
    "area NaN": (lambda c: Text(json.dumps(c).replace('"area": 1.0', '"area": NaN')), "annotations[0].area",
                 "expected a finite number, got nan"),
    "image id twice": (lambda c: c["images"].append(dict(c["images"][0])), "images[1].id", "id 1 is listed twice"),
    "category without name": (lambda c: c["categories"][1].pop("name"), "categories[1]", "missing 'name'"),
    "no categories": (lambda c: c.pop("categories"), "the top level", "missing 'categories'"),
}


@pytest.mark.parametrize("split", ["train2017", "val2017"])
@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_annotation_files_are_checked_to_the_last_field(tmp_path, split, case):
    edit, where, problem = SCHEMA_CASES[case]
    path = _edit_annotations(write_coco(tmp_path), split, edit)
    assert refusal(tmp_path) == f"{str(path)!r} at {where}: {problem}; fix that value, or re-download the file"


@pytest.mark.parametrize("text, problem", [("[" * 100_000 + "]" * 100_000, "nests arrays or objects deeper than the "
                                            "JSON reader's limit (a COCO instances file nests 5 levels)"),
                                           ("[1, 2]", "is not a COCO instances file (its top level is a list, not "
                                            "an object)"),
                                           ('{"images": [', "is not a JSON file (Expecting value: line 1 column 13")])
def test_annotation_files_that_are_no_instances_file_are_refused(tmp_path, text, problem):
    path = _edit_annotations(write_coco(tmp_path), "val2017", lambda content: Text(text))
    message = refusal(tmp_path)
    assert message.startswith(f"{str(path)!r} {problem}") and "re-download annotations_trainval2017.zip" in message


@pytest.mark.parametrize("val", [[(1, 40, 30, [])], [(1, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2,
                                                                   "iscrowd": 1}])]])
def test_a_val_split_without_annotations_is_refused(tmp_path, val):
    write_coco(tmp_path, val=val)
    assert refusal(tmp_path) == (f"{str(tmp_path / 'annotations' / 'instances_val2017.json')!r} has no annotation but "
                                 "crowd ones: box AP would be undefined (NaN) at every epoch; use the full val2017 "
                                 "annotations")


@pytest.mark.parametrize("split", ["train2017", "val2017"])
@pytest.mark.parametrize("claimed", [(256, 256), (31_623, 31_623)])  # twice the size; 10^9 pixels
def test_image_sizes_are_read_from_the_files_and_compared_with_the_claims(tmp_path, split, claimed):
    rng = np.random.default_rng()
    width, height = (int(value) for value in rng.integers(17, 90, size=2))  # fresh odd sizes
    images = [(1, width, height, [{"bbox": [1, 2, 10, 8], "category_id": 2}]),
              (2, 40, 30, [{"bbox": [3, 3, 5, 5], "category_id": 5}])]
    write_coco(tmp_path, **{"train" if split == "train2017" else "val": images})
    path = _edit_annotations(tmp_path, split, lambda content: content["images"][0].update(
        width=claimed[0], height=claimed[1]))
    assert refusal(tmp_path) == (f"image file {str(tmp_path / split / '1.png')!r} is {width}x{height} pixels, but "
                                 f"image id 1 of {str(path)!r} claims {claimed[0]}x{claimed[1]} (width x height); fix "
                                 "its width and height in the file, or re-download the file and the images")


def _jpeg_bytes(width, height):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng().integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _broken_huffman_table(data):
    """A JPEG whose markers and length are whole but whose entropy coding can't be decoded."""
    start = data.index(b"\xff\xc4") + 5  # the first DHT segment's code counts
    return data[:start] + b"\xff" * 16 + data[start + 16:]


def _as_jpeg(root, split, image_id, data):
    """Image `image_id` of the split replaced by a JPEG file holding `data`, under the name the annotations use."""
    path = root / split / f"{image_id}.jpg"
    (root / split / f"{image_id}.png").unlink()
    path.write_bytes(data)
    _edit_annotations(root, split, lambda content: next(image for image in content["images"]
                                                        if image["id"] == image_id).update(file_name=path.name))
    return path


THREE = [(i, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2}]) for i in (1, 2, 3)]


def test_unreadable_training_images_are_left_out_with_a_note(tmp_path):
    write_coco(tmp_path, train=[(i, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2}]) for i in (1, 2, 3, 4)])
    whole = _jpeg_bytes(40, 30)
    truncated = _as_jpeg(tmp_path, "train2017", 1, whole[: len(whole) // 2])
    # Damage that only decoding finds: before training, not at the batch that holds it in the middle of an epoch.
    undecodable = _as_jpeg(tmp_path, "train2017", 4, _broken_huffman_table(whole))
    (tmp_path / "train2017" / "3.png").rename(tmp_path / "train2017" / "3.png.unreadable")  # the suggested fix
    dataset = check_coco(tmp_path)
    assert dataset.train.image_ids == [2]
    note = dataset.train.left_out_note()
    assert note.startswith(f"train2017: trains without 3 unreadable image(s) of 4: {truncated} (truncated: the file "
                           "ends before its image data does")
    assert f"; {tmp_path / 'train2017' / '3.png'} (renamed to 3.png.unreadable); {undecodable} (broken data " in note


@pytest.mark.parametrize("damage", ["truncated", "undecodable", "renamed"])
def test_unreadable_validation_images_stop_before_training(tmp_path, damage):
    write_coco(tmp_path, val=THREE)
    whole = _jpeg_bytes(40, 30)
    if damage == "renamed":
        (tmp_path / "val2017" / "2.png").rename(tmp_path / "val2017" / "2.png.unreadable")
        assert "(renamed to .unreadable: validation images can't be left out)" in refusal(tmp_path)
        return
    # Damage that only decoding finds too: validation images are decoded before training, not after its first epoch.
    path = _as_jpeg(tmp_path, "val2017", 2, whole[: len(whole) // 2] if damage == "truncated"
                    else _broken_huffman_table(whole))
    message = refusal(tmp_path)
    assert message.startswith(f"validation image {str(path)!r} (image id 2 of ")
    assert ("truncated" if damage == "truncated" else "broken data stream") in message


def test_image_headers_are_cached_by_size_and_modification_time(tmp_path, monkeypatch):
    from rankkd.data import coco as data

    write_coco(tmp_path, train=THREE, val=THREE)
    read = []
    real_header = data._image_header
    monkeypatch.setattr(data, "_image_header", lambda path: read.append(path.name) or real_header(path))
    first = check_coco(tmp_path)
    assert sorted(read) == ["1.png", "1.png", "2.png", "2.png", "3.png", "3.png"]
    read.clear()
    assert check_coco(tmp_path).train.sizes == first.train.sizes and read == []
    changed = tmp_path / "val2017" / "2.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    check_coco(tmp_path)
    assert read == ["2.png"]
