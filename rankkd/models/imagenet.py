"""The ImageNet zoo: students and teachers by name: torchvision classifiers, DeiT-style ViTs from timm (when
installed), mdistiller's MobileNetV1 and a small CNN pair for the 32x32 demo set; teacher weights from a torchvision
weights name or a checkpoint file.

Every check that can fail (unknown name, missing or unreadable file, class-count mismatch) raises a ValueError that
says what to change, so a trainer can run them all before it starts any work."""
import difflib
import importlib.util
import functools
import os

from torch import nn

from rankkd.models.mobilenet_v1 import mobilenet_v1
from rankkd.models.weights import classifier_of, fetch_torchvision_weights, read_checkpoint_weights

HAS_TIMM = importlib.util.find_spec("timm") is not None


class DemoCNN(nn.Sequential):
    """A VGG-style CNN for the 32x32 demo images: stages of 3x3 conv-BN-ReLU blocks with a 2x2 max-pool between
    stages, then global average pooling and a linear classifier."""

    def __init__(self, widths, convs_per_stage, num_classes):
        layers, channels = [], 3
        for stage, width in enumerate(widths):
            if stage:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                channels = width
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


DEMO_ARCHS = {  # name: (widths, convs per stage); the large one teaches the small one in the demo
    "demo_cnn_large": ((16, 32, 64), 2),
    "demo_cnn_small": ((8, 16, 32), 1),
}


@functools.cache
def torchvision_archs():
    """torchvision's classifier names; () without torchvision (an optional dependency, imported only here)."""
    if importlib.util.find_spec("torchvision") is None:
        return ()
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _is_timm_arch(name):
    if not HAS_TIMM:
        return False
    import timm

    return timm.is_model(name)


def check_model(name):
    """Raise a ValueError unless `name` is a known architecture."""
    if name in DEMO_ARCHS or name == "mobilenet_v1" or name in torchvision_archs() or _is_timm_arch(name):
        return
    close = difflib.get_close_matches(name, list(DEMO_ARCHS) + ["mobilenet_v1"] + list(torchvision_archs()), n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    timm_note = "" if HAS_TIMM else " DeiT/ViT models from timm (deit_small_patch16_224, ...) need `pip install timm`."
    raise ValueError(f"unknown architecture {name!r}.{hint} Known: {', '.join(DEMO_ARCHS)}, mobilenet_v1 "
                     "(mdistiller's ImageNet student), and the torchvision classifiers (resnet18, resnet34, resnet50, "
                     f"mobilenet_v2, ...).{timm_note}")


def build_model(name, num_classes, *, drop_path_rate=0.0, image_size=None):
    """A randomly initialised classifier `name` with `num_classes` outputs. For timm models: stochastic depth
    (drop_path_rate; DeiT trains with 0.1) and, for a ViT, an input size other than its own (image_size sizes the
    position embeddings)."""
    check_model(name)
    is_timm = name not in DEMO_ARCHS and name != "mobilenet_v1" and name not in torchvision_archs()
    if drop_path_rate and not is_timm:
        raise ValueError(f"drop_path_rate (stochastic depth) applies to timm models, not {name!r}")
    if name in DEMO_ARCHS:
        widths, convs = DEMO_ARCHS[name]
        return DemoCNN(widths, convs, num_classes)
    if name == "mobilenet_v1":
        return mobilenet_v1(num_classes)
    if name in torchvision_archs():
        import torchvision

        return torchvision.models.get_model(name, num_classes=num_classes)
    import timm

    own_size = timm.models.get_pretrained_cfg(name).input_size[-1]
    size = {} if image_size in (None, own_size) else {"img_size": image_size}
    return timm.create_model(name, num_classes=num_classes, drop_path_rate=drop_path_rate, **size)


def _torchvision_weights(name, weights_name):
    """The torchvision weights enum entry for `weights_name` ('DEFAULT', 'IMAGENET1K_V1' or 'ResNet34_Weights.X')."""
    import torchvision

    try:
        available = torchvision.models.get_model_weights(name)
    except ValueError:
        raise ValueError(f"torchvision has no pretrained weights for {name!r}") from None
    entry = weights_name.split(".")[-1]
    if entry not in available.__members__:
        raise ValueError(f"{name} has no torchvision weights {weights_name!r}; "
                         f"choose one of {', '.join(available.__members__)} or give a checkpoint path")
    return available[entry]


def _is_path(weights):
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin")) or os.path.exists(weights)


def load_teacher(name, weights, num_classes):
    """The teacher `name` with `weights` (a torchvision weights name such as 'IMAGENET1K_V1', 'pretrained' for timm's
    own, a checkpoint path, or 'random': untrained, for timing runs), frozen and in eval mode. Raises a ValueError
    before loading anything big when the weights are unknown, unreadable, or trained for a different number of
    classes than `num_classes`."""
    check_model(name)
    weights = str(weights)
    if weights == "random":
        model = build_model(name, num_classes)
    elif _is_path(weights):
        state_dict = read_checkpoint_weights(weights)
        model = build_model(name, num_classes)
        classifier_name, _ = classifier_of(model)
        saved = state_dict.get(f"{classifier_name}.weight")
        if saved is not None and saved.shape[0] != num_classes:
            raise ValueError(f"teacher checkpoint {weights!r} has {saved.shape[0]} classes "
                             f"({classifier_name}.weight {tuple(saved.shape)}) but the data has {num_classes}")
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as error:
            raise ValueError(f"teacher checkpoint {weights!r} does not fit architecture {name!r}: {error}") from None
    elif name in torchvision_archs():
        entry = _torchvision_weights(name, weights)
        weight_classes = len(entry.meta["categories"])
        if weight_classes != num_classes:
            raise ValueError(f"torchvision weights {name}/{entry.name} have {weight_classes} classes but the data "
                             f"has {num_classes}")
        import torchvision

        cached = fetch_torchvision_weights(entry, "--teacher-weights")
        try:
            model = torchvision.models.get_model(name, weights=entry)
        except Exception as error:  # noqa: BLE001  torch.hub reuses a file it downloaded before without checking it
            raise ValueError(f"torchvision weights {entry}: the copy downloaded before, {cached}, can't be read "
                             f"({type(error).__name__}); delete it to download it again") from None
    elif _is_timm_arch(name) and weights == "pretrained":
        import timm

        model = timm.create_model(name, pretrained=True)
        weight_classes = classifier_of(model)[1].out_features
        if weight_classes != num_classes:
            raise ValueError(f"timm's pretrained {name} has {weight_classes} classes but the data has {num_classes}")
    else:
        raise ValueError(f"teacher weights {weights!r} for {name!r}: give a checkpoint path"
                         + (" or 'pretrained' (timm's weights)" if _is_timm_arch(name) else "") + ", or 'random'")
    return model.eval().requires_grad_(False)
