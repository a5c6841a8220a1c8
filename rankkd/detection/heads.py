"""The RPN and RoI heads of rankkd's Faster R-CNN: torchvision's, with boxes kept in float32 under any autocast and
with detectron2's or torchvision's conventions for anchors, RoI pooling and box losses.

Float32 boxes. torchvision's box path takes the dtype of the network's outputs: its anchor generator makes anchors
in the feature maps' dtype and its box coder casts the reference boxes to the regression output's dtype, so under
bf16 autocast anchors, proposals, regression targets and detections are all rounded to bf16 (8 significant bits:
a coordinate between 512 and 1024 px becomes a multiple of 4). Here the anchors are made in float32 and the four
predictor layers (the RPN's objectness and box-delta 1x1 convs, the box predictor's class and box-delta FCs) run in
float32 with autocast off, on their input upcast; they are about 1 % of the heads' multiply-adds at COCO sizes.
Every tensor downstream (decoding, clipping, NMS, matching, encoding, the pooler's level assignment, the losses) is
then float32: torchvision computes it with elementwise ops, which autocast leaves in their inputs' dtype, and NMS
and RoIAlign, which autocast runs in float32. The backbone, FPN, RPN conv and box head FCs keep the autocast dtype.

Conventions (HEAD_STYLES): "detectron2", the default, is detectron2's Base-RCNN-FPN, with which mdistiller's
students and detectron2's model-zoo teachers were trained: anchors of exact size (w = size / sqrt(ratio),
h = size * sqrt(ratio)), ROIAlignV2 (aligned=True, adaptive sampling: sampling_ratio 0) on p2-p5 with the FPN
paper's level rule (a box of 224 px at level 4), and L1 box losses (SMOOTH_L1_BETA 0) in the RPN and the RoI heads.
"torchvision" is what torchvision's COCO_V1 weights were trained with: anchor corners rounded to whole pixels,
RoIAlign unaligned with 2 samples per bin, and smooth-L1 box losses with beta 1/9. Either way the box losses are
normalised as torchvision does (RPN: by the sampled anchors; RoI heads: by the sampled RoIs), which equals
detectron2's normalisers whenever an image has 256 anchors to sample, and the box head and predictor keep PyTorch's
default initialisation: detectron2's (kaiming_uniform with a=1 for the FCs, normal(0.01) and normal(0.001) for the
class and box-delta outputs) cost the demo's from-scratch teacher about 6 box AP over three seeds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import roi_heads as torchvision_roi_heads
from torchvision.models.detection import rpn as torchvision_rpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign, box_area, roi_align

HEAD_STYLES = ("detectron2", "torchvision")
# Box loss beta per style: detectron2's SMOOTH_L1_BETA 0 (L1) in both heads, torchvision's smooth-L1 beta 1/9.
BOX_LOSS_BETA = {"detectron2": 0.0, "torchvision": 1 / 9}
# The FPN maps the RoI heads pool from (BackboneWithFPN's "0"-"3", detectron2's p2-p5) and their strides.
POOLED_FEATURES = ("0", "1", "2", "3")
POOLED_STRIDES = (4, 8, 16, 32)
# The strides of the FPN levels the RPN's anchors sit on, p2-p6 (detectron2's ANCHOR_GENERATOR on Base-RCNN-FPN).
FPN_STRIDES = (4, 8, 16, 32, 64)


def check_head_style(head_style):
    if head_style not in HEAD_STYLES:
        raise ValueError(f"head_style must be one of {', '.join(HEAD_STYLES)}, got {head_style!r}")


def _float32_region(tensor):
    """Autocast off on `tensor`'s device: what runs inside keeps float32 inputs in float32."""
    return torch.autocast(tensor.device.type, enabled=False)


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator (one size per FPN level here), making float32 anchors whatever the feature
    maps' dtype. detectron2's convention unless `rounded`: exact anchor sizes, laid out at the levels' fixed strides
    (FPN_STRIDES). torchvision's (`rounded`): corners rounded to whole pixels, each level's stride taken as the padded
    image side // its cells, which for p6 differs from 64 whenever a side is an odd multiple of 32 (800 px: 61)."""

    def __init__(self, sizes, aspect_ratios, rounded: bool):
        super().__init__(sizes, aspect_ratios)
        self.rounded = rounded
        if not rounded:
            if len(sizes) != len(FPN_STRIDES):
                raise ValueError(f"one anchor size per FPN level {FPN_STRIDES} is needed, got {sizes}")
            self.cell_anchors = [_exact_cell_anchors(size, ratios) for size, ratios in zip(sizes, aspect_ratios)]

    def forward(self, image_list, feature_maps):
        grid_sizes = [feature.shape[-2:] for feature in feature_maps]
        device = feature_maps[0].device
        if self.rounded:
            # torchvision's generator reads only each map's size, device and dtype, and makes the anchors in that
            # dtype: give it float32 stand-ins of the maps' sizes.
            shapes = [torch.empty((0, 0, *size), device=device) for size in grid_sizes]
            return super().forward(image_list, shapes)
        self.set_cell_anchors(torch.float32, device)
        strides = [[torch.tensor(stride, device=device)] * 2 for stride in FPN_STRIDES]
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


def _exact_cell_anchors(sizes, aspect_ratios):
    """detectron2's cell anchors (DefaultAnchorGenerator: its arithmetic, in Python floats), centred on 0, in
    torchvision's order (ratios outer, sizes inner; the same order as detectron2's for one size per level)."""
    anchors = []
    for ratio in aspect_ratios:
        for size in sizes:
            w = math.sqrt(size**2.0 / ratio)
            h = ratio * w
            anchors.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    return torch.tensor(anchors, dtype=torch.float32)


class RPNHead(torchvision_rpn.RPNHead):
    """torchvision's RPN head (3x3 conv + ReLU, then 1x1 objectness and box-delta convs) with the two 1x1 convs in
    float32: the objectness logits rank the anchors for the pre-NMS top-k and the deltas move them."""

    def forward(self, x):
        logits, deltas = [], []
        for feature in x:
            hidden = self.conv(feature)
            with _float32_region(hidden):
                hidden = hidden.float()
                logits.append(self.cls_logits(hidden))
                deltas.append(self.bbox_pred(hidden))
        return logits, deltas


class BoxPredictor(FastRCNNPredictor):
    """torchvision's box predictor, class logits and class-specific box deltas (num_classes x 4, background column
    included), computed in float32 on the box head's output."""

    def forward(self, x):
        with _float32_region(x):
            return super().forward(x.float())


class AlignedRoIPooler(nn.Module):
    """detectron2's ROIPooler with ROIAlignV2: each box pooled from one FPN level by torchvision's roi_align with
    aligned=True and sampling_ratio 0 (adaptive: ceil(box size / output size) samples per bin and axis). The level is
    the FPN paper's floor(canonical_level + log2(sqrt(box area) / canonical_size)), clamped to the levels there are.
    Called as torchvision's MultiScaleRoIAlign: (features dict, boxes per image, image sizes) -> (R, C, size, size)."""

    def __init__(self, featmap_names=POOLED_FEATURES, strides=POOLED_STRIDES, output_size: int = 7,
                 canonical_size: int = 224, canonical_level: int = 4):
        super().__init__()
        levels = [math.log2(stride) for stride in strides]
        if len(featmap_names) != len(strides) or levels != list(range(int(levels[0]), int(levels[0]) + len(levels))):
            raise ValueError(f"strides must be consecutive powers of 2, one per feature map, got {strides} for "
                             f"{featmap_names}")
        self.featmap_names, self.strides = tuple(featmap_names), tuple(strides)
        self.output_size = (output_size, output_size)
        self.canonical_size, self.canonical_level = canonical_size, canonical_level
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])

    def levels(self, boxes):
        """Index into featmap_names of each box of `boxes` (a list of (n_i, 4) tensors, concatenated)."""
        sizes = torch.cat([box_area(image_boxes) for image_boxes in boxes]).sqrt()
        level = torch.floor(self.canonical_level + torch.log2(sizes / self.canonical_size))
        return level.clamp(self.min_level, self.max_level).long() - self.min_level

    def forward(self, features, boxes, image_shapes=None):
        maps = [features[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(image_boxes[:, :1], index), image_boxes], dim=1)
                          for index, image_boxes in enumerate(boxes)])
        levels = self.levels(boxes)
        pooled = maps[0].new_zeros((len(rois), maps[0].shape[1], *self.output_size))
        for level, (feature, stride) in enumerate(zip(maps, self.strides)):
            index = torch.where(levels == level)[0]
            pooled.index_put_((index,), roi_align(feature, rois[index], self.output_size, spatial_scale=1 / stride,
                                                  sampling_ratio=0, aligned=True))
        return pooled


def box_pooler(head_style: str):
    """The RoI heads' 7x7 pooler on p2-p5: ROIAlignV2 (detectron2) or torchvision's unaligned 2-sample RoIAlign."""
    if head_style == "detectron2":
        return AlignedRoIPooler()
    return MultiScaleRoIAlign(list(POOLED_FEATURES), output_size=7, sampling_ratio=2)


class RegionProposalNetwork(torchvision_rpn.RegionProposalNetwork):
    """torchvision's RPN with the box-delta loss's smooth-L1 beta as an argument (0: L1)."""

    def __init__(self, *args, box_loss_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = box_loss_beta

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos))[0]
        sampled = torch.cat([sampled_pos, torch.where(torch.cat(sampled_neg))[0]])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[sampled_pos], regression_targets[sampled_pos],
                                    beta=self.box_loss_beta, reduction="sum") / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


class RoIHeads(torchvision_roi_heads.RoIHeads):
    """torchvision's RoI heads for Faster R-CNN (boxes only), with the box-delta loss's smooth-L1 beta as an
    argument (0: L1). forward returns torchvision's outputs: detections in eval mode, in training the losses
    "loss_classifier" (cross-entropy over the sampled RoIs) and "loss_box_reg" (box_loss)."""

    def __init__(self, *args, box_loss_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = box_loss_beta

    def box_loss(self, box_regression, labels, regression_targets):
        """The box-delta loss of the sampled RoIs (labels and regression_targets: one tensor per image, as
        select_training_samples gives them): over the foreground RoIs, the deltas of their class against their
        targets, summed and divided by the number of sampled RoIs."""
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        foreground = torch.where(labels > 0)[0]
        deltas = box_regression.reshape(len(labels), -1, 4)[foreground, labels[foreground]]
        return F.smooth_l1_loss(deltas, regression_targets[foreground], beta=self.box_loss_beta,
                                reduction="sum") / labels.numel()

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(self.box_head(self.box_roi_pool(features, proposals,
                                                                                          image_shapes)))
        if self.training:
            losses = {"loss_classifier": F.cross_entropy(class_logits, torch.cat(labels)),
                      "loss_box_reg": self.box_loss(box_regression, labels, regression_targets)}
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        return [{"boxes": b, "labels": c, "scores": s} for b, c, s in zip(boxes, labels, scores)], {}
