"""The detectors' box path (rankkd.detection.heads): float32 boxes under autocast, detectron2's anchors and
ROIAlignV2 pooler, and the L1 / smooth-L1 box losses, against independent float64 references."""
import math

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from torchvision.ops import MultiScaleRoIAlign, roi_align  # noqa: E402

from rankkd.detection.heads import AlignedRoIPooler  # noqa: E402
from rankkd.detection.models import build_detector  # noqa: E402

NUM_CLASSES = 4
SMALL = dict(anchor_sizes=(8, 16, 32, 64, 128), fpn_channels=16, box_head_dim=32, rois_per_image=32,
             rpn_pre_nms_top_n_train=300, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n=100)
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def detector(head_style="detectron2", seed=0):
    torch.manual_seed(seed)
    return build_detector("demo_tiny", NUM_CLASSES, head_style=head_style, **SMALL)


def batch(seed=0):
    """Two images of odd sizes and their boxes (float32, as the loaders give them)."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 97, 131, generator=generator), torch.rand(3, 120, 88, generator=generator)]
    targets = [{"boxes": torch.tensor([[4.3, 6.1, 60.7, 41.2], [70.2, 20.9, 125.5, 90.4]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[10.6, 12.2, 50.1, 101.8]]), "labels": torch.tensor([2])}]
    return images, targets


class Recorder:
    """Forward hooks keeping each module's inputs and outputs of its last call."""

    def __init__(self, **modules):
        self.seen = {}
        for name, module in modules.items():
            module.register_forward_hook(lambda _, args, out, name=name: self.seen.__setitem__(name, (args, out)))


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_eval_boxes_are_float32_and_decode_as_in_float32(dtype):
    model = detector().eval()
    rpn, heads = model.rpn, model.roi_heads
    seen = Recorder(backbone=model.backbone, head=rpn.head, anchors=rpn.anchor_generator, pool=heads.box_roi_pool,
                    predictor=heads.box_predictor).seen
    images, _ = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        detections = model(images)
    assert all(f.dtype == dtype for f in seen["backbone"][1].values())  # autocast is on
    objectness, deltas = seen["head"][1]
    anchors = seen["anchors"][1]
    (_, proposals, image_sizes), _ = seen["pool"]
    class_logits, box_regression = seen["predictor"][1]
    tensors = [*objectness, *deltas, *anchors, *proposals, class_logits, box_regression]
    tensors += [d[key] for d in detections for key in ("boxes", "scores")]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert sum(len(d["boxes"]) for d in detections) > 0
    # The same network outputs decoded with autocast off: the same proposals and detections, bit for bit.
    with torch.no_grad():
        image_list, _ = model.transform(images)
        features = list(model.backbone(image_list.tensors).values())
        torch.testing.assert_close(rpn.anchor_generator(image_list, features), anchors, rtol=0, atol=0)
        per_level = [o[0].numel() for o in objectness]
        flat_objectness, flat_deltas = torchvision.models.detection.rpn.concat_box_prediction_layers(objectness,
                                                                                                      deltas)
        decoded = rpn.box_coder.decode(flat_deltas, anchors).view(len(images), -1, 4)
        expected_proposals, _ = rpn.filter_proposals(decoded, flat_objectness, image_sizes, per_level)
        boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
    for ours, expected in zip(proposals, expected_proposals):
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    for detection, *expected in zip(detections, boxes, scores, labels):
        for key, value in zip(("boxes", "scores", "labels"), expected):
            torch.testing.assert_close(detection[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_training_proposals_and_regression_targets_are_float32(dtype):
    model = detector().train()
    seen = Recorder(predictor=model.roi_heads.box_predictor).seen
    images, targets = batch(1)
    with torch.autocast("cpu", dtype=dtype):
        image_list, targets = model.transform(images, targets)
        features = model.backbone(image_list.tensors)
        proposals, rpn_losses = model.rpn(image_list, features, targets)
        anchors = model.rpn.anchor_generator(image_list, list(features.values()))
        _, matched_anchor_boxes = model.rpn.assign_targets_to_anchors(anchors, targets)
        rpn_targets = model.rpn.box_coder.encode(matched_anchor_boxes, anchors)
        sampled, matched, _, regression_targets = model.roi_heads.select_training_samples(proposals, targets)
        losses = model(images, batch(1)[1])
    box_path = [*anchors, *proposals, *sampled, *rpn_targets, *regression_targets, *seen["predictor"][1]]
    assert all(t.dtype == torch.float32 for t in box_path)
    assert all(value.dtype == torch.float32 and value.isfinite() for value in [*rpn_losses.values(),
                                                                               *losses.values()])
    # Regression targets against the Fast R-CNN encoding (weights 10, 10, 5, 5) written out in float64.
    for boxes, index, target, image_targets in zip(sampled, matched, regression_targets, targets):
        p, g = boxes.double(), image_targets["boxes"].double()[index]
        pw, ph, gw, gh = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        expected = torch.stack([10 * ((g[:, 0] + gw / 2) - (p[:, 0] + pw / 2)) / pw,
                                10 * ((g[:, 1] + gh / 2) - (p[:, 1] + ph / 2)) / ph,
                                5 * torch.log(gw / pw), 5 * torch.log(gh / ph)], dim=1)
        torch.testing.assert_close(target.double(), expected, rtol=1e-5, atol=1e-5)


def test_anchors_exact_for_detectron2_and_rounded_for_torchvision():
    # 160 x 224: both sides odd multiples of 32, so p6 (max-pooled p5, 3 x 4 cells) is where torchvision's stride
    # rule (side // cells: 53, 56) parts from detectron2's fixed 64.
    images = torch.zeros(1, 3, 160, 224)
    image_list = torchvision.models.detection.image_list.ImageList(images, [(160, 224)])
    maps = [torch.zeros(1, 16, -(-160 // s), -(-224 // s), dtype=torch.bfloat16) for s in (4, 8, 16, 32, 64)]
    exact, rounded = (detector(style).rpn.anchor_generator(image_list, maps)[0]
                      for style in ("detectron2", "torchvision"))
    assert exact.dtype == rounded.dtype == torch.float32
    # detectron2's DefaultAnchorGenerator, offset 0: (size^2 / ratio)^0.5 wide, ratio times as high, centred on
    # each cell's corner; per location the ratios in order.
    expected = []
    for size, stride, level in zip(SMALL["anchor_sizes"], (4, 8, 16, 32, 64), maps):
        for y in range(0, level.shape[-2] * stride, stride):
            for x in range(0, level.shape[-1] * stride, stride):
                for ratio in (0.5, 1.0, 2.0):
                    w = math.sqrt(size**2 / ratio)
                    h = ratio * w
                    expected.append((x - w / 2, y - h / 2, x + w / 2, y + h / 2))
    expected = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(exact.double(), expected, rtol=0, atol=1e-5)
    reference = torchvision.models.detection.anchor_utils.AnchorGenerator(
        tuple((s,) for s in SMALL["anchor_sizes"]), ((0.5, 1.0, 2.0),) * 5)(image_list, [m.float() for m in maps])[0]
    torch.testing.assert_close(rounded, reference, rtol=0, atol=0)
    assert not torch.equal(exact, rounded)


def test_aligned_pooler_is_roi_align_v2_per_level():
    generator = torch.Generator().manual_seed(0)
    height, width = 1011, 1343  # the padded image; strides 4-32 give odd map sizes
    features = {name: torch.randn(2, 5, math.ceil(height / s), math.ceil(width / s), generator=generator)
                for name, s in zip("0123", (4, 8, 16, 32))}
    features["pool"] = torch.randn(2, 5, 16, 21, generator=generator)  # p6: the RPN's only
    boxes = []
    for count in (37, 29):
        size = torch.exp(torch.empty(count, 2).uniform_(math.log(3), math.log(900), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * (torch.tensor([width, height]) - size).clamp(min=1)
        boxes.append(torch.cat([corner, corner + size], dim=1))
    # Boxes exactly at the level boundaries: 112 px is level 3, 224 level 4, 448 level 5.
    boxes[1] = torch.cat([boxes[1], torch.tensor([[10.0, 10.0, 122.0, 122.0], [5.0, 7.0, 229.0, 231.0],
                                                  [0.0, 0.0, 448.0, 448.0]])])
    pooled = AlignedRoIPooler()(features, boxes, [(height, width)] * 2)
    rows = [(image, box) for image, image_boxes in enumerate(boxes) for box in image_boxes.double()]
    levels = []
    for (image, box), ours in zip(rows, pooled):
        size = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        level = min(max(math.floor(4 + math.log2(size / 224)), 2), 5)
        levels.append(level)
        feature = features[str(level - 2)][image:image + 1]
        expected = roi_align(feature, [box[None].float()], 7, spatial_scale=2.0**-level, sampling_ratio=0,
                             aligned=True)[0]
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    assert set(levels) == {2, 3, 4, 5} and levels[-3:] == [3, 4, 5]
    assert isinstance(detector("torchvision").roi_heads.box_roi_pool, MultiScaleRoIAlign)
    assert detector("torchvision").roi_heads.box_roi_pool.sampling_ratio == 2


def smooth_l1_float64(difference, beta):
    difference = difference.double().abs()
    if beta == 0:
        return difference.sum()
    return torch.where(difference < beta, 0.5 * difference**2 / beta, difference - 0.5 * beta).sum()


@pytest.mark.parametrize("head_style, beta", [("detectron2", 0.0), ("torchvision", 1 / 9)])
def test_rpn_box_loss(head_style, beta):
    rpn = detector(head_style).rpn
    generator = torch.Generator().manual_seed(1)
    labels, targets = [], []
    for count, positives, negatives in ((900, 41, 97), (700, 128, 128)):
        # Few enough labelled anchors that the sampler takes every one: the reference needs no sampling.
        image_labels = torch.full((count,), -1.0)
        chosen = torch.randperm(count, generator=generator)[:positives + negatives]
        image_labels[chosen[:positives]], image_labels[chosen[positives:]] = 1.0, 0.0
        labels.append(image_labels)
        targets.append(torch.randn(count, 4, generator=generator) * 0.3)
    objectness = torch.randn(1600, 1, generator=generator) * 2
    deltas = torch.randn(1600, 4, generator=generator) * 0.3
    objectness_loss, box_loss = rpn.compute_loss(objectness, deltas, labels, targets)
    all_labels, all_targets = torch.cat(labels), torch.cat(targets)
    sampled, positive = all_labels >= 0, all_labels == 1
    expected_box = smooth_l1_float64(deltas[positive] - all_targets[positive], beta) / sampled.sum()
    x, y = objectness.flatten()[sampled].double(), all_labels[sampled].double()
    expected_objectness = (torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))).mean()
    torch.testing.assert_close(box_loss.double(), expected_box, rtol=1e-6, atol=0)
    torch.testing.assert_close(objectness_loss.double(), expected_objectness, rtol=1e-6, atol=0)


@pytest.mark.parametrize("head_style, beta", [("detectron2", 0.0), ("torchvision", 1 / 9)])
def test_roi_box_loss(head_style, beta):
    heads = detector(head_style).roi_heads
    generator = torch.Generator().manual_seed(2)
    labels = [torch.randint(0, NUM_CLASSES, (n,), generator=generator) for n in (23, 31)]
    targets = [torch.randn(n, 4, generator=generator) * 0.5 for n in (23, 31)]
    box_regression = torch.randn(54, NUM_CLASSES * 4, generator=generator) * 0.5
    loss = heads.box_loss(box_regression, labels, targets)
    total = torch.zeros((), dtype=torch.float64)
    for row, (label, target) in enumerate(zip(torch.cat(labels).tolist(), torch.cat(targets))):
        if label > 0:  # background RoIs have no box to regress
            total += smooth_l1_float64(box_regression[row, 4 * label:4 * label + 4] - target, beta)
    torch.testing.assert_close(loss.double(), total / 54, rtol=1e-6, atol=0)
