"""Faster R-CNN FPN detectors (torchvision's parts), set up as detectron2's Base-RCNN-FPN.

build_detector(backbone, num_classes) gives the students and teachers of the COCO benchmark: ResNet-18/50/101 and
MobileNetV2 backbones with an FPN (p2-p6), plus two small demo backbones that train from scratch on a CPU.

Settings taken from detectron2's defaults and mdistiller's detection/configs/Base-Distillation.yaml: anchors 32-512
(one size per level) x aspect ratios (0.5, 1, 2); RPN pre-NMS top-k 2000 per level in training and 1000 in test,
post-NMS 1000 per image in both, NMS 0.7, 256 anchors per image at 50 % positive; 512 sampled RoIs per image at 25 %
positive, IoU 0.5; box head of 2 FC layers of 1024 on a 7x7 pooler; test score threshold 0.05, NMS 0.5, 100
detections per image. ResNets: frozen batch norm and the stem + res2 frozen (detectron2 FREEZE_AT 2). MobileNetV2 as
mdistiller's detection/model/backbone/mobilenetv2.py: frozen batch norm, nothing else frozen (its FREEZE_AT 0), FPN
on the last block of each stride (24, 32, 96 and 320 channels at strides 4-32; the final 1x1 conv unused).
The RPN and RoI heads (rankkd.detection.heads) keep every box in float32 under autocast and follow detectron2 by
default (head_style "detectron2": exact anchors, ROIAlignV2, L1 box losses); head_style "torchvision" is what
torchvision's COCO_V1 weights were trained with, and rankkd.detection.teachers picks it for them. Known differences
from detectron2 left: torchvision's ImageNet weights expect RGB input normalised by the ImageNet mean and std
(detectron2's MSRA weights: BGR, mean only), and the box head keeps PyTorch's default initialisation (see
rankkd.detection.heads).

Resizing: the loaders of rankkd.data.coco resize every image (a seeded choice of the shorter side per sample),
so by default the detector's transform only normalises and batches (min_size None). Give min_size / max_size for a
detector that resizes its inputs itself, torchvision's usual behaviour.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from rankkd.detection import heads
from rankkd.models.weights import fetch_torchvision_weights, torchvision_state_dict

# torchvision's ImageNet weights expect RGB in [0, 1] normalised by these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES = ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "demo_small", "demo_tiny")


# The 80 COCO category ids: torchvision's COCO detectors have 91 class columns indexed by these ids (plus 0 for
# background); the trainer's detectors have 81, in this order.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

# torchvision's COCO-trained Faster R-CNN R50-FPN, the one stock teacher it ships.
TORCHVISION_COCO_WEIGHTS = {"resnet50": "FasterRCNN_ResNet50_FPN_Weights.COCO_V1"}

_DETECTRON2_ANCHORS = (32, 64, 128, 256, 512)
_RESNET_CHANNELS = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048}  # channels of res5
_MOBILENET_V2_STAGE_ENDS = {"3": "0", "6": "1", "13": "2", "17": "3"}  # features index -> FPN input
_MOBILENET_V2_CHANNELS = [24, 32, 96, 320]
_DEMO_WIDTHS = {"demo_small": (32, 64, 96, 128), "demo_tiny": (16, 32, 48, 64)}


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise with the ImageNet mean and std, pad to a multiple of 32, batch), resizing
    only when given a min_size: the loaders resize every image themselves, seeded per sample, and resizing again
    here would undo their choice of size."""

    def __init__(self, min_size: int | None = None, max_size: int | None = None):
        super().__init__(min_size or 800, max_size or 1333, image_mean=list(IMAGENET_MEAN),
                         image_std=list(IMAGENET_STD))
        self.resizes = min_size is not None

    def resize(self, image, target=None):
        if not self.resizes:
            return image, target
        return super().resize(image, target)


def _torchvision_entry(weights, what):
    from torchvision.models import get_weight

    try:
        return get_weight(str(weights))
    except (ValueError, KeyError, AttributeError) as error:
        raise ValueError(f"{what} {str(weights)!r} is neither a file nor a torchvision weights name "
                         f"(e.g. ResNet50_Weights.IMAGENET1K_V1): {error}") from None


def _is_file(weights):
    return isinstance(weights, (str, os.PathLike)) and Path(weights).expanduser().is_file()


def fetch_weights(weights, what, option):
    """Resolve weights before training: a file as it is; a torchvision weights name found in torch's cache or
    downloaded into it, or a one-line refusal saying how to get it onto a machine without network access and pass it
    with `option`."""
    if not _is_file(weights):
        fetch_torchvision_weights(_torchvision_entry(weights, what), option)


def load_state_dict_source(weights, what, option):
    """A state_dict from a file path or a torchvision weights name ("ResNet18_Weights.IMAGENET1K_V1")."""
    if _is_file(weights):
        from rankkd._torchfile import load_torch_file

        return load_torch_file(Path(weights).expanduser(), what)
    return torchvision_state_dict(_torchvision_entry(weights, what), option)


def _resnet_body(name, weights):
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    body = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
    if weights is not None:
        state = load_state_dict_source(weights, "backbone weights", "--student-weights")
        missing, unexpected = body.load_state_dict(state, strict=False)
        unexpected = [key for key in unexpected if not key.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(f"backbone weights {str(weights)!r} are not a torchvision {name} classification "
                             f"state_dict (missing {missing[:3]}, unexpected {unexpected[:3]}); pass the {name} "
                             "ImageNet weights")
    # detectron2 FREEZE_AT 2: the stem and res2 (layer1) keep their ImageNet weights.
    for module in (body.conv1, body.layer1):
        module.requires_grad_(False)
    return body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [_RESNET_CHANNELS[name] // 8 * 2 ** i
                                                                  for i in range(4)]


def _mobilenet_v2_body(weights):
    import torchvision
    from torchvision.ops import FrozenBatchNorm2d

    model = torchvision.models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    if weights is not None:
        state = load_state_dict_source(weights, "backbone weights", "--student-weights")
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise ValueError(f"backbone weights {str(weights)!r} are not a torchvision mobilenet_v2 classification "
                             f"state_dict ({first}); pass the mobilenet_v2 ImageNet weights") from None
    return model.features, _MOBILENET_V2_STAGE_ENDS, _MOBILENET_V2_CHANNELS


class _DemoResNet(nn.Sequential):
    """A four-stage ResNet of one BasicBlock per stage, with ordinary batch norm (it trains from scratch)."""

    def __init__(self, widths):
        from torchvision.models.resnet import BasicBlock

        def stage(inplanes, planes, stride):
            down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            return BasicBlock(inplanes, planes, stride, downsample=down)

        stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                             nn.ReLU(inplace=True))
        super().__init__(OrderedDict([("stem", stem), ("layer1", stage(widths[0], widths[0], 2)),
                                      ("layer2", stage(widths[0], widths[1], 2)),
                                      ("layer3", stage(widths[1], widths[2], 2)),
                                      ("layer4", stage(widths[2], widths[3], 2))]))


def _backbone_with_fpn(backbone, weights, fpn_channels):
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    if backbone in _RESNET_CHANNELS:
        body, return_layers, channels = _resnet_body(backbone, weights)
    elif backbone == "mobilenet_v2":
        body, return_layers, channels = _mobilenet_v2_body(weights)
    else:
        if weights is not None:
            raise ValueError(f"backbone {backbone!r} is a demo backbone trained from scratch: it takes no weights")
        body = _DemoResNet(_DEMO_WIDTHS[backbone])
        return_layers, channels = {f"layer{i}": str(i - 1) for i in range(1, 5)}, list(_DEMO_WIDTHS[backbone])
    # LastLevelMaxPool adds p6 (stride 64) from p5, detectron2's FPN top block for the RPN.
    return BackboneWithFPN(body, return_layers, channels, fpn_channels, extra_blocks=LastLevelMaxPool())


def build_detector(backbone: str, num_classes: int, *, backbone_weights=None, min_size: int | None = None,
                   max_size: int | None = None, anchor_sizes=_DETECTRON2_ANCHORS, fpn_channels: int = 256,
                   box_head_dim: int = 1024, rois_per_image: int = 512, rpn_pre_nms_top_n_train: int = 2000,
                   rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n: int = 1000,
                   head_style: str = "detectron2"):
    """torchvision's Faster R-CNN (a GeneralizedRCNN) with an FPN on `backbone` (one of BACKBONES) and `num_classes`
    class columns, background included (81 for COCO); its RPN and RoI heads are rankkd.detection.heads'.

    backbone_weights: ImageNet weights of the backbone, a torchvision classification state_dict file or a torchvision
    weights name (e.g. "ResNet50_Weights.IMAGENET1K_V1"); None = random init. min_size / max_size: see the module
    docstring (None: the loader resizes). head_style: "detectron2" (anchors, pooler and box losses as detectron2's)
    or "torchvision" (as torchvision's, for its COCO_V1 weights); see rankkd.detection.heads.
    The remaining arguments default to detectron2's values (module docstring); the demo shrinks them (smaller anchors
    for small images, narrower FPN and box head, fewer RoIs)."""
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    if backbone not in BACKBONES:
        raise ValueError(f"unknown detection backbone {backbone!r}; backbones: {', '.join(BACKBONES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level p2-p6 (5), got {anchor_sizes}")
    heads.check_head_style(head_style)
    fpn = _backbone_with_fpn(backbone, backbone_weights, fpn_channels)
    box_loss_beta = heads.BOX_LOSS_BETA[head_style]
    # detectron2's RPN (and torchvision's defaults): IoU 0.7 / 0.3, 256 anchors per image at half positive, NMS 0.7.
    anchors = heads.Float32AnchorGenerator(tuple((size,) for size in anchor_sizes), ((0.5, 1.0, 2.0),) * 5,
                                           rounded=head_style == "torchvision")
    rpn = heads.RegionProposalNetwork(
        anchors, heads.RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7,
        bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": rpn_post_nms_top_n, "testing": rpn_post_nms_top_n}, nms_thresh=0.7,
        box_loss_beta=box_loss_beta)
    # RoIs: IoU 0.5 for foreground, box-delta weights (10, 10, 5, 5) (torchvision's None), as detectron2's.
    roi_heads = heads.RoIHeads(
        heads.box_pooler(head_style), TwoMLPHead(fpn_channels * 7 * 7, box_head_dim),
        heads.BoxPredictor(box_head_dim, num_classes), fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=rois_per_image, positive_fraction=0.25, bbox_reg_weights=None, score_thresh=0.05,
        nms_thresh=0.5, detections_per_img=100, box_loss_beta=box_loss_beta)
    return GeneralizedRCNN(fpn, rpn, roi_heads, DetectionTransform(min_size, max_size))
