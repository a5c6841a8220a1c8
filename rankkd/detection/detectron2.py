"""detectron2's model-zoo Faster R-CNN R50-FPN and R101-FPN (1x, 3x) as teachers: their checkpoints loaded into the
torchvision FasterRCNN that rankkd.detection.models.build_detector makes, without detectron2.

Files. The zoo's `.pkl` (a pickled {"model": {name: numpy array}, "__author__": ...}) is read by an unpickler that
builds numpy arrays and plain containers only and refuses any other object without calling it (a pickle can name
any callable, e.g. os.system); a `.pth` that detectron2 wrote (torch.save of {"model": state_dict, ...}) is read with
weights_only=True. A pickle of Caffe2 (Detectron) names ("res2_0_branch2a_w", "__author__": "Caffe2") is renamed
first, with detectron2's rules: background moved from the first class to the last, its box deltas dropped, batch norm
stored as scale and bias alone given mean 0 and variance 1.

What differs from build_detector's model, and how it is made the same:
- body: MSRA ResNets (detectron2 STRIDE_IN_1X1) downsample in each stage's first 1x1 conv, torchvision's in the
  3x3; both use frozen batch norm with eps 1e-5 and the same stem (7x7 conv, 3x3 max pool);
- input: BGR in 0-255 minus the checkpoint's pixel mean, divided by its pixel std (Base-RCNN-FPN: mean 103.53,
  116.28, 123.675; std 1). conv1's input channels are reversed at load time, so the teacher reads RGB like every
  other detector here, and its transform normalises by mean / 255 and std / 255: the same numbers;
- anchors, RoI pooler and box coder: build_detector's head_style "detectron2" (rankkd.detection.heads: exact anchor
  sizes, ROIAlignV2), which the teacher is built with; its RPN and RoI settings are Base-RCNN-FPN's;
- classes: detectron2's 81 class logits put the background last, torchvision's first; its box regression has 80 x 4
  outputs (no background row), torchvision's 81 x 4: the rows are moved, and the background's box rows (which
  torchvision never reads) are zero. Box regression weights (10, 10, 5, 5) and (1, 1, 1, 1) in the RPN are the same;
- names: bottom_up.res{2-5} -> body.layer{1-4} (shortcut -> downsample), fpn_lateral{2-5} / fpn_output{2-5} ->
  fpn.inner_blocks / layer_blocks [0-3], rpn_head conv / objectness_logits / anchor_deltas -> rpn.head conv /
  cls_logits / bbox_pred, box_head fc1 / fc2 -> fc6 / fc7. Every key of the file is accounted for: loaded, or one of
  detectron2's buffers (pixel_mean and pixel_std, read for the normalisation; cell_anchors, checked against the
  teacher's); anything else is refused, one line naming the first key that does not fit.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from rankkd.detection.models import build_detector

# The teacher backbones a zoo checkpoint loads into, and how many blocks res4 has in each (ResNet-50: 6, 101: 23).
RESNET_RES4_BLOCKS = {"resnet50": 6, "resnet101": 23}
# Base-RCNN-FPN's PIXEL_MEAN and PIXEL_STD (BGR, 0-255): the MSRA weights' input, when the file does not say.
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
PIXEL_STD_BGR = (1.0, 1.0, 1.0)
COCO_CLASSES = 80

# Key prefixes only detectron2 uses (torchvision's detectors share "roi_heads.").
_DETECTRON2_PREFIXES = ("backbone.bottom_up.", "backbone.fpn_", "proposal_generator.")
_NORM = r"(weight|bias|running_mean|running_var)"
_PARAM = r"(weight|bias)"

# detectron2 name -> torchvision FasterRCNN name.
_RENAMES = (
    (r"backbone\.bottom_up\.stem\.conv1\.weight", lambda m: "backbone.body.conv1.weight"),
    (rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_NORM}", lambda m: f"backbone.body.bn1.{m[1]}"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.{_NORM}",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_NORM}",
     lambda m: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
    (rf"backbone\.fpn_lateral([2-5])\.{_PARAM}", lambda m: f"backbone.fpn.inner_blocks.{int(m[1]) - 2}.0.{m[2]}"),
    (rf"backbone\.fpn_output([2-5])\.{_PARAM}", lambda m: f"backbone.fpn.layer_blocks.{int(m[1]) - 2}.0.{m[2]}"),
    (rf"proposal_generator\.rpn_head\.conv\.{_PARAM}", lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (rf"proposal_generator\.rpn_head\.objectness_logits\.{_PARAM}", lambda m: f"rpn.head.cls_logits.{m[1]}"),
    (rf"proposal_generator\.rpn_head\.anchor_deltas\.{_PARAM}", lambda m: f"rpn.head.bbox_pred.{m[1]}"),
    (rf"roi_heads\.box_head\.fc([12])\.{_PARAM}", lambda m: f"roi_heads.box_head.fc{int(m[1]) + 5}.{m[2]}"),
    (rf"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.{_PARAM}", lambda m: m[0]),
)
# detectron2's buffers that are no weights: read (pixel statistics) or checked (anchors), not loaded.
_PIXEL_KEYS = ("pixel_mean", "pixel_std")
_CELL_ANCHORS = re.compile(r"proposal_generator\.anchor_generator\.cell_anchors\.(\d+)")

# Caffe2 (Detectron) name -> detectron2 name, as detectron2's c2_model_loading renames a Faster R-CNN FPN.
_CAFFE2_STATS = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_CAFFE2_PARAMS = {"w": "weight", "b": "bias"}
_CAFFE2_BRANCHES = {"branch1": "shortcut", "branch2a": "conv1", "branch2b": "conv2", "branch2c": "conv3"}
_CAFFE2_RENAMES = (
    (r"conv1_w", lambda m: "backbone.bottom_up.stem.conv1.weight"),
    (r"res_conv1_bn_(s|b|rm|riv)", lambda m: f"backbone.bottom_up.stem.conv1.norm.{_CAFFE2_STATS[m[1]]}"),
    (r"res(\d)_(\d+)_(branch1|branch2[abc])_w",
     lambda m: f"backbone.bottom_up.res{m[1]}.{m[2]}.{_CAFFE2_BRANCHES[m[3]]}.weight"),
    (r"res(\d)_(\d+)_(branch1|branch2[abc])_bn_(s|b|rm|riv)",
     lambda m: f"backbone.bottom_up.res{m[1]}.{m[2]}.{_CAFFE2_BRANCHES[m[3]]}.norm.{_CAFFE2_STATS[m[4]]}"),
    # The top level's lateral conv is "fpn_inner_res5_2_sum", the others "fpn_inner_res4_5_sum_lateral".
    (r"fpn_inner_res(\d)_\d+_sum(?:_lateral)?_([wb])", lambda m: f"backbone.fpn_lateral{m[1]}.{_CAFFE2_PARAMS[m[2]]}"),
    (r"fpn_res(\d)_\d+_sum_([wb])", lambda m: f"backbone.fpn_output{m[1]}.{_CAFFE2_PARAMS[m[2]]}"),
    # Detectron shares the RPN head over the levels and stores it once, under level 2's name.
    (r"conv_rpn_fpn2_([wb])", lambda m: f"proposal_generator.rpn_head.conv.{_CAFFE2_PARAMS[m[1]]}"),
    (r"rpn_cls_logits_fpn2_([wb])",
     lambda m: f"proposal_generator.rpn_head.objectness_logits.{_CAFFE2_PARAMS[m[1]]}"),
    (r"rpn_bbox_pred_fpn2_([wb])", lambda m: f"proposal_generator.rpn_head.anchor_deltas.{_CAFFE2_PARAMS[m[1]]}"),
    (r"fc([67])_([wb])", lambda m: f"roi_heads.box_head.fc{int(m[1]) - 5}.{_CAFFE2_PARAMS[m[2]]}"),
    (r"(cls_score|bbox_pred)_([wb])", lambda m: f"roi_heads.box_predictor.{m[1]}.{_CAFFE2_PARAMS[m[2]]}"),
)


def _rename(name, renames):
    for pattern, target in renames:
        match = re.fullmatch(pattern, name)
        if match:
            return target(match)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Reading.


def _numpy_globals():
    """What a pickle of numpy arrays and plain containers names: numpy's array, dtype and scalar reconstruction
    (under numpy 1's module names and numpy 2's), OrderedDict, and codecs.encode (protocol 2 stores bytes as a call of
    it). Nothing here runs code of the file's choosing: each rebuilds data from the arguments the file gives."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("collections", "OrderedDict"): collections.OrderedDict, ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        allowed |= {(f"{package}.multiarray", "_reconstruct"): multiarray._reconstruct,
                    (f"{package}.multiarray", "scalar"): multiarray.scalar,
                    (f"{package}.numeric", "_frombuffer"): numeric._frombuffer}
    return allowed


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    allowed = _numpy_globals()

    def find_class(self, module, name):
        found = self.allowed.get((module, name))
        if found is None:
            raise _ForbiddenGlobal(f"it names {module}.{name}, which a file of numpy arrays never needs (refused, "
                                   "nothing in the file was run)")
        return found


def is_pickle_path(weights):
    """Whether `weights` names a .pkl file: detectron2's zoo format (rankkd writes none)."""
    return isinstance(weights, (str, os.PathLike)) and Path(weights).suffix == ".pkl"


def read_pickle(path, what="teacher weights"):
    """The object in the pickle file `path` (detectron2's model zoo: {"model": {name: array}, "__author__": ...}),
    built from numpy arrays and plain containers only: a pickle naming any other callable is refused before anything
    it names is called. A ValueError of one line, starting "cannot read {what} '{path}':", says what is wrong."""
    path = Path(path).expanduser()

    def unreadable(problem):
        return ValueError(f"cannot read {what} {str(path)!r}: {problem}")

    try:
        with path.open("rb") as file:
            # latin1: Python 2 pickles (Caffe2's) store arrays' bytes as str, which numpy reads back from latin1.
            return _ArrayUnpickler(file, encoding="latin1").load()
    except FileNotFoundError:
        raise unreadable("no such file") from None
    except IsADirectoryError:
        raise unreadable("it is a folder, not a file") from None
    except _ForbiddenGlobal as error:
        raise unreadable(str(error)) from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001  a torn or foreign file fails anywhere inside pickle or numpy
        raise unreadable(f"it is not a complete pickle of numpy arrays ({type(error).__name__}: {error})") from None


def is_detectron2_checkpoint(checkpoint):
    """Whether a loaded torch.save file holds a detectron2 model: {"model": state_dict, ...} or a bare state_dict
    with detectron2's names (backbone.bottom_up..., proposal_generator...)."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    return isinstance(state, dict) and any(str(key).startswith(_DETECTRON2_PREFIXES) for key in state)


def _tensors_of(checkpoint, where):
    """{detectron2 name: float32 tensor} from a loaded pickle or torch file, Caffe2 names converted."""
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{where} hold a {type(checkpoint).__name__}, not a detectron2 checkpoint (a dict with "
                         "'model')")
    # detectron2's own rule: a zoo file has "model" and "__author__"; else a Caffe2 file, its weights under "blobs".
    weights = checkpoint["model"] if "model" in checkpoint else checkpoint.get("blobs", checkpoint)
    if not (isinstance(weights, dict) and weights):
        raise ValueError(f"{where} hold no weights under 'model'")
    tensors = {}
    for name, value in weights.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            tensors[str(name)] = torch.from_numpy(np.asarray(value, dtype=np.float32))
        elif isinstance(value, torch.Tensor) and not value.is_complex() and value.dtype != torch.bool:
            tensors[str(name)] = value.float()
        else:
            raise ValueError(f"{where}: {name!r} holds a {type(value).__name__}, not an array of numbers")
    if not any(name.startswith(_DETECTRON2_PREFIXES) for name in tensors):
        tensors = _from_caffe2_names(tensors, where)
    return tensors


def _from_caffe2_names(weights, where):
    """detectron2's names and layout for a Caffe2 Faster R-CNN FPN: background class last and no box deltas for it;
    batch norm given as scale and bias alone gets mean 0 and variance 1, as detectron2's FrozenBatchNorm2d fills
    them (a 5e-6 relative difference from Caffe2's exact affine, which detectron2 has too)."""
    renamed = {}
    for name, value in weights.items():
        if name.endswith("_momentum"):  # SGD state that Detectron saved with the weights
            continue
        new = _rename(name, _CAFFE2_RENAMES)
        if new is None:
            raise ValueError(f"{where} are not a Caffe2 Faster R-CNN FPN (R-50 / R-101): unexpected key {name!r}")
        if new.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[1:], value[:1]])
        elif new.startswith("roi_heads.box_predictor.bbox_pred."):
            value = value[4:]
        renamed[new] = value
    for name, value in list(renamed.items()):
        norm = name.removesuffix("weight")
        if name.endswith(".norm.weight") and norm + "running_mean" not in renamed:
            renamed[norm + "running_mean"] = torch.zeros_like(value)
            renamed[norm + "running_var"] = torch.ones_like(value)
    return renamed


# ----------------------------------------------------------------------------------------------------------------------
# The model.


def move_strides_to_1x1(body):
    """Make a torchvision ResNet body (bottleneck blocks) an MSRA one: each stage's first block downsamples in its
    1x1 conv instead of its 3x3, as detectron2's STRIDE_IN_1X1 ResNets (the zoo's R50 / R101) do."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(body, name)[0]
        block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


def _pixel_statistics(weights, where):
    """The checkpoint's pixel mean and std (BGR, 0-255), Base-RCNN-FPN's when it carries none."""
    statistics = []
    for key, default in zip(_PIXEL_KEYS, (PIXEL_MEAN_BGR, PIXEL_STD_BGR)):
        value = weights.get(key)
        if value is None:
            statistics.append(default)
            continue
        if value.numel() != 3 or (key == "pixel_std" and not bool((value > 0).all())):
            raise ValueError(f"{where}: {key!r} holds {value.reshape(-1).tolist()}, not 3 channel values (BGR)")
        statistics.append(tuple(value.reshape(-1).tolist()))
    return statistics


def _torchvision_state(weights, model, where):
    """model's state_dict filled from detectron2's `weights`; a ValueError names the first key that does not fit."""
    own = model.state_dict()
    state = {}
    for name, value in weights.items():
        if name in _PIXEL_KEYS:
            continue
        level = _CELL_ANCHORS.fullmatch(name)
        if level is not None:
            anchors = model.rpn.anchor_generator.cell_anchors
            index = int(level[1])
            if index >= len(anchors) or value.shape != anchors[index].shape or not torch.allclose(
                    value, anchors[index], atol=1e-3):
                raise ValueError(f"{where} hold other anchors than detectron2's Base-RCNN-FPN (sizes 32-512, "
                                 f"ratios 0.5, 1, 2): {name!r} is {value.tolist()}")
            continue
        target = _rename(name, _RENAMES)
        if target is None or target not in own:
            raise ValueError(f"{where} are not a detectron2 Faster R-CNN R50-FPN / R101-FPN: unexpected key {name!r}")
        if target == "backbone.body.conv1.weight":
            value = value.flip(1)  # BGR -> RGB input channels
        elif target.startswith("roi_heads.box_predictor.cls_score."):
            value = torch.cat([value[-1:], value[:-1]])  # background last -> first
        elif target.startswith("roi_heads.box_predictor.bbox_pred."):
            value = torch.cat([value.new_zeros((4,) + value.shape[1:]), value])  # no deltas for the background
        if value.shape != own[target].shape:
            raise ValueError(f"{where}: {name!r} has shape {tuple(value.shape)} where the teacher has "
                             f"{tuple(own[target].shape)} ({target})")
        state[target] = value
    missing = [key for key in own if key not in state]
    if missing:
        raise ValueError(f"{where} are not a detectron2 Faster R-CNN R50-FPN / R101-FPN: no weights for {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return state


def load_teacher(backbone: str, checkpoint, weights, num_classes: int, **build_kwargs):
    """A frozen teacher in eval mode from a detectron2 checkpoint: build_detector(backbone, num_classes,
    **build_kwargs) with an MSRA body, conv1 reading RGB and the checkpoint's pixel statistics in its transform.
    checkpoint: what read_pickle or rankkd._torchfile.load_torch_file read from `weights` (the path, for messages).
    backbone: resnet50 or resnet101, as the checkpoint's depth; num_classes: 81 (COCO)."""

    where = f"teacher weights {str(weights)!r}"
    if backbone not in RESNET_RES4_BLOCKS:
        raise ValueError(f"{where} are a detectron2 checkpoint, which loads as a resnet50 or resnet101 teacher "
                         f"(R50-FPN, R101-FPN); the teacher backbone is {backbone!r}")
    if num_classes != COCO_CLASSES + 1:
        raise ValueError(f"{where} are a COCO detector ({COCO_CLASSES} classes and the background); the data has "
                         f"{num_classes - 1} classes")
    tensors = _tensors_of(checkpoint, where)
    res4_blocks = 1 + max((int(match[1]) for name in tensors
                           if (match := re.match(r"backbone\.bottom_up\.res4\.(\d+)\.", name))), default=-1)
    depth = {blocks: name for name, blocks in RESNET_RES4_BLOCKS.items()}.get(res4_blocks)
    if depth is not None and depth != backbone:
        raise ValueError(f"{where} are a detectron2 {depth} model ({res4_blocks} blocks in res4); the teacher "
                         f"backbone is {backbone}: give the teacher backbone the checkpoint was trained with")
    # The zoo's weights learnt with detectron2's exact anchors and ROIAlignV2.
    model = build_detector(backbone, num_classes, **build_kwargs | {"head_style": "detectron2"})
    move_strides_to_1x1(model.backbone.body)
    mean_bgr, std_bgr = _pixel_statistics(tensors, where)
    model.load_state_dict(_torchvision_state(tensors, model, where))
    # conv1 now reads RGB; the transform's (x - mean) / std on [0, 1] images is (255 x - 255 mean) / (255 std).
    model.transform.image_mean = [value / 255 for value in reversed(mean_bgr)]
    model.transform.image_std = [value / 255 for value in reversed(std_bgr)]
    model.requires_grad_(False)
    return model.eval()

