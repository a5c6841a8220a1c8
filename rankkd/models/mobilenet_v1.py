"""MobileNetV1 (Howard et al., 2017) with the module layout of mdistiller's ImageNet student, so that the ResNet50 ->
MobileNetV1 checkpoints released with mdistiller (megvii-research/mdistiller) load with strict=True.

The parameters sit in `model`, a Sequential of 14 blocks (a plain 3x3 convolution, then 13 depthwise-separable
blocks) and a pooling layer, and `fc`; their keys are `model.<block>.<layer>.*` and `fc.*`, as in mdistiller. The one
difference: global average pooling instead of a fixed 7x7 one, which gives the same logits at 224x224 and also
works at other input sizes (the pooling layer holds no parameters, so the keys do not change). forward returns
the logits only."""
from torch import nn

# (output channels, stride) of the 13 depthwise-separable blocks that follow the 32-channel stem.
SEPARABLE_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
STEM_CHANNELS = 32


def _conv_bn_relu(in_channels, out_channels, kernel_size, stride, groups=1):
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    """MobileNetV1 at width 1.0: 4,231,976 parameters with 1000 classes."""

    def __init__(self, num_classes=1000):
        super().__init__()
        blocks = [nn.Sequential(*_conv_bn_relu(3, STEM_CHANNELS, 3, stride=2))]
        channels = STEM_CHANNELS
        for out_channels, stride in SEPARABLE_BLOCKS:
            depthwise = _conv_bn_relu(channels, channels, 3, stride, groups=channels)
            pointwise = _conv_bn_relu(channels, out_channels, 1, stride=1)
            blocks.append(nn.Sequential(*depthwise, *pointwise))
            channels = out_channels
        self.model = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images):
        return self.fc(self.model(images).flatten(1))


def mobilenet_v1(num_classes=1000):
    return MobileNetV1(num_classes)
