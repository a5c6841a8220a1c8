"""Logit distillation for Faster R-CNN, as mdistiller's detection/model/rcnn.py does it for DKD.

The student runs its transform, backbone, RPN and the RoI heads' proposal sampling once; its box head classifies
the sampled proposals. The frozen teacher runs its own backbone on the same resized and padded images, normalised its
own way (teacher_images: a detectron2 teacher reads BGR 0-255 minus its pixel mean, the student ImageNet-normalised
RGB), and its own box head on the same sampled proposals, so both class-logit matrices are (sampled RoIs, classes
incl. background) over the same boxes. rankkd.distill.distill_losses then takes them with the sampled proposals'
labels: its "ce" term is the Fast R-CNN classification loss (the RoI heads' loss_classifier is exactly
F.cross_entropy(class_logits, labels)), its base term (KD / DKD / DIST) and ranking term are the distillation. The
box regression and RPN losses are the student's own (rankkd.detection.heads: L1 as detectron2's by default).

Gradient flow: RPN proposals are detached inside torchvision, so the distillation terms reach the student's box
head, box predictor and backbone (FPN included), never the RPN head; the teacher runs under no_grad in eval mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankkd.distill import DistillConfig, Distiller, distill_losses


def _geometry(transform):
    return (type(transform), transform.size_divisible, getattr(transform, "resizes", True), transform.min_size,
            transform.max_size, transform.fixed_size)


def _check_same_geometry(student, teacher):
    """The teacher reads the student's resized and padded images (teacher_images), which is only right when its own
    transform would have resized and padded them the same way, so that proposals mean the same pixels."""
    if _geometry(student.transform) != _geometry(teacher.transform):
        raise ValueError("the teacher's image transform resizes or pads differently from the student's "
                         f"({_geometry(teacher.transform)[1:]} vs {_geometry(student.transform)[1:]}); build both "
                         "with rankkd.detection.models")


def teacher_images(student, teacher, image_list):
    """The teacher's input for `image_list`, the student's transformed batch: the same resized and padded pixels in
    the teacher's normalisation, (x - mean) / std with its own mean and std, and 0 on the padding, where the
    teacher's transform pads (torchvision's, as detectron2's, pads after normalising)."""
    source, target = student.transform, teacher.transform
    if (source.image_mean, source.image_std) == (target.image_mean, target.image_std):
        return image_list.tensors
    tensors = image_list.tensors

    def channels(values):
        return torch.as_tensor(values, dtype=tensors.dtype, device=tensors.device)[:, None, None]

    scale = channels(source.image_std) / channels(target.image_std)
    shift = (channels(source.image_mean) - channels(target.image_mean)) / channels(target.image_std)
    sizes = torch.as_tensor(image_list.image_sizes, device=tensors.device)  # (N, 2): height, width
    rows = torch.arange(tensors.shape[-2], device=tensors.device) < sizes[:, :1]
    columns = torch.arange(tensors.shape[-1], device=tensors.device) < sizes[:, 1:]
    inside = rows[:, None, :, None] & columns[:, None, None, :]
    return torch.where(inside, tensors * scale + shift, 0.0)


def box_head_logits(detector, features, proposals, image_sizes):
    """Class logits and box deltas of `detector`'s box head at `proposals` (one (n_i, 4) tensor per image)."""
    heads = detector.roi_heads
    pooled = heads.box_roi_pool(features, proposals, image_sizes)
    return heads.box_predictor(heads.box_head(pooled))


@dataclass(frozen=True)
class RoILogits:
    """Both box heads at the same RoIs of one batch (roi_logits)."""

    student: torch.Tensor  # (RoIs, classes incl. background): the student's class logits
    teacher: torch.Tensor | None  # the teacher's at the same RoIs, without gradient; None without a teacher
    student_box_deltas: torch.Tensor  # the student's box regression, (RoIs, 4 * classes)
    labels: list[torch.Tensor] | None  # with targets: the sampled RoIs' class labels, one tensor per image
    regression_targets: list[torch.Tensor] | None  # with targets: their box regression targets, likewise
    rpn_losses: dict[str, torch.Tensor]  # with targets: the student's RPN losses; {} without


def roi_logits(student, teacher, images, targets=None) -> RoILogits:
    """The student's and the teacher's box-head class logits at the same RoIs of `images` (a list of CHW images).

    The student runs its transform, backbone and RPN; the RoIs are the proposals its RoI heads sample for training
    when `targets` are given (the student in training mode), else its RPN's proposals. The teacher (None: not run)
    reads the student's resized and padded batch in its own normalisation (teacher_images) through its own backbone
    and box head, under no_grad."""
    image_list, targets = student.transform(images, targets)
    features = student.backbone(image_list.tensors)
    proposals, rpn_losses = student.rpn(image_list, features, targets)
    labels = regression_targets = None
    if targets is not None:
        proposals, _, labels, regression_targets = student.roi_heads.select_training_samples(proposals, targets)
    student_logits, box_deltas = box_head_logits(student, features, proposals, image_list.image_sizes)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_features = teacher.backbone(teacher_images(student, teacher, image_list))
            teacher_logits, _ = box_head_logits(teacher, teacher_features, proposals, image_list.image_sizes)
    return RoILogits(student_logits, teacher_logits, box_deltas, labels, regression_targets, rpn_losses)


class DetectionDistiller(Distiller):
    """A student detector, a frozen teacher detector (None for method "ce" without the ranking loss) and a
    DistillConfig; both detectors are Faster R-CNNs from rankkd.detection.models.build_detector. The teacher is
    frozen as the Distiller's is, and must resize and pad images as the student does.

    forward(images, targets, epoch=0.0) in training mode -> (None, terms): the student's box regression, objectness
    and RPN box losses ("box_reg", "objectness", "rpn_box_reg"), then distill_losses' terms over roi_logits' sampled
    RoIs ("ce" = the classification loss, weighted by config.ce_weight; "kd" / "dkd" / "dist"; "rank"), and "total",
    their sum; all 0-d tensors. In eval mode forward(images) returns (student detections, {})."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig):
        if teacher is not None:
            _check_same_geometry(student, teacher)
        super().__init__(student, teacher, config)

    def forward(self, images, targets=None, epoch=0.0):
        if not self.training:
            return self.student(images), {}
        rois = roi_logits(self.student, self.teacher if self.config.uses_teacher else None, images, targets)
        labels = torch.cat(rois.labels)
        distill = distill_losses(rois.student, rois.teacher, labels, self.config, epoch)
        terms = {"box_reg": self.student.roi_heads.box_loss(rois.student_box_deltas, rois.labels,
                                                            rois.regression_targets),
                 "objectness": rois.rpn_losses["loss_objectness"], "rpn_box_reg": rois.rpn_losses["loss_rpn_box_reg"]}
        terms |= {name: value for name, value in distill.items() if name != "total"}
        terms["total"] = sum(terms.values())
        return None, terms
