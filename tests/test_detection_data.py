"""COCO data (rankkd.detection.data) and the demo set (rankkd.detection.demo): checks, labels, loaders, sharding."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from rankkd.detection.data import (CocoTrainLoader, CocoValLoader, SyntheticDetectionLoader,  # noqa: E402
                                   _CocoImages, check_coco, flip_boxes, resized_shape)
from rankkd.detection.demo import DEMO_CATEGORIES, DEMO_IMAGE_SIZE, prepare_demo_coco  # noqa: E402

CPU = torch.device("cpu")


def write_coco(root, *, train=None, val=None, categories=({"id": 2, "name": "a"}, {"id": 5, "name": "b"})):
    """A COCO-layout root; each split is a list of (image id, width, height, [annotation dicts]). Every image is
    black with a white rectangle where its first annotation's box is."""
    from PIL import Image

    default = [(1, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2}])]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, images in (("train2017", train or default), ("val2017", val or default)):
        (root / split).mkdir(exist_ok=True)
        content = {"images": [], "annotations": [], "categories": list(categories)}
        for image_id, width, height, annotations in images:
            pixels = np.zeros((height, width, 3), np.uint8)
            if annotations:
                x, y, w, h = (int(v) for v in annotations[0]["bbox"])
                pixels[y:y + h, x:x + w] = 255
            Image.fromarray(pixels).save(root / split / f"{image_id}.png")
            content["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": width,
                                      "height": height})
            for annotation in annotations:
                content["annotations"].append({"id": len(content["annotations"]) + 1, "image_id": image_id,
                                               "iscrowd": 0, "area": 1.0} | annotation)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


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
