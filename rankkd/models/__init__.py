"""One registry for every model zoo, with one set of verbs: check_model(name), build_model(name, num_classes),
load_teacher(name, weights, num_classes), each taking the zoo by name.

- "imagenet" (rankkd.models.imagenet): torchvision classifiers, DeiT-style ViTs from timm (when installed),
  mdistiller's MobileNetV1 and a small CNN pair for the 32x32 demo set;
- "cifar" (rankkd.models.cifar): mdistiller's CIFAR-100 zoo, with its state_dict keys.

The detectors of the COCO task are rankkd.detection.zoo's, with the same verbs.

Every check that can fail (unknown name, missing or unreadable file, class-count mismatch) raises a ValueError that
says what to change, so a trainer can run them all before it starts any work."""
import importlib

ZOOS = ("imagenet", "cifar")


def zoo(name):
    if name not in ZOOS:
        raise ValueError(f"unknown model zoo {name!r}; zoos: {', '.join(ZOOS)}")
    return importlib.import_module(f"rankkd.models.{name}")


def check_model(name, zoo_name="imagenet"):
    """Raise a ValueError naming the closest known models unless `name` is in the zoo."""
    zoo(zoo_name).check_model(name)


def build_model(name, num_classes, zoo_name="imagenet", **options):
    """The untrained model `name` with `num_classes` outputs (options: the zoo's own, e.g. drop_path_rate)."""
    return zoo(zoo_name).build_model(name, num_classes, **options)


def load_teacher(name, weights, num_classes, zoo_name="imagenet"):
    """The model `name` with `weights` (a checkpoint path, a zoo's named weights, or 'random'), frozen, in eval
    mode."""
    return zoo(zoo_name).load_teacher(name, weights, num_classes)
