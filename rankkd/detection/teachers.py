"""Frozen detection teachers from any of the files users hold: a checkpoint this trainer wrote, a detector
state_dict, torchvision's COCO weights, or a detectron2 model-zoo checkpoint (rankkd.detection.detectron2 converts
it)."""
from __future__ import annotations

import torch

from rankkd.detection import detectron2
from rankkd.detection.models import COCO_CATEGORY_IDS, build_detector, load_state_dict_source


def _teacher_state(state, weights):
    """The detector state_dict inside `state`, what `weights` held: a trainer checkpoint's "student", a plain
    state_dict file, or a torchvision weights name; wrapper prefixes (DDP's "module.", torch.compile's "_orig_mod.")
    removed."""
    if isinstance(state, dict) and isinstance(state.get("student"), dict):
        state = state["student"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise ValueError(f"teacher weights {str(weights)!r} hold neither a detector state_dict nor a rankkd "
                         "checkpoint (a dict with 'student'); pass a checkpoint written by the COCO trainer")
    for prefix in ("module.", "_orig_mod."):
        state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def _has_coco91_columns(state):
    """Whether `state` is a torchvision COCO detector's: 91 class columns indexed by category id."""
    weight = state.get("roi_heads.box_predictor.cls_score.weight")
    return weight is not None and weight.shape[0] == 91


def _coco91_to_contiguous(state, num_classes):
    """torchvision's COCO detectors index their 91 class columns by category id; keep the background and the 80
    used ids, in order, to get the 81 columns of the trainer's detectors (same logits, same boxes)."""
    rows = torch.tensor((0,) + COCO_CATEGORY_IDS)
    if not _has_coco91_columns(state) or num_classes != len(rows):
        return state
    box_rows = (rows[:, None] * 4 + torch.arange(4)).reshape(-1)  # 4 box deltas per class
    state = dict(state)
    for name, index in (("cls_score", rows), ("bbox_pred", box_rows)):
        for kind in ("weight", "bias"):
            key = f"roi_heads.box_predictor.{name}.{kind}"
            state[key] = state[key][index]
    return state


def load_detection_teacher(backbone: str, weights, num_classes: int, **build_kwargs):
    """A frozen teacher in eval mode: build_detector(backbone, num_classes, **build_kwargs) with `weights` loaded.

    weights: a checkpoint written by the trainer (a dict whose "student" is the detector state_dict), a detector
    state_dict file, or a torchvision weights name such as "FasterRCNN_ResNet50_FPN_Weights.COCO_V1" (resnet50
    only: torchvision's COCO Faster R-CNN R50-FPN; its 91 category-id columns are cut to the 81 used ones, and it
    gets head_style "torchvision", which it was trained with), or a detectron2 model-zoo checkpoint of Faster R-CNN
    R50-FPN / R101-FPN (a .pkl, or a .pth that detectron2 wrote; rankkd.detection.detectron2 converts it). Weights
    of another architecture are refused with one ValueError line naming the file and the fix."""
    pickled = detectron2.is_pickle_path(weights)
    source = (detectron2.read_pickle(weights) if pickled
              else load_state_dict_source(weights, "teacher weights", "--teacher-weights"))
    if pickled or detectron2.is_detectron2_checkpoint(source):
        return detectron2.load_teacher(backbone, source, weights, num_classes, **build_kwargs)
    state = _teacher_state(source, weights)
    if _has_coco91_columns(state):
        build_kwargs.setdefault("head_style", "torchvision")
    model = build_detector(backbone, num_classes, **build_kwargs)
    state = _coco91_to_contiguous(state, num_classes)
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    # Frozen batch norm has no num_batches_tracked, which a checkpoint of ordinary batch norm carries.
    unexpected = [key for key in state if key not in own and not key.endswith("num_batches_tracked")]
    wrong_shape = [key for key in own if key in state and state[key].shape != own[key].shape]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(f"{what} {keys[0]!r}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("different shape", wrong_shape)) if keys)
        raise ValueError(f"teacher weights {str(weights)!r} are not those of a {backbone} Faster R-CNN with "
                         f"{num_classes} classes ({detail}); pass the checkpoint of a {backbone} detector trained "
                         "on this dataset, or the teacher backbone those weights belong to")
    model.load_state_dict({key: value for key, value in state.items() if key in own})
    model.requires_grad_(False)
    return model.eval()
