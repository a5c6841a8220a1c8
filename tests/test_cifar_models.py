"""The CIFAR-100 model zoo (rankkd.models.cifar) against mdistiller's models: state_dict structure per model, the
output shapes, a float64 functional reference for the pre-activation WRN, and teacher loading from mdistiller's
checkpoint format, with its errors."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from rankkd.models import cifar

# name: (parameters, state_dict entries, sha256 of the sorted "key:shape" lines, first 16 hex digits), computed from
# mdistiller's own model definitions (mdistiller/models/cifar, 100 classes); the entries include BatchNorm's buffers.
MDISTILLER = {
    "resnet8": (83_892, 56, "166d31a811b31c5f"),
    "resnet14": (181_108, 92, "8525efa6fc491f19"),
    "resnet20": (278_324, 128, "6db44f39e3bff21f"),
    "resnet32": (472_756, 200, "325ee6108709f7b5"),
    "resnet44": (667_188, 272, "f1263f7b0ed71e1a"),
    "resnet56": (861_620, 344, "3977b81559d8630f"),
    "resnet110": (1_736_564, 668, "7f8e5ac1814e480a"),
    "resnet8x4": (1_233_540, 62, "5d5871b403f3a649"),
    "resnet32x4": (7_433_860, 206, "610ad29043c56b33"),
    "ResNet18": (11_220_132, 122, "bb5021dad9541605"),
    "ResNet50": (23_705_252, 320, "d4a9e0738c8f8385"),
    "wrn_16_1": (180_916, 82, "f6cf46040022f13d"),
    "wrn_16_2": (703_284, 83, "bdbc50a2b3205f84"),
    "wrn_40_1": (569_780, 226, "deef22602ae7584b"),
    "wrn_40_2": (2_255_156, 227, "bf5731c8e8e2b95f"),
    "vgg8": (3_965_028, 37, "d9f8d7533423754e"),
    "vgg11": (9_277_284, 58, "6592bd1869a5938f"),
    "vgg13": (9_462_180, 72, "7bec65f1ca17a0bf"),
    "vgg16": (14_774_436, 93, "b420ddff7e4306ec"),
    "vgg19": (20_086_692, 114, "2d318270df30c723"),
    "MobileNetV2": (812_836, 320, "10e9036e17013c38"),
    "ShuffleV1": (949_258, 296, "eb3bcbc847930cce"),
    "ShuffleV2": (1_355_528, 338, "b7e2c3e764687767"),
}

# A few keys of mdistiller's state_dicts spelled out: classifiers, shortcuts, Sequential indices, grouped convs.
KEY_SHAPES = {
    "resnet8": {"conv1.weight": (16, 3, 3, 3), "layer3.0.downsample.0.weight": (64, 32, 1, 1), "fc.weight": (100, 64)},
    "resnet8x4": {"layer1.0.downsample.1.running_var": (64,), "layer3.0.conv2.weight": (256, 256, 3, 3),
                  "fc.weight": (100, 256), "fc.bias": (100,)},
    "resnet32x4": {"layer1.4.bn2.num_batches_tracked": (), "fc.weight": (100, 256)},
    "ResNet18": {"layer4.0.shortcut.0.weight": (512, 256, 1, 1), "linear.weight": (100, 512)},
    "ResNet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "linear.weight": (100, 2048)},
    "wrn_40_2": {"block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.bn1.weight": (128,),
                 "bn1.running_mean": (128,), "fc.weight": (100, 128)},
    "wrn_16_1": {"block2.layer.0.convShortcut.weight": (32, 16, 1, 1), "fc.weight": (100, 64)},
    "vgg8": {"block0.0.bias": (64,), "block4.1.running_var": (512,), "classifier.weight": (100, 512)},
    "vgg13": {"block0.3.weight": (64, 64, 3, 3), "block4.4.num_batches_tracked": (), "classifier.bias": (100,)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.6.0.conv.3.weight": (480, 1, 3, 3), "conv2.0.weight": (1280, 160, 1, 1),
                    "classifier.0.weight": (100, 1280)},
    "ShuffleV1": {"layer1.0.conv1.weight": (54, 24, 1, 1), "layer2.0.conv3.weight": (240, 20, 1, 1),
                  "layer3.3.conv2.weight": (240, 1, 3, 3), "linear.weight": (100, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer3.3.conv2.weight": (232, 1, 3, 3),
                  "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)},
}


def structure_digest(state_dict):
    lines = sorted(f"{key}:{tuple(value.shape)}" for key, value in state_dict.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def randomize(model, seed):
    """Fresh random weights and BatchNorm statistics, so that eval-mode BN is not the identity and a wrong or missing
    key shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(tensor.dtype)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + noise.abs())
            elif tensor.dim() == 1:
                tensor.copy_((1.0 if name.endswith("weight") and "bn" in name else 0.0) + 0.1 * noise)
            else:
                tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
    return model


def test_names_are_mdistillers():
    assert cifar.NAMES == tuple(MDISTILLER)
    assert len(set(cifar.NAMES)) == 23


@pytest.mark.parametrize("name", cifar.NAMES)
def test_state_dict_and_output_shape(name):
    parameters, entries, digest = MDISTILLER[name]
    model = cifar.build_model(name)
    state_dict = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert len(state_dict) == entries
    assert structure_digest(state_dict) == digest
    for key, shape in KEY_SHAPES.get(name, {}).items():
        assert tuple(state_dict[key].shape) == shape, key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.eval()(x)
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 100) and logits.isfinite().all()
        assert cifar.build_model(name, num_classes=10).eval()(x).shape == (2, 10)


def wrn_reference(state_dict, x, depth):
    """WRN-depth-k written out with torch.nn.functional from its state_dict: pre-activation blocks whose projection
    shortcut reads relu(bn1(x)) and whose identity shortcut reads x."""
    def bn(prefix, h):
        return F.batch_norm(h, state_dict[f"{prefix}.running_mean"], state_dict[f"{prefix}.running_var"],
                            state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.bias"], eps=1e-5)

    h = F.conv2d(x, state_dict["conv1.weight"], padding=1)
    for stage in (1, 2, 3):
        for i in range((depth - 4) // 6):
            p = f"block{stage}.layer.{i}"
            stride = 2 if stage > 1 and i == 0 else 1
            a = F.relu(bn(f"{p}.bn1", h))
            out = F.conv2d(F.relu(bn(f"{p}.bn2", F.conv2d(a, state_dict[f"{p}.conv1.weight"], stride=stride,
                                                         padding=1))), state_dict[f"{p}.conv2.weight"], padding=1)
            shortcut = state_dict.get(f"{p}.convShortcut.weight")
            h = out + (h if shortcut is None else F.conv2d(a, shortcut, stride=stride))
    h = F.relu(bn("bn1", h)).mean((2, 3))
    return F.linear(h, state_dict["fc.weight"], state_dict["fc.bias"])


@pytest.mark.parametrize("name,depth", [("wrn_16_1", 16), ("wrn_16_2", 16)])
def test_wrn_matches_functional_reference(name, depth):
    model = randomize(cifar.build_model(name), seed=depth).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), wrn_reference(model.state_dict(), x, depth)) < 1e-12


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_load_teacher_from_mdistiller_checkpoint(tmp_path, name):
    source = randomize(cifar.build_model(name), seed=len(name)).eval()
    path = tmp_path / f"{name}_ckpt_epoch_240.pth"
    torch.save({"model": source.state_dict(), "epoch": 240, "best_acc": torch.tensor(77.0)}, path)
    teacher = cifar.load_teacher(name, path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), source(x))


def test_load_teacher_accepts_bare_and_rankkd_checkpoints(tmp_path):
    source = randomize(cifar.build_model("resnet8"), seed=1).eval()
    old_style = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    x = torch.randn(3, 3, 32, 32)
    expected = source(x).detach()
    for label, payload in [("bare", source.state_dict()), ("rankkd", {"student": source.state_dict(), "epoch": 3}),
                           ("pre-0.4.1 BatchNorm", old_style)]:
        path = tmp_path / f"{label}.pth"
        torch.save(payload, path)
        assert torch.equal(cifar.load_teacher("resnet8", path)(x), expected), label


def test_load_teacher_random_is_frozen_and_untrained():
    teacher = cifar.load_teacher("wrn_16_1", "random", num_classes=10)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.fc.out_features == 10


def test_load_teacher_class_count_mismatch_names_file(tmp_path):
    path = tmp_path / "ten_classes.pth"
    torch.save({"model": cifar.build_model("resnet8", num_classes=10).state_dict()}, path)
    with pytest.raises(ValueError, match=r"ten_classes\.pth.*has 10 classes.*100 are expected"):
        cifar.load_teacher("resnet8", path)


@pytest.mark.parametrize("saved,wanted,problem", [
    ("resnet8x4", "resnet32x4", r"missing keys layer1\.1\."),   # same widths, fewer blocks
    ("resnet20", "resnet8x4", r"unexpected keys layer1\.1\."),  # more blocks, other widths
    ("wrn_16_1", "wrn_16_2", r"missing keys block1\.layer\.0\.convShortcut\.weight; "  # half the width
                             r"shape mismatches block1\.layer\.0\.bn2\.bias \(16,\) \(expected \(32,\)\)"),
])
def test_load_teacher_other_models_checkpoint_names_file(tmp_path, saved, wanted, problem):
    path = tmp_path / f"{saved}.pth"
    torch.save({"model": cifar.build_model(saved).state_dict()}, path)
    with pytest.raises(ValueError, match=rf"{saved}\.pth.*does not hold '{wanted}' weights.*{problem}"):
        cifar.load_teacher(wanted, path)


def test_load_teacher_missing_file():
    with pytest.raises(ValueError, match="no_such_teacher.pth"):
        cifar.load_teacher("resnet8", "no_such_teacher.pth")


def test_build_rejects_unknown_names_and_class_counts():
    with pytest.raises(ValueError, match="unknown CIFAR model 'resnet50'. Did you mean ResNet50"):
        cifar.build_model("resnet50")
    with pytest.raises(ValueError, match="Did you mean MobileNetV2"):
        cifar.build_model("mobilenetv2")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            cifar.build_model("resnet8", num_classes=bad)
