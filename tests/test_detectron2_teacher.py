"""detectron2 model-zoo teachers (rankkd.detection.detectron2): Faster R-CNN R50-FPN checkpoints built here with
detectron2's key names and shapes (from its model code: ResNet with stride in the 1x1 conv, FPN, StandardRPNHead,
FastRCNNConvFCHead, FastRCNNOutputLayers; random values), in its three stored layouts, loaded through
load_detection_teacher, and checked against detectron2's computation written out here in float64."""
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchvision")

from rankkd.detection import detectron2  # noqa: E402
from rankkd.detection.distill import teacher_images  # noqa: E402
from rankkd.detection.models import build_detector  # noqa: E402
from rankkd.detection.teachers import load_detection_teacher  # noqa: E402

# ResNet-50: (stage, blocks, bottleneck channels, output channels) of res2-res5.
STAGES = ((2, 3, 64, 256), (3, 4, 128, 512), (4, 6, 256, 1024), (5, 3, 512, 2048))
NORM_STATS = ("weight", "bias", "running_mean", "running_var")
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
EPS = 1e-5  # detectron2's FrozenBatchNorm2d


def detectron2_r50_fpn(seed=0):
    """{detectron2 name: float32 array} of a COCO Faster R-CNN R50-FPN, values scaled to keep activations of order 1
    through the 0-255 input (He-normal convs, residual branches damped)."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, out, inp, size, bias=False, gain=1.0):
        std = gain * math.sqrt(2.0 / (inp * size * size))
        state[f"{name}.weight"] = (rng.standard_normal((out, inp, size, size), dtype=np.float32) * std)
        if bias:
            state[f"{name}.bias"] = rng.normal(0, 0.1, out).astype(np.float32)

    def norm(name, channels):
        state[f"{name}.norm.weight"] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        state[f"{name}.norm.bias"] = rng.normal(0, 0.1, channels).astype(np.float32)
        state[f"{name}.norm.running_mean"] = rng.normal(0, 0.2, channels).astype(np.float32)
        state[f"{name}.norm.running_var"] = rng.uniform(0.5, 2.0, channels).astype(np.float32)

    conv("backbone.bottom_up.stem.conv1", 64, 3, 7, gain=1 / 64)
    norm("backbone.bottom_up.stem.conv1", 64)
    channels = 64
    for stage, blocks, bottleneck, out in STAGES:
        for block in range(blocks):
            prefix = f"backbone.bottom_up.res{stage}.{block}"
            if block == 0:
                conv(f"{prefix}.shortcut", out, channels, 1)
                norm(f"{prefix}.shortcut", out)
            for index, (cout, cin, size) in enumerate(((bottleneck, channels, 1), (bottleneck, bottleneck, 3),
                                                       (out, bottleneck, 1)), start=1):
                conv(f"{prefix}.conv{index}", cout, cin, size, gain=0.3 if index == 3 else 1.0)
                norm(f"{prefix}.conv{index}", cout)
            channels = out
    for level, (_, _, _, out) in zip(range(2, 6), STAGES):
        conv(f"backbone.fpn_lateral{level}", 256, out, 1, bias=True)
        conv(f"backbone.fpn_output{level}", 256, 256, 3, bias=True)
    conv("proposal_generator.rpn_head.conv", 256, 256, 3, bias=True)
    conv("proposal_generator.rpn_head.objectness_logits", 3, 256, 1, bias=True)
    conv("proposal_generator.rpn_head.anchor_deltas", 12, 256, 1, bias=True)
    for name, (out, inp) in (("box_head.fc1", (1024, 256 * 7 * 7)), ("box_head.fc2", (1024, 1024)),
                             ("box_predictor.cls_score", (81, 1024)), ("box_predictor.bbox_pred", (320, 1024))):
        state[f"roi_heads.{name}.weight"] = (rng.standard_normal((out, inp), dtype=np.float32)
                                             * np.float32(math.sqrt(2.0 / inp)))
        state[f"roi_heads.{name}.bias"] = rng.normal(0, 0.1, out).astype(np.float32)
    return state


def detectron2_cell_anchors():
    """detectron2's DefaultAnchorGenerator cell anchors per level: w = sqrt(size^2 / ratio), h = ratio * w."""
    anchors = []
    for size in ANCHOR_SIZES:
        cells = []
        for ratio in ASPECT_RATIOS:
            w = math.sqrt(size * size / ratio)
            cells.append((-w / 2, -ratio * w / 2, w / 2, ratio * w / 2))
        anchors.append(np.array(cells, dtype=np.float32))
    return anchors


def zoo_file_contents(state):
    """The model zoo's .pkl layout: detectron2 names, plus the buffers old detectron2 versions saved."""
    model = dict(state)
    model["pixel_mean"] = np.array(PIXEL_MEAN_BGR, dtype=np.float32).reshape(3, 1, 1)
    model["pixel_std"] = np.ones((3, 1, 1), dtype=np.float32)
    for level, cells in enumerate(detectron2_cell_anchors()):
        model[f"proposal_generator.anchor_generator.cell_anchors.{level}"] = cells
    return {"model": model, "__author__": "Detectron2 Model Zoo"}


def caffe2_names(state):
    """The same weights as a Caffe2 (Detectron) pickle names and lays them out: background class first with its own
    box deltas, batch norm folded into a scale and a bias."""
    branch = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}
    blobs = {}
    for name, value in state.items():
        parts = name.split(".")
        if name.startswith("backbone.bottom_up.") and parts[-2] == "norm":
            continue
        if name == "backbone.bottom_up.stem.conv1.weight":
            blobs["conv1_w"] = value
        elif name.startswith("backbone.bottom_up.res"):  # backbone.bottom_up.res4.2.conv1.weight
            blobs[f"{parts[2]}_{parts[3]}_{branch[parts[4]]}_w"] = value
        elif name.startswith("backbone.fpn_"):  # backbone.fpn_lateral4.weight: fpn_inner_res4_5_sum_lateral_w
            level = int(parts[1][-1])
            last = STAGES[level - 2][1] - 1
            if "lateral" in name:  # the top level's lateral conv has no "_lateral" in its name
                kind = f"fpn_inner_res{level}_{last}_sum" + ("" if level == 5 else "_lateral")
            else:
                kind = f"fpn_res{level}_{last}_sum"
            blobs[f"{kind}_{parts[-1][0]}"] = value
        elif name.startswith("proposal_generator."):
            head = {"conv": "conv_rpn", "objectness_logits": "rpn_cls_logits", "anchor_deltas": "rpn_bbox_pred"}
            blobs[f"{head[parts[2]]}_fpn2_{parts[-1][0]}"] = value
        elif name.startswith("roi_heads.box_head."):
            blobs[f"fc{int(parts[2][-1]) + 5}_{parts[-1][0]}"] = value
        elif "cls_score" in name:
            blobs[f"cls_score_{parts[-1][0]}"] = np.concatenate([value[-1:], value[:-1]])
        else:
            background = np.random.default_rng(1).standard_normal((4,) + value.shape[1:]).astype(np.float32)
            blobs[f"bbox_pred_{parts[-1][0]}"] = np.concatenate([background, value])
    for name in state:
        if name.startswith("backbone.bottom_up.") and name.endswith(".norm.weight"):
            conv = name.removesuffix(".norm.weight")
            scale = state[name] / np.sqrt(state[f"{conv}.norm.running_var"] + EPS)
            shift = state[f"{conv}.norm.bias"] - state[f"{conv}.norm.running_mean"] * scale
            if conv.endswith("stem.conv1"):
                c2 = "res_conv1"
            else:  # backbone.bottom_up.res4.2.conv1: res4_2_branch2a
                stage, block, layer = conv.split(".")[2:]
                c2 = f"{stage}_{block}_{branch[layer]}"
            blobs[f"{c2}_bn_s"], blobs[f"{c2}_bn_b"] = scale, shift
    blobs |= {f"{name}_momentum": np.zeros_like(blobs[name]) for name in ("fc6_w", "fc6_b")}  # Detectron's SGD state
    return {"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"}


def expected_teacher_state(state):
    """Where each detectron2 weight must land in the torchvision teacher, enumerated from the architecture."""
    tensor = {name: torch.from_numpy(value) for name, value in state.items()}
    expected = {"backbone.body.conv1.weight": tensor["backbone.bottom_up.stem.conv1.weight"][:, [2, 1, 0]]}
    expected |= {f"backbone.body.bn1.{stat}": tensor[f"backbone.bottom_up.stem.conv1.norm.{stat}"]
                 for stat in NORM_STATS}
    for stage, blocks, _, _ in STAGES:
        for block in range(blocks):
            source, target = f"backbone.bottom_up.res{stage}.{block}", f"backbone.body.layer{stage - 1}.{block}"
            pairs = [(f"conv{k}", f"conv{k}", f"bn{k}") for k in (1, 2, 3)]
            pairs += [("shortcut", "downsample.0", "downsample.1")] if block == 0 else []
            for conv, target_conv, target_norm in pairs:
                expected[f"{target}.{target_conv}.weight"] = tensor[f"{source}.{conv}.weight"]
                expected |= {f"{target}.{target_norm}.{stat}": tensor[f"{source}.{conv}.norm.{stat}"]
                             for stat in NORM_STATS}
    for index, level in enumerate(range(2, 6)):
        for kind in ("weight", "bias"):
            expected[f"backbone.fpn.inner_blocks.{index}.0.{kind}"] = tensor[f"backbone.fpn_lateral{level}.{kind}"]
            expected[f"backbone.fpn.layer_blocks.{index}.0.{kind}"] = tensor[f"backbone.fpn_output{level}.{kind}"]
    for kind in ("weight", "bias"):
        rpn = "proposal_generator.rpn_head"
        expected[f"rpn.head.conv.0.0.{kind}"] = tensor[f"{rpn}.conv.{kind}"]
        expected[f"rpn.head.cls_logits.{kind}"] = tensor[f"{rpn}.objectness_logits.{kind}"]
        expected[f"rpn.head.bbox_pred.{kind}"] = tensor[f"{rpn}.anchor_deltas.{kind}"]
        expected[f"roi_heads.box_head.fc6.{kind}"] = tensor[f"roi_heads.box_head.fc1.{kind}"]
        expected[f"roi_heads.box_head.fc7.{kind}"] = tensor[f"roi_heads.box_head.fc2.{kind}"]
        classes = tensor[f"roi_heads.box_predictor.cls_score.{kind}"]
        expected[f"roi_heads.box_predictor.cls_score.{kind}"] = torch.cat([classes[80:], classes[:80]])
        deltas = tensor[f"roi_heads.box_predictor.bbox_pred.{kind}"]
        expected[f"roi_heads.box_predictor.bbox_pred.{kind}"] = torch.cat([torch.zeros_like(deltas[:4]), deltas])
    return expected


@pytest.fixture(scope="module")
def state():
    return detectron2_r50_fpn()


@pytest.fixture(scope="module")
def zoo_pickle(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("zoo") / "model_final_280758.pkl"
    with path.open("wb") as file:
        pickle.dump(zoo_file_contents(state), file, protocol=4)
    return path


@pytest.fixture(scope="module")
def teacher(zoo_pickle):
    return load_detection_teacher("resnet50", zoo_pickle, 81)


def test_zoo_pickle_round_trip_puts_every_tensor_where_it_belongs(state, teacher):
    loaded = teacher.state_dict()
    expected = expected_teacher_state(state)
    assert set(loaded) == set(expected)  # every weight of the teacher came from the file
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    body = teacher.backbone.body
    for layer in (body.layer2, body.layer3, body.layer4):  # MSRA: the stage's stride in its first 1x1 conv
        assert layer[0].conv1.stride == (2, 2) and layer[0].conv2.stride == (1, 1)
    assert body.layer1[0].conv1.stride == body.layer1[0].conv2.stride == (1, 1)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_pth_and_caffe2_pickle_load_the_same_teacher(state, teacher, tmp_path):
    # detectron2's own .pth: torch.save of {"model": state_dict, ...} with its trainer's extras.
    pth = tmp_path / "model_final.pth"
    torch.save({"model": {name: torch.from_numpy(value) for name, value in state.items()}, "iteration": 269999}, pth)
    from_pth = load_detection_teacher("resnet50", pth, 81).state_dict()
    assert all(torch.equal(from_pth[name], value) for name, value in teacher.state_dict().items())

    caffe2 = tmp_path / "model_final.pkl"  # a Caffe2 (Detectron) pickle
    caffe2.write_bytes(pickle.dumps(caffe2_names(state), protocol=4))
    from_caffe2 = load_detection_teacher("resnet50", caffe2, 81).state_dict()
    loaded = teacher.state_dict()
    norms = {name.removesuffix(".running_var") for name in loaded if name.endswith(".running_var")}
    for norm in norms:  # folded batch norm: the same affine map, up to detectron2's eps in the filled variance

        def affine(state_):
            scale = state_[f"{norm}.weight"].double() / (state_[f"{norm}.running_var"].double() + EPS).sqrt()
            return scale, state_[f"{norm}.bias"].double() - state_[f"{norm}.running_mean"].double() * scale

        for ours, reference in zip(affine(from_caffe2), affine(loaded)):
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6, msg=norm)
    for name, value in loaded.items():
        if name.rsplit(".", 1)[0] not in norms:
            assert torch.equal(from_caffe2[name], value), name


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_every_protocol_and_numpy_version_are_read(tmp_path, protocol):
    generator = np.random.default_rng(protocol)
    contents = {"model": {"a": generator.standard_normal((3, 5, 2)).astype(np.float32),
                          "b": np.arange(7, dtype=np.int64), "c": np.float32(2.5)},
                "__author__": "Detectron2 Model Zoo"}
    data = pickle.dumps(contents, protocol=protocol)
    if protocol == 2:  # as numpy 1 named its modules (the zoo's files); protocol 2 spells them out in the stream
        data = data.replace(b"numpy._core.", b"numpy.core.")
        assert b"numpy.core.multiarray" in data
    path = tmp_path / "arrays.pkl"
    path.write_bytes(data)
    read = detectron2.read_pickle(path)
    assert read["__author__"] == "Detectron2 Model Zoo" and read["model"].keys() == contents["model"].keys()
    for name, value in contents["model"].items():
        assert np.array_equal(read["model"][name], value) and read["model"][name].dtype == value.dtype


def detectron2_backbone(state, image):
    """detectron2's ResNet-50 (stride in 1x1, FrozenBatchNorm2d) + FPN + LastLevelMaxPool, in float64, on one
    normalised BGR image (C, H, W): p2-p6."""
    weight = {name: torch.from_numpy(value).double() for name, value in state.items()}

    def conv_norm(x, name, stride=1, padding=0, relu=True):
        x = F.conv2d(x, weight[f"{name}.weight"], stride=stride, padding=padding)
        mean, var = weight[f"{name}.norm.running_mean"], weight[f"{name}.norm.running_var"]
        x = (x - mean[:, None, None]) / (var[:, None, None] + EPS).sqrt()
        x = x * weight[f"{name}.norm.weight"][:, None, None] + weight[f"{name}.norm.bias"][:, None, None]
        return x.relu() if relu else x

    x = conv_norm(image[None].double(), "backbone.bottom_up.stem.conv1", stride=2, padding=3)
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    stages = []
    for stage, blocks, _, _ in STAGES:
        for block in range(blocks):
            name = f"backbone.bottom_up.res{stage}.{block}"
            stride = 2 if block == 0 and stage > 2 else 1
            out = conv_norm(x, f"{name}.conv1", stride=stride)
            out = conv_norm(out, f"{name}.conv2", padding=1)
            out = conv_norm(out, f"{name}.conv3", relu=False)
            shortcut = conv_norm(x, f"{name}.shortcut", stride=stride, relu=False) if block == 0 else x
            x = (out + shortcut).relu()
        stages.append(x)
    laterals = [F.conv2d(feature, weight[f"backbone.fpn_lateral{level}.weight"],
                         weight[f"backbone.fpn_lateral{level}.bias"]) for level, feature in zip(range(2, 6), stages)]
    outputs, top_down = [], None
    for level in (5, 4, 3, 2):
        lateral = laterals[level - 2]
        top_down = lateral if top_down is None else lateral + F.interpolate(top_down, scale_factor=2.0,
                                                                            mode="nearest")
        outputs.insert(0, F.conv2d(top_down, weight[f"backbone.fpn_output{level}.weight"],
                                   weight[f"backbone.fpn_output{level}.bias"], padding=1))
    return outputs + [F.max_pool2d(outputs[-1], kernel_size=1, stride=2)]


def test_backbone_rpn_head_and_anchors_compute_what_detectron2_does(state, teacher):
    generator = torch.Generator().manual_seed(3)
    # RGB in [0, 1], as the loaders give, padded to 128 x 128.
    image = torch.randint(0, 256, (3, 100, 127), generator=generator).float() / 255
    image_list, _ = teacher.transform([image])
    assert image_list.tensors.shape == (1, 3, 128, 128)
    with torch.no_grad():
        features = list(teacher.backbone(image_list.tensors).values())
    # detectron2: BGR in 0-255 minus the pixel mean, padded with 0 to a multiple of 32.
    bgr = image.double()[[2, 1, 0]] * 255 - torch.tensor(PIXEL_MEAN_BGR, dtype=torch.float64)[:, None, None]
    reference = detectron2_backbone(state, F.pad(bgr, (0, 128 - 127, 0, 128 - 100)))
    assert len(features) == len(reference) == 5
    for ours, expected in zip(features, reference):
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    # StandardRPNHead: shared 3x3 conv + ReLU, then objectness logits (A) and anchor deltas (A x 4) per level.
    weight = {name: torch.from_numpy(value).double() for name, value in state.items()}
    with torch.no_grad():
        logits, deltas = teacher.rpn.head(features)
    for ours_logits, ours_deltas, feature in zip(logits, deltas, reference):
        rpn = "proposal_generator.rpn_head"
        hidden = F.conv2d(feature, weight[f"{rpn}.conv.weight"], weight[f"{rpn}.conv.bias"], padding=1).relu()
        for ours, kind in ((ours_logits, "objectness_logits"), (ours_deltas, "anchor_deltas")):
            expected = F.conv2d(hidden, weight[f"{rpn}.{kind}.weight"], weight[f"{rpn}.{kind}.bias"])
            torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())

    # Anchors: detectron2's cell anchors shifted by the level's stride over its grid, location-major.
    anchors = teacher.rpn.anchor_generator(image_list, features)[0]
    expected = []
    for level, cells in enumerate(detectron2_cell_anchors()):
        stride, (height, width) = 4 * 2**level, features[level].shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(height) * stride, torch.arange(width) * stride, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).double()
        expected.append((shifts + torch.from_numpy(cells).double()).reshape(-1, 4))
    torch.testing.assert_close(anchors.double(), torch.cat(expected), rtol=0, atol=1e-4)


def test_box_head_gives_detectron2s_class_scores_and_boxes(state, teacher):
    """FastRCNNOutputLayers: softmax over 81 logits (background last), per-class boxes decoded with weights
    (10, 10, 5, 5) from the 80 x 4 deltas; the teacher's columns 1-80 must give the same."""
    generator = torch.Generator().manual_seed(5)
    pooled = torch.randn(37, 256, 7, 7, generator=generator)
    corner = torch.rand(37, 2, generator=generator) * 300
    proposals = torch.cat([corner, corner + 8 + torch.rand(37, 2, generator=generator) * 200], dim=1)
    with torch.no_grad():
        logits, deltas = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(pooled))
    scores = logits.double().softmax(-1)[:, 1:]
    boxes = teacher.roi_heads.box_coder.decode(deltas, [proposals]).reshape(37, 81, 4)[:, 1:]

    weight = {name: torch.from_numpy(value).double() for name, value in state.items()}
    hidden = pooled.double().flatten(1)
    for fc in ("fc1", "fc2"):
        hidden = F.linear(hidden, weight[f"roi_heads.box_head.{fc}.weight"],
                          weight[f"roi_heads.box_head.{fc}.bias"]).relu()
    d2_logits = F.linear(hidden, weight["roi_heads.box_predictor.cls_score.weight"],
                         weight["roi_heads.box_predictor.cls_score.bias"])
    d2_deltas = F.linear(hidden, weight["roi_heads.box_predictor.bbox_pred.weight"],
                         weight["roi_heads.box_predictor.bbox_pred.bias"]).reshape(37, 80, 4)
    d2_scores = d2_logits.softmax(-1)[:, :80]
    widths, heights = (proposals[:, 2] - proposals[:, 0]).double(), (proposals[:, 3] - proposals[:, 1]).double()
    centre_x, centre_y = proposals[:, 0].double() + widths / 2, proposals[:, 1].double() + heights / 2
    dx, dy = d2_deltas[..., 0] / 10, d2_deltas[..., 1] / 10
    dw, dh = (d2_deltas[..., 2] / 5).clamp(max=math.log(1000 / 16)), (d2_deltas[..., 3] / 5).clamp(
        max=math.log(1000 / 16))
    x = dx * widths[:, None] + centre_x[:, None]
    y = dy * heights[:, None] + centre_y[:, None]
    w, h = dw.exp() * widths[:, None], dh.exp() * heights[:, None]
    d2_boxes = torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=-1)

    torch.testing.assert_close(scores, d2_scores, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(boxes.double(), d2_boxes, rtol=1e-5, atol=1e-3)


def test_teacher_reads_the_students_padded_batch_in_its_own_normalisation(teacher):
    student = build_detector("demo_tiny", 81, fpn_channels=16, box_head_dim=32)
    generator = torch.Generator().manual_seed(7)
    images = [torch.randint(0, 256, (3, 50, 70), generator=generator).float() / 255,
              torch.randint(0, 256, (3, 64, 45), generator=generator).float() / 255]
    image_list, _ = student.transform(images)
    batch = teacher_images(student, teacher, image_list)
    assert batch.shape == image_list.tensors.shape == (2, 3, 64, 96)
    # conv1 was flipped to read RGB, so the teacher's input is detectron2's BGR input in RGB order.
    mean = torch.tensor(PIXEL_MEAN_BGR[::-1], dtype=torch.float64)[:, None, None]
    for index, image in enumerate(images):
        height, width = image.shape[-2:]
        expected = torch.zeros(3, 64, 96, dtype=torch.float64)
        expected[:, :height, :width] = image.double() * 255 - mean
        torch.testing.assert_close(batch[index].double(), expected, rtol=0, atol=1e-3)
        assert (batch[index, :, height:] == 0).all() and (batch[index, :, :, width:] == 0).all()
    torch.testing.assert_close(batch, teacher.transform(images)[0].tensors, rtol=0, atol=1e-3)


class _Poison:
    """A pickled object whose unpickling calls `function(argument)`."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function", ["os.system", "builtins.eval"])
def test_a_pickle_that_names_code_is_refused_without_running_it(tmp_path, function):
    marker = tmp_path / "ran"
    poison = (_Poison(os.system, f"touch {marker}") if function == "os.system"
              else _Poison(eval, f"open({str(marker)!r}, 'w').close()"))
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"backbone.bottom_up.stem.conv1.weight": poison},
                                   "__author__": "Detectron2 Model Zoo"}))
    named = "posix.system" if function == "os.system" else "builtins.eval"
    with pytest.raises(ValueError, match=rf"cannot read teacher weights .*model_final\.pkl.*{named}.*nothing in the "
                                         "file was run"):
        load_detection_teacher("resnet50", path, 81)
    assert not marker.exists()


def test_weights_that_do_not_fit_are_refused_naming_the_first_key(state):
    def refused(contents, match, backbone="resnet50", num_classes=81):
        with pytest.raises(ValueError, match=match):
            detectron2.load_teacher(backbone, contents, "zoo.pkl", num_classes)

    extra = dict(state, **{"backbone.bottom_up.res4.0.conv4.weight": state["backbone.bottom_up.res4.0.conv3.weight"]})
    refused({"model": extra}, r"'zoo\.pkl'.*unexpected key 'backbone\.bottom_up\.res4\.0\.conv4\.weight'")
    missing = {name: value for name, value in state.items() if name != "roi_heads.box_head.fc2.bias"}
    refused({"model": missing}, r"no weights for .*'roi_heads\.box_head\.fc7\.bias'")
    coco91 = dict(state, **{"roi_heads.box_predictor.cls_score.weight": np.zeros((91, 1024), np.float32)})
    refused({"model": coco91}, r"'roi_heads\.box_predictor\.cls_score\.weight' has shape \(91, 1024\)")
    anchors = zoo_file_contents(state)
    anchors["model"]["proposal_generator.anchor_generator.cell_anchors.0"] = np.round(
        anchors["model"]["proposal_generator.anchor_generator.cell_anchors.0"])
    refused(anchors, r"other anchors.*'proposal_generator\.anchor_generator\.cell_anchors\.0'")
    refused({"model": dict(state, **{"pixel_mean": np.zeros(4, np.float32)})}, r"'pixel_mean' holds")
    refused({"model": dict(state, **{"roi_heads.box_head.fc1.bias": "fc1"})},
            r"'roi_heads\.box_head\.fc1\.bias' holds a str, not an array of numbers")
    refused({"model": state}, r"resnet50 model \(6 blocks in res4\); the teacher backbone is resnet101",
            backbone="resnet101")
    refused({"model": state}, r"resnet50 or resnet101 teacher.*'resnet18'", backbone="resnet18")
    refused({"model": state}, r"80 classes and the background\); the data has 3 classes", num_classes=4)
    blob = caffe2_names(state)
    blob["blobs"]["res4_0_branch2d_w"] = blob["blobs"]["res4_0_branch2c_w"]
    refused(blob, r"not a Caffe2 Faster R-CNN FPN.*unexpected key 'res4_0_branch2d_w'")
