"""COCO on DALI (rankkd.data.coco_dali), run on the CPU, against torchvision's loaders (rankkd.data.coco_loaders)
and against the annotations: JPEGs on every rank, resumed mid-pass, and boxes that cross or miss the image's edges.

The DALI loaders' agreement with torchvision's over whole passes of PNGs, mid-pass resuming whatever the threads,
sharding, undecodable images and GPU decoding are tested in test_detection_data.py."""
import numpy as np
import pytest
import torch
from conftest import needs_dali, write_coco

pytest.importorskip("PIL")

from rankkd.data.coco import check_coco  # noqa: E402
from rankkd.data.coco_loaders import make_coco_loaders  # noqa: E402

pytestmark = needs_dali

CPU = torch.device("cpu")


def _loaders(dataset, backend, **settings):
    return make_coco_loaders(dataset, backend=backend, device=CPU, num_workers=1, **settings)


def _assert_same_images(images, expected_images):
    """The same shapes; the pixels differ by the resampling filter only (DALI's antialiased linear, PIL's
    bilinear), so the flips agree too."""
    assert [image.shape for image in images] == [image.shape for image in expected_images]
    for image, expected in zip(images, expected_images):
        assert image.dtype == torch.float32 and (image - expected).abs().mean() < 0.03


def _flip_of(boxes, original, original_size, image):
    """Whether a loader's `boxes` on `image` are the xyxy boxes `original` (pixels of an image of original_size,
    (height, width)) scaled to the image, clipped to it with the ones clipped to nothing dropped, and mirrored
    (True) or not (False); None where both read alike. Fails where they are neither."""
    height, width = image.shape[1:]
    scaled = np.asarray(original, np.float64) * ([width / original_size[1], height / original_size[0]] * 2)
    clipped = np.clip(scaled, 0, [width, height, width, height])
    clipped = clipped[(clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])]
    mirrored = np.stack([width - clipped[:, 2], clipped[:, 1], width - clipped[:, 0], clipped[:, 3]], axis=1)
    matches = {flip for flip, expected in ((False, clipped), (True, mirrored))
               if boxes.shape == expected.shape and np.allclose(boxes.double().numpy(), expected, rtol=0, atol=1e-3)}
    assert matches, (boxes, clipped)
    return matches.pop() if len(matches) == 1 else None


def test_each_rank_reads_the_demo_jpegs_as_torchvision_does(demo_coco_root, tmp_path):
    """Two ranks of the demo set (JPEG), train from a step near the pass's end and val whole: the same samples,
    sizes (160 capped at max_size), flips, boxes and labels as torchvision's loaders and as the annotations say."""
    dataset = check_coco(demo_coco_root, cache_dir=tmp_path)
    settings = dict(batch_size=4, val_batch_size=8, world_size=2, seed=11, train_sizes=(96, 112, 160), test_size=112,
                    max_size=128)
    shorter_sides, flips, val_ids = set(), set(), []
    for rank in range(2):
        (dali_train, dali_val), (torchvision_train, torchvision_val) = (
            _loaders(dataset, backend, rank=rank, **settings) for backend in ("dali", "torchvision"))
        assert (dali_train.backend, dali_val.backend, torchvision_train.backend) == ("dali", "dali", "torchvision")
        assert len(dali_train) == len(torchvision_train) == len(dataset.train) // 8
        step = len(dali_train) - 3
        for loader in (dali_train, torchvision_train):
            loader.set_epoch(2)
        pairs = list(zip(dali_train.batches_from(step), torchvision_train.batches_from(step), strict=True))
        assert len(pairs) == 3
        samples = dali_train.epoch_indices()[step * 4:].tolist()
        for batch, ((images, targets), (expected_images, expected_targets)) in enumerate(pairs):
            _assert_same_images(images, expected_images)
            for i, (image, target, expected) in enumerate(zip(images, targets, expected_targets, strict=True)):
                index = samples[4 * batch + i]
                assert target["labels"].tolist() == expected["labels"].tolist() == dataset.train.labels[index].tolist()
                torch.testing.assert_close(target["boxes"], expected["boxes"], atol=1e-3, rtol=0)
                flips.add(_flip_of(target["boxes"], dataset.train.boxes[index], dataset.train.sizes[index], image))
                shorter_sides.add(min(image.shape[1:]))
        dali_ids = []
        for (images, ids), (expected_images, expected_ids) in zip(dali_val, torchvision_val, strict=True):
            assert ids == expected_ids
            assert all(image.shape[1:] == (112, 112) for image in images)
            _assert_same_images(images, expected_images)
            dali_ids += ids
        assert dali_ids == dali_val.image_ids  # the val block, in its order
        val_ids += dali_ids
    assert shorter_sides == {96, 112, 128}  # 160 capped by max_size 128 on the square images
    assert {True, False} <= flips
    assert sorted(val_ids) == sorted(dataset.val.image_ids)  # each val image on exactly one rank


def _edge_boxes(width, height):
    """xywh boxes: inside (drawn white), across the bottom-right corner, across the top-left corner, wholly right of
    the image, wholly below it, and starting exactly at its right edge."""
    return [[3, 4, 10, 8], [width - 6, height - 5, 12, 9], [-4, -3, 9, 10], [width + 2, 3, 5, 5], [2, height + 1, 4, 4],
            [width, 6, 3, 3]]


def test_boxes_are_clipped_to_the_image_and_dropped_when_outside(tmp_path):
    sizes = {1: (50, 30), 2: (36, 60), 3: (41, 41), 4: (64, 25), 5: (45, 33), 6: (29, 52), 7: (70, 40)}
    annotations = {image_id: [{"bbox": box, "category_id": (2, 5)[n % 2]} for n, box in enumerate(_edge_boxes(*size))]
                   for image_id, size in sizes.items()}
    images = [(image_id, width, height, annotations[image_id]) for image_id, (width, height) in sizes.items()]
    dataset = check_coco(write_coco(tmp_path / "coco", train=images, val=images), cache_dir=tmp_path)
    settings = dict(batch_size=2, val_batch_size=3, rank=0, world_size=1, seed=4, train_sizes=(30, 50), test_size=40,
                    max_size=90)
    (dali_train, _), (torchvision_train, _) = (_loaders(dataset, backend, **settings)
                                               for backend in ("dali", "torchvision"))
    flips = set()
    for epoch in (0, 1):
        for loader in (dali_train, torchvision_train):
            loader.set_epoch(epoch)
        samples = dali_train.epoch_indices().tolist()
        pairs = list(zip(dali_train, torchvision_train, strict=True))
        assert len(pairs) == 3
        for batch, ((images, targets), (expected_images, expected_targets)) in enumerate(pairs):
            _assert_same_images(images, expected_images)
            for i, (image, target, expected) in enumerate(zip(images, targets, expected_targets, strict=True)):
                image_id = dataset.train.image_ids[samples[2 * batch + i]]
                width, height = sizes[image_id]
                xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in _edge_boxes(width, height)], np.float64)
                # The first three boxes overlap the image, the others lie outside it.
                assert target["labels"].tolist() == expected["labels"].tolist() == [1, 2, 1]
                torch.testing.assert_close(target["boxes"], expected["boxes"], atol=1e-3, rtol=0)
                flips.add(_flip_of(target["boxes"], xyxy, (height, width), image))
    assert flips == {True, False}
