"""mobilenet_v1: mdistiller's ImageNet MobileNetV1 layout (keys, shapes, parameter count), its math against a
functional float64 forward written from the paper's block list, and loading an mdistiller-format checkpoint."""
import pytest
import torch
import torch.nn.functional as F

from rankkd.models import build_model, load_teacher

# mdistiller/models/imagenet/mobilenetv1.py: a 3 -> 32 stride-2 3x3 convolution, then (in, out, stride) of the 13
# depthwise-separable blocks; 1024 features into fc.
SEPARABLE = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1),
             (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 1024, 2), (1024, 1024, 1)]


def batch_norm_entries(prefix, channels):
    return [(f"{prefix}.weight", (channels,)), (f"{prefix}.bias", (channels,)), (f"{prefix}.running_mean", (channels,)),
            (f"{prefix}.running_var", (channels,)), (f"{prefix}.num_batches_tracked", ())]


def expected_state_dict_layout(num_classes):
    entries = [("model.0.0.weight", (32, 3, 3, 3)), *batch_norm_entries("model.0.1", 32)]
    for block, (cin, cout, _) in enumerate(SEPARABLE, start=1):
        entries += [(f"model.{block}.0.weight", (cin, 1, 3, 3)), *batch_norm_entries(f"model.{block}.1", cin),
                    (f"model.{block}.3.weight", (cout, cin, 1, 1)), *batch_norm_entries(f"model.{block}.4", cout)]
    return entries + [("fc.weight", (num_classes, 1024)), ("fc.bias", (num_classes,))]


def randomize_batch_norm(model, generator):
    """Non-trivial running statistics and affine parameters, so that eval-mode outputs test the whole layout."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
    return model


def functional_forward(state, images):
    """MobileNetV1 written directly from the block list above, with F.conv2d / F.batch_norm in float64."""
    def conv_bn_relu(x, conv, bn, stride, groups):
        x = F.conv2d(x, state[f"{conv}.weight"], stride=stride, padding=state[f"{conv}.weight"].shape[-1] // 2,
                     groups=groups)
        x = F.batch_norm(x, state[f"{bn}.running_mean"], state[f"{bn}.running_var"], state[f"{bn}.weight"],
                         state[f"{bn}.bias"], training=False, eps=1e-5)
        return x.clamp_min(0)

    x = conv_bn_relu(images, "model.0.0", "model.0.1", stride=2, groups=1)
    for block, (cin, _, stride) in enumerate(SEPARABLE, start=1):
        x = conv_bn_relu(x, f"model.{block}.0", f"model.{block}.1", stride=stride, groups=cin)
        x = conv_bn_relu(x, f"model.{block}.3", f"model.{block}.4", stride=1, groups=1)
    return x.mean(dim=(2, 3)) @ state["fc.weight"].T + state["fc.bias"]


@pytest.mark.parametrize("num_classes", [1000, 37])
def test_keys_and_shapes_match_mdistiller(num_classes):
    state = build_model("mobilenet_v1", num_classes).state_dict()
    got = [(key, tuple(value.shape)) for key, value in state.items()]
    assert got == expected_state_dict_layout(num_classes)
    assert got[0] == ("model.0.0.weight", (32, 3, 3, 3))
    assert got[-1] == ("fc.bias", (num_classes,))
    assert len(got) == 164


def test_parameter_count_is_mdistillers():
    model = build_model("mobilenet_v1", 1000)
    assert sum(p.numel() for p in model.parameters()) == 4_231_976


@pytest.mark.parametrize("size", [224, 65])
def test_logits_match_a_functional_float64_forward(size):
    generator = torch.Generator().manual_seed(size)
    model = randomize_batch_norm(build_model("mobilenet_v1", 11), generator).double().eval()
    images = torch.randn(3, 3, size, size, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 11)
    expected = functional_forward({k: v.double() for k, v in model.state_dict().items()}, images)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)


def test_round_trip_through_an_mdistiller_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(7)
    source = randomize_batch_norm(build_model("mobilenet_v1", 1000), generator).eval()
    path = tmp_path / "student_best"
    torch.save({"model": source.state_dict(), "epoch": 100}, path)  # mdistiller's checkpoint format

    loaded = load_teacher("mobilenet_v1", str(path), 1000)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.randn(2, 3, 96, 96, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), source(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="1000 classes"):
        load_teacher("mobilenet_v1", str(path), 100)
