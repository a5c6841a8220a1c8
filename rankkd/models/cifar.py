"""The CIFAR-100 model zoo of megvii-research/mdistiller (`mdistiller/models/cifar`), under the names of its
`cifar_model_dict`, for 32x32 inputs.

Each model has exactly mdistiller's state_dict (key names, shapes, BatchNorm buffers), so its released teachers
(`cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth`) load with strict=True and give the same logits; `forward` returns
the logits alone (mdistiller also returns intermediate features). Initialisation follows mdistiller's too, module for
module, so a seeded build starts from the weights mdistiller would draw. mdistiller's quirks are kept where they change
the function: see the block docstrings.

    model = build("resnet8x4")                                   # untrained, 100 classes
    teacher = load_teacher("resnet32x4", "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth")
"""
import difflib
import numbers
import os
from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from rankkd.models.weights import classifier_of, read_checkpoint_weights


def conv(cin, cout, kernel, stride=1, groups=1, bias=False):
    """A 'same'-padded convolution (padding kernel // 2)."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=bias)


def conv_bn_relu(cin, cout, kernel, stride=1, groups=1, bias=False):
    """[conv, BN, ReLU] as a list, for the models whose Sequential indices are part of their state_dict keys."""
    return [conv(cin, cout, kernel, stride, groups, bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def pooled_classifier(name, features, num_classes):
    """Global average pooling and the linear classifier. mdistiller pools with fixed window sizes (8 for the ResNets
    and WRNs, 4 for the ShuffleNets, 2 for MobileNetV2), each the final feature map's size on a 32x32 input."""
    return [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), (name, nn.Linear(features, num_classes))]


def init_weights(model, linear_std=None, zero_linear_bias=False):
    """mdistiller's initialisation: convolutions N(0, 2 / fan_out) with zero bias, BatchNorm scale 1 and shift 0. The
    classifier keeps PyTorch's default, except N(0, linear_std^2) weights and zero bias with `linear_std`, or zero bias
    with `zero_linear_bias`."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)


class ResidualBlock(nn.Module):
    """relu(branch(x) + shortcut(x)), He et al.'s post-activation block. The branch is conv1/bn1, conv2/bn2 (two 3x3
    convs) or, as a bottleneck, 1x1, 3x3, 1x1 convs with 4x fewer channels inside, with a ReLU after every BN but the
    last. The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes; mdistiller's two ResNet files
    store it as "downsample" (resnet8...resnet32x4) and "shortcut" (ResNet18/50)."""

    def __init__(self, cin, cout, stride, bottleneck, shortcut_key):
        super().__init__()
        mid = cout // 4 if bottleneck else cout
        shapes = (((cin, mid, 1, 1), (mid, mid, 3, stride), (mid, cout, 1, 1)) if bottleneck
                  else ((cin, cout, 3, stride), (cout, cout, 3, 1)))
        for i, (a, b, kernel, s) in enumerate(shapes, 1):
            self.add_module(f"conv{i}", conv(a, b, kernel, s))
            self.add_module(f"bn{i}", nn.BatchNorm2d(b))
        self.depth = len(shapes)
        projection = stride != 1 or cin != cout
        self.add_module(shortcut_key, nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))
                        if projection else None)
        self.shortcut_key = shortcut_key

    def forward(self, x):
        out = x
        for i in range(1, self.depth + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.depth:
                out = F.relu(out)
        shortcut = getattr(self, self.shortcut_key)
        return F.relu(out + (x if shortcut is None else shortcut(x)))


class ResNet(nn.Sequential):
    """A 3x3 conv-BN-ReLU stem at full resolution, stages layer1, layer2, ... of residual blocks (the first stage at
    stride 1, the others halving the resolution), global average pooling and a linear classifier."""

    def __init__(self, stem_width, stage_widths, stage_depths, num_classes, *, bottleneck=False,
                 shortcut_key="shortcut", classifier_key="linear"):
        layers, cin = [("conv1", conv(3, stem_width, 3)), ("bn1", nn.BatchNorm2d(stem_width)),
                       ("relu", nn.ReLU(inplace=True))], stem_width
        for stage, (width, depth) in enumerate(zip(stage_widths, stage_depths)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage and not i else 1
                blocks.append(ResidualBlock(cin, width, stride, bottleneck, shortcut_key))
                cin = width
            layers.append((f"layer{stage + 1}", nn.Sequential(*blocks)))
        super().__init__(OrderedDict(layers + pooled_classifier(classifier_key, cin, num_classes)))
        init_weights(self)


def cifar_resnet(depth, widths, num_classes):
    """resnet.py's ResNet-`depth` (depth = 6n + 2: three stages of n basic blocks) with stem and stage widths
    `widths`; resnet8x4 and resnet32x4 have 4x wider stages than resnet8 and resnet32 (64/128/256 channels, stem
    32)."""
    n = (depth - 2) // 6
    return ResNet(widths[0], widths[1:], (n, n, n), num_classes, shortcut_key="downsample", classifier_key="fc")


class WideBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) plus a shortcut. When the width changes the shortcut
    is a strided 1x1 conv of the pre-activated input relu(bn1(x)); otherwise it is x itself, before BN (the WRN
    authors' code, which mdistiller follows)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv(cin, cout, 3, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, 3)
        self.convShortcut = conv(cin, cout, 1, stride) if cin != cout else None

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideResNet(nn.Sequential):
    """WRN-`depth`-`widen` (Zagoruyko & Komodakis): a 3x3 conv to 16 channels, three stages of (depth - 4) / 6
    pre-activation blocks of 16, 32, 64 x `widen` channels, a final BN-ReLU, global average pooling and a linear
    classifier. (mdistiller's forward runs three of the BatchNorms a second time to return features, which in training
    mode updates their running statistics twice a step; this model runs each once.)"""

    def __init__(self, depth, widen, num_classes):
        n = (depth - 4) // 6
        layers, cin = [("conv1", conv(3, 16, 3))], 16
        for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = [WideBlock(cin if not i else width, width, 2 if stage and not i else 1) for i in range(n)]
            layers.append((f"block{stage + 1}", nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks)))))
            cin = width
        layers += [("bn1", nn.BatchNorm2d(cin)), ("relu", nn.ReLU(inplace=True))]
        super().__init__(OrderedDict(layers + pooled_classifier("fc", cin, num_classes)))
        init_weights(self, zero_linear_bias=True)


class VGG(nn.Sequential):
    """VGG with BatchNorm: five stages block0..block4 of 3x3 conv(bias)-BN-ReLU, a 2x2 max-pool after each of the first
    three, global average pooling and a linear classifier from 512 features. On 32x32 inputs mdistiller applies no pool
    between the last two stages, so both run at 4x4."""

    def __init__(self, stage_widths, num_classes):
        layers, cin = [], 3
        for stage, widths in enumerate(stage_widths):
            convs = []
            for width in widths:
                convs += conv_bn_relu(cin, width, 3, bias=True)
                cin = width
            # The trailing ReLU lives outside the Sequential, as in mdistiller, whose indices the keys use.
            layers += [(f"block{stage}", nn.Sequential(*convs[:-1])), (f"relu{stage}", nn.ReLU(inplace=True))]
            if stage < 3:
                layers.append((f"pool{stage}", nn.MaxPool2d(2)))
        super().__init__(OrderedDict(layers + pooled_classifier("classifier", cin, num_classes)))
        init_weights(self, linear_std=0.01)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise (stride), 1x1 linear projection, each with BN, and the input
    added back when the shape is unchanged. The expansion conv exists even at expansion 1, as in mdistiller."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        self.conv = nn.Sequential(*conv_bn_relu(cin, hidden, 1), *conv_bn_relu(hidden, hidden, 3, stride, hidden),
                                  *conv_bn_relu(hidden, cout, 1)[:2])
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Sequential):
    """MobileNetV2 for 32x32 inputs with expansion `expansion` and width multiplier `width`; mdistiller's MobileNetV2
    (`mobile_half`) is expansion 6, width 0.5. The stem conv has stride 2; the 1x1 head conv keeps 1280 channels."""

    # (channels, blocks, stride) per stage; the first stage has expansion 1.
    STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))

    def __init__(self, expansion, width, num_classes):
        cin = int(32 * width)
        stem = nn.Sequential(*conv_bn_relu(3, cin, 3, 2))
        stages = []
        for index, (channels, blocks, stride) in enumerate(self.STAGES):
            cout = int(channels * width)
            stage = []
            for i in range(blocks):
                stage.append(InvertedResidual(cin, cout, stride if not i else 1, expansion if index else 1))
                cin = cout
            stages.append(nn.Sequential(*stage))
        head_width = max(1280, int(1280 * width))
        super().__init__(OrderedDict(
            conv1=stem, blocks=nn.Sequential(*stages), conv2=nn.Sequential(*conv_bn_relu(cin, head_width, 1)),
            avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
            classifier=nn.Sequential(nn.Linear(head_width, num_classes))))
        init_weights(self, linear_std=0.01)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet unit: grouped 1x1 conv to cout / 4 channels, channel shuffle, 3x3 depthwise conv, grouped 1x1 conv.
    At stride 1 the input is added; at stride 2 a 3x3 average pool of it (zero padding counted) is concatenated, so
    `cout` is then the stage width minus the input width. As in mdistiller, a ReLU also follows the depthwise conv, and
    the first 1x1 conv is ungrouped (hence no shuffle) when it reads the 24-channel stem."""

    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid = cout // 4
        self.first_groups = 1 if cin == 24 else groups
        self.conv1 = conv(cin, mid, 1, groups=self.first_groups)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = conv(mid, mid, 3, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = conv(mid, cout, 1, groups=groups)
        self.bn3 = nn.BatchNorm2d(cout)
        self.stride = stride

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Sequential):
    """ShuffleNet (g = 3) for 32x32 inputs: a 1x1 conv to 24 channels, stages of 4, 8, 4 units of 240, 480, 960
    channels (each starting at stride 2), global average pooling and a linear classifier."""

    def __init__(self, num_classes, stage_widths=(240, 480, 960), stage_depths=(4, 8, 4), groups=3):
        layers, cin = [("conv1", conv(3, 24, 1)), ("bn1", nn.BatchNorm2d(24)), ("relu", nn.ReLU(inplace=True))], 24
        for stage, (width, depth) in enumerate(zip(stage_widths, stage_depths)):
            units = [ShuffleV1Unit(cin, width - cin, 2, groups)]
            units += [ShuffleV1Unit(width, width, 1, groups) for _ in range(depth - 1)]
            layers.append((f"layer{stage + 1}", nn.Sequential(*units)))
            cin = width
        super().__init__(OrderedDict(layers + pooled_classifier("linear", cin, num_classes)))


class ShuffleV2Down(nn.Module):
    """ShuffleNetV2's stride-2 unit: two branches of cout / 2 channels, concatenated and shuffled. Left: 3x3
    depthwise (stride 2)-BN, 1x1-BN-ReLU. Right: 1x1-BN-ReLU, 3x3 depthwise (stride 2)-BN, 1x1-BN-ReLU."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        shapes = ((cin, cin, 3, 2, cin), (cin, mid, 1, 1, 1), (cin, mid, 1, 1, 1), (mid, mid, 3, 2, mid),
                  (mid, mid, 1, 1, 1))
        for i, (a, b, kernel, stride, groups) in enumerate(shapes, 1):
            self.add_module(f"conv{i}", conv(a, b, kernel, stride, groups))
            self.add_module(f"bn{i}", nn.BatchNorm2d(b))

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2's stride-1 unit: the first half of the channels passes through; the second goes through
    1x1-BN-ReLU, 3x3 depthwise-BN, 1x1-BN-ReLU; the halves are concatenated and shuffled."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1 = conv(half, half, 1)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = conv(half, half, 3, groups=half)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = conv(half, half, 1)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, x = x.chunk(2, dim=1)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(out)))))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleNetV2(nn.Sequential):
    """ShuffleNetV2 1x for 32x32 inputs: a 1x1 conv to 24 channels, three stages (a stride-2 unit, then 3, 7, 3
    stride-1 units) of 116, 232, 464 channels, a 1x1 conv-BN-ReLU to 1024, global average pooling, a linear
    classifier."""

    def __init__(self, num_classes, stage_widths=(116, 232, 464), stage_depths=(3, 7, 3), head_width=1024):
        layers, cin = [("conv1", conv(3, 24, 1)), ("bn1", nn.BatchNorm2d(24)), ("relu1", nn.ReLU(inplace=True))], 24
        for stage, (width, depth) in enumerate(zip(stage_widths, stage_depths)):
            units = [ShuffleV2Down(cin, width)] + [ShuffleV2Unit(width) for _ in range(depth)]
            layers.append((f"layer{stage + 1}", nn.Sequential(*units)))
            cin = width
        layers += [("conv2", conv(cin, head_width, 1)), ("bn2", nn.BatchNorm2d(head_width)),
                   ("relu2", nn.ReLU(inplace=True))]
        super().__init__(OrderedDict(layers + pooled_classifier("linear", head_width, num_classes)))


VGG_STAGES = {  # conv widths per stage
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}

_FACTORIES = {  # name -> callable(num_classes)
    **{f"resnet{depth}": partial(cifar_resnet, depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": partial(cifar_resnet, 8, (32, 64, 128, 256)),
    "resnet32x4": partial(cifar_resnet, 32, (32, 64, 128, 256)),
    "ResNet18": partial(ResNet, 64, (64, 128, 256, 512), (2, 2, 2, 2)),
    "ResNet50": partial(ResNet, 64, (256, 512, 1024, 2048), (3, 4, 6, 3), bottleneck=True),
    **{f"wrn_{depth}_{widen}": partial(WideResNet, depth, widen) for depth in (16, 40) for widen in (1, 2)},
    **{name: partial(VGG, stages) for name, stages in VGG_STAGES.items()},
    "MobileNetV2": partial(MobileNetV2, 6, 0.5),
    "ShuffleV1": ShuffleNetV1,
    "ShuffleV2": ShuffleNetV2,
}
NAMES = tuple(_FACTORIES)


def check_model(name):
    """Raise a ValueError naming the closest known models unless `name` is one of NAMES."""
    if name in _FACTORIES:
        return
    by_lower = {known.lower(): known for known in NAMES}
    close = [by_lower[match] for match in difflib.get_close_matches(str(name).lower(), by_lower, n=3, cutoff=0.6)]
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown CIFAR model {name!r}.{hint} Known: {', '.join(NAMES)}")


def build_model(name, num_classes=100):
    """The untrained model `name` (one of NAMES) with `num_classes` outputs."""
    check_model(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _FACTORIES[name](int(num_classes))


def _some(keys, shown=4):
    keys = sorted(keys)
    return ", ".join(keys[:shown]) + (f", ... ({len(keys)} in all)" if len(keys) > shown else "")


def load_teacher(name, weights, num_classes=100):
    """The model `name` with the weights in checkpoint file `weights` (a bare state_dict, mdistiller's {"model": ...},
    or a rankkd checkpoint), or untrained if `weights` is 'random'; frozen and in eval mode. Raises a ValueError naming
    the file when it holds a classifier for another class count, or keys or shapes of another model."""
    model = build_model(name, num_classes)
    if str(weights) != "random":
        path = os.fspath(weights)
        state_dict = read_checkpoint_weights(path)
        classifier, _ = classifier_of(model)
        saved = state_dict.get(f"{classifier}.weight")
        if saved is not None and saved.dim() == 2 and saved.shape[0] != num_classes:
            raise ValueError(f"teacher checkpoint {path!r} has {saved.shape[0]} classes ({classifier}.weight "
                             f"{tuple(saved.shape)}) but {num_classes} are expected")
        expected = model.state_dict()
        # BatchNorm fills in num_batches_tracked for checkpoints from PyTorch < 0.4.1, which lack it.
        missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
        unexpected = [key for key in state_dict if key not in expected]
        reshaped = [f"{key} {tuple(value.shape)} (expected {tuple(expected[key].shape)})"
                    for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
        if missing or unexpected or reshaped:
            problems = [f"{label} {_some(keys)}" for label, keys in
                        (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
                        if keys]
            raise ValueError(f"teacher checkpoint {path!r} does not hold {name!r} weights: {'; '.join(problems)}")
        model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False)
