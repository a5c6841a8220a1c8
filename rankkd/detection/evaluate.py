"""COCO box AP of a detector (pycocotools' COCOeval), over a validation set sharded across ranks.

Metrics are COCOeval's first six summary numbers in percent: box_ap (AP at IoU 0.50:0.95), box_ap50, box_ap75,
box_ap_s / _m / _l (small, medium, large objects). An area range with no ground truth gives NaN (COCOeval's -1).
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from rankkd.distributed import all_gather_objects, broadcast_object

METRIC_NAMES = ("box_ap", "box_ap50", "box_ap75", "box_ap_s", "box_ap_m", "box_ap_l")


def load_coco_gt(annotation_file):
    """pycocotools' COCO index of an instances file, without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def coco_box_metrics(coco_gt, detections) -> dict[str, float]:
    """Box AP of `detections` against the ground truth `coco_gt` (a pycocotools COCO), over all its images.

    detections: an (N, 7) array of rows [image id, x, y, width, height, score, category id] in original image
    pixels (pycocotools' loadRes numpy format), or a list of COCO result dicts. No detection at all gives 0.0."""
    from pycocotools.cocoeval import COCOeval

    if len(detections) == 0:
        return {name: 0.0 for name in METRIC_NAMES}
    if not isinstance(detections, list):
        detections = np.asarray(detections, dtype=np.float64).reshape(-1, 7)
    # COCOeval prints its progress and the summary table: keep logs to the numbers the caller reports.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(coco_gt.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float("nan") if value < 0 else 100.0 * float(value)
            for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}


def detections_to_rows(outputs, images, image_ids, coco_gt, label_to_category) -> np.ndarray:
    """torchvision detector outputs (boxes xyxy in the loader's resized pixels, contiguous labels) as loadRes rows:
    boxes scaled back to each image's original size (the annotation file's width and height), COCO category ids."""
    categories = torch.zeros(max(label_to_category) + 1, dtype=torch.float64)
    categories[list(label_to_category)] = torch.tensor(list(label_to_category.values()), dtype=torch.float64)
    rows = []
    for output, image, image_id in zip(outputs, images, image_ids):
        info = coco_gt.imgs[int(image_id)]
        height, width = image.shape[-2:]
        scale = torch.tensor([info["width"] / width, info["height"] / height] * 2, dtype=torch.float64)
        boxes = output["boxes"].detach().double().cpu() * scale
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        ids = torch.full((len(boxes), 1), float(image_id), dtype=torch.float64)
        scores = output["scores"].detach().double().cpu().unsqueeze(1)
        rows.append(torch.cat([ids, xywh, scores, categories[output["labels"].cpu()].unsqueeze(1)], dim=1))
    return torch.cat(rows).numpy() if rows else np.zeros((0, 7))


@torch.no_grad()
def evaluate_detector(student, teacher, loader, coco_gt, label_to_category, autocast, env) -> dict[str, float]:
    """Box AP of `student` (and of `teacher` unless None: its AP costs a second inference pass per batch) on the
    val loader's images, every rank running its own share (CocoValLoader yields each image on one rank).

    autocast: a callable returning a context manager (e.g. functools.partial(torch.autocast, "cuda",
    dtype=torch.bfloat16), or contextlib.nullcontext). env: anything with .rank (rankkd's DistEnv). Detections
    are gathered to rank 0, which runs COCOeval; every rank returns the same dict: the METRIC_NAMES for the student,
    and the same with a "teacher_" prefix for the teacher."""
    models = {"": student} | ({"teacher_": teacher} if teacher is not None else {})
    was_training = student.training
    for model in models.values():
        model.eval()
    rows = {prefix: [] for prefix in models}
    for images, image_ids in loader:
        for prefix, model in models.items():
            with autocast():
                outputs = model(images)
            rows[prefix].append(detections_to_rows(outputs, images, image_ids, coco_gt, label_to_category))
    student.train(was_training)
    metrics = {}
    for prefix, chunks in rows.items():
        gathered = np.concatenate(all_gather_objects(np.concatenate(chunks) if chunks else np.zeros((0, 7))))
        result = coco_box_metrics(coco_gt, gathered) if env.rank == 0 else None
        metrics |= {prefix + name: value for name, value in broadcast_object(result).items()}
    return metrics
