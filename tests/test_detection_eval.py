"""COCO box AP (rankkd.detection.evaluate) on hand-made detections whose AP is known in closed form."""
import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
pytest.importorskip("torchvision")

from rankkd.detection.evaluate import (METRIC_NAMES, coco_box_metrics, detections_to_rows,  # noqa: E402
                                       evaluate_detector, load_coco_gt)

# 4 images of 200 x 100 px, two objects each: category 3 (a 40 x 40 box, "medium") and 7 (a 20 x 10 box, "small").
IMAGES = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 100} for i in (5, 6, 8, 9)]
BOXES = {3: [30.0, 20.0, 40.0, 40.0], 7: [120.0, 50.0, 20.0, 10.0]}


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    annotations = [{"id": 10 * image["id"] + category, "image_id": image["id"], "category_id": category,
                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
                   for image in IMAGES for category, box in BOXES.items()]
    content = {"images": IMAGES, "annotations": annotations,
               "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    path = tmp_path_factory.mktemp("gt") / "instances_val2017.json"
    path.write_text(json.dumps(content))
    return load_coco_gt(path)


def rows(images, shift=0.0, score=0.9):
    return np.array([[image["id"], box[0] + shift, box[1], box[2], box[3], score, category]
                     for image in images for category, box in BOXES.items()])


def test_perfect_detections_score_100(coco_gt):
    metrics = coco_box_metrics(coco_gt, rows(IMAGES))
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("box_ap", "box_ap50", "box_ap75", "box_ap_s", "box_ap_m"):
        assert metrics[name] == pytest.approx(100.0)
    assert np.isnan(metrics["box_ap_l"])  # no large object in the ground truth: COCOeval's -1


def test_boxes_shifted_below_half_iou_score_0(coco_gt):
    # A shift of 0.7 x the width leaves IoU 0.3 / 1.7 < 0.5 for every box.
    shifted = np.concatenate([rows([image], shift=0.7 * 40) for image in IMAGES])
    shifted[shifted[:, 6] == 7, 1] += 0.7 * 20 - 0.7 * 40
    assert coco_box_metrics(coco_gt, shifted)["box_ap50"] == 0.0
    assert coco_box_metrics(coco_gt, shifted)["box_ap"] == 0.0


def test_half_the_objects_missing(coco_gt):
    # Every detection is right but only 2 of the 4 images get any: recall stops at 0.5 with precision 1, so the
    # 101-point interpolated precision is 1 at the recall thresholds 0, 0.01, ..., 0.50 and 0 above: AP = 51/101.
    metrics = coco_box_metrics(coco_gt, rows(IMAGES[:2]))
    for name in ("box_ap", "box_ap50", "box_ap75", "box_ap_s", "box_ap_m"):
        assert metrics[name] == pytest.approx(100 * 51 / 101)


def test_no_detections_score_0_quietly(coco_gt, capsys):
    assert coco_box_metrics(coco_gt, np.zeros((0, 7))) == {name: 0.0 for name in METRIC_NAMES}
    coco_box_metrics(coco_gt, rows(IMAGES))
    assert capsys.readouterr().out == ""  # COCOeval's prints are silenced


def test_detections_map_back_to_original_pixels_and_category_ids(coco_gt):
    # Images seen at half size by the detector, with contiguous labels 1 (category 3) and 2 (category 7).
    images = [torch.zeros(3, 50, 100) for _ in IMAGES]
    outputs = []
    for _ in IMAGES:
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in BOXES.values()]) / 2
        outputs.append({"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])})
    result = detections_to_rows(outputs, images, [image["id"] for image in IMAGES], coco_gt, {1: 3, 2: 7})
    np.testing.assert_allclose(result[:2, 1:5], np.array(list(BOXES.values())))
    assert result[:, 6].tolist() == [3, 7] * len(IMAGES)
    assert coco_box_metrics(coco_gt, result)["box_ap"] == pytest.approx(100.0)


class _Oracle(torch.nn.Module):
    """A detector answering the ground truth of the image ids it is told, at the loader's half scale."""

    def __init__(self, keep_images):
        super().__init__()
        self.queue, self.keep = [], keep_images

    def forward(self, images):
        outputs = []
        for image_id in self.queue.pop(0):
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in BOXES.values()]) / 2
            keep = image_id in self.keep
            outputs.append({"boxes": boxes[:2 * keep], "scores": torch.tensor([0.9, 0.8])[:2 * keep],
                            "labels": torch.tensor([1, 2])[:2 * keep]})
        return outputs


def test_evaluate_detector_student_and_teacher(coco_gt):
    batches = [([torch.zeros(3, 50, 100)] * 2, [5, 6]), ([torch.zeros(3, 50, 100)] * 2, [8, 9])]
    student, teacher = _Oracle({5, 6, 8, 9}), _Oracle({5, 6})
    for model in (student, teacher):
        model.queue = [ids for _, ids in batches]
    student.train()
    metrics = evaluate_detector(student, teacher, batches, coco_gt, {1: 3, 2: 7}, contextlib.nullcontext,
                                SimpleNamespace(rank=0))
    assert metrics["box_ap"] == pytest.approx(100.0)
    assert metrics["teacher_box_ap"] == pytest.approx(100 * 51 / 101)
    assert student.training  # its mode is restored
