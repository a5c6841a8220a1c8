"""Logit distillation with the Kendall's tau ranking loss: ImageNet with torchrun, or the embedded demo on a laptop.

    python train/imagenet.py                       # the demo: trains a small teacher on handwritten digits (cached),
                                                   # then a KD + ranking-loss student, and prints both top-1 scores
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank --resume auto
    python train/imagenet.py --data synthetic --batch-size 256     # on a GPU: the training step alone, no I/O

Batch sizes: --batch-size is per process (per GPU); the global batch is batch size x processes. The learning rate
of a recipe is stated for a reference global batch (lr_reference_batch) and scaled linearly to the actual one.
Defaults that depend on the device: on CUDA, bf16 autocast and torch.compile are on; on the CPU both are off
(compiling costs more than it saves in a short CPU run; turn them on with --precision bf16 --compile).

This module is the ImageNet task: its recipes, options, checks, data and models. The run itself (settings, epochs,
checkpoints, summary) is rankkd.training.trainer's, shared with the other tasks.
"""
import os
from pathlib import Path

import torch

from rankkd.distill import DistillConfig
from rankkd.models import imagenet as imagenet_zoo
from rankkd.training.config import Option
from rankkd.data import TrainAugmentation, make_loaders, prepare_demo, synthetic_loader
from rankkd.data.dali import RAND_AUGMENT_MAX_MAGNITUDE
from rankkd.data.demo import default_cache_dir
from rankkd.data.folder import EXCLUDE_HINT, BadImageError, check_images, list_image_folder
from rankkd.data.mixing import make_batch_mixer
from rankkd.distributed import all_gather_objects
from rankkd.tasks.images import IMAGE_OPTIONS, ClassificationTask, task_data
from rankkd.training.run_folder import check_writable
from rankkd.training.task import TaskData

# ----------------------------------------------------------------------------------------------------------------------
# Recipes. A run starts from one of these and overrides what the command line sets.

RECIPES = {}
# The paper's ImageNet setup, which is mdistiller's: SGD, 100 epochs, lr 0.2 for a global batch of 512 (4 GPUs x 128),
# x0.1 at epochs 30, 60 and 90, weight decay 1e-4 on every parameter; standard random-resized-crop + flip.
RECIPES["imagenet"] = dict(
    teacher="resnet34", teacher_weights="IMAGENET1K_V1", student="resnet18",
    loss="imagenet-kd-rank",                            # a rankkd.recipes loss; loss options override it
    epochs=100, batch_size=128,                         # per process; 4 processes give the paper's 512
    optimizer="sgd", lr=0.2, lr_reference_batch=512, momentum=0.9, nesterov=False,
    weight_decay=1e-4, decay_norm_and_bias=True,
    schedule="step", milestones=(30, 60, 90), lr_decay=0.1, lr_warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0,
    image_size=224, min_scale=0.08, hflip=True, val_resize_ratio=256 / 224,
    # DeiT's augmentation and regularisation, off here (see the deit recipe)
    rand_augment_ops=0, rand_augment_magnitude=9.0, random_erasing=0.0, repeated_aug=1,
    mixup=0.0, cutmix=0.0, mixup_switch_prob=0.5, label_smoothing=0.0, drop_path=0.0,
    compile_mode="default", log_every=50,
)
# The paper's second ImageNet pair, mdistiller's configs/imagenet/r50_mv1: the same solver, ResNet-50 (torchvision's
# IMAGENET1K_V1 weights, which mdistiller loads too) teaching mdistiller's MobileNetV1.
# DKD for it: --loss imagenet-dkd-r50-mv1-rank.
RECIPES["imagenet-r50-mv1"] = {**RECIPES["imagenet"], "teacher": "resnet50", "student": "mobilenet_v1"}
# The paper's DeiT students (the ranking paper's setup, which is DeiT's training recipe): AdamW, 300 epochs, lr 5e-4,
# weight decay 0.05 (not on norms, biases, position embeddings or class token), cosine to a minimum lr of 5e-6 after
# a 5-epoch warm-up, batch 128 per GPU, lr scaled from a global batch of 512 as DeiT does; teacher RegNetY-16GF as in
# DeiT. DeiT's augmentation and regularisation: RandAugment (2 ops, magnitude 9, magnitude std 0.5), random erasing
# 0.25, repeated augmentation (3 repeats), mixup 0.8 / cutmix 1.0 switching per batch, label smoothing 0.1 (soft-target
# cross-entropy; the teacher sees the same mixed images), stochastic depth 0.1.
RECIPES["deit"] = {
    **RECIPES["imagenet"],
    "teacher": "regnet_y_16gf", "teacher_weights": "IMAGENET1K_V2", "student": "deit_tiny_patch16_224",
    "loss": "deit-kd-rank", "epochs": 300, "batch_size": 128,
    "optimizer": "adamw", "lr": 5e-4, "lr_reference_batch": 512, "weight_decay": 0.05, "decay_norm_and_bias": False,
    "schedule": "cosine", "lr_warmup_epochs": 5.0, "warmup_lr": 1e-6, "min_lr": 5e-6,
    "rand_augment_ops": 2, "rand_augment_magnitude": 9.0, "random_erasing": 0.25, "repeated_aug": 3,
    "mixup": 0.8, "cutmix": 1.0, "mixup_switch_prob": 0.5, "label_smoothing": 0.1, "drop_path": 0.1,
}
# The embedded demo: 1437 train / 360 val handwritten digits at 32x32, a small CNN pair, a few epochs on a CPU.
# Digits are not mirror-symmetric (no flip), and crops keep most of the digit (min_scale 0.35).
RECIPES["demo"] = {
    **RECIPES["imagenet"],
    "teacher": "demo_cnn_large", "teacher_weights": None,  # None: the demo trains its teacher first (and caches it)
    "student": "demo_cnn_small",
    "loss": DistillConfig(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=4.0, rank_weight=1.0),
    "epochs": 12, "batch_size": 64, "lr": 0.1, "lr_reference_batch": 64, "weight_decay": 5e-4,
    "schedule": "cosine", "lr_warmup_epochs": 0.5, "min_lr": 0.0,
    "image_size": 32, "min_scale": 0.35, "hflip": False, "val_resize_ratio": 1.0,
    "log_every": 10,
}
# Another recipe on the demo data (--recipe deit --data demo) takes the demo's data and teacher settings.
DEMO_DATA_FIELDS = ("teacher", "teacher_weights", "image_size", "min_scale", "hflip", "val_resize_ratio")
# How the demo trains its teacher: plain cross-entropy, no teacher of its own.
RECIPES["demo-teacher"] = {
    **RECIPES["demo"],
    "student": "demo_cnn_large", "teacher": None, "loss": DistillConfig(method="ce"), "epochs": 10,
}

# ----------------------------------------------------------------------------------------------------------------------
# The task's own options (the shared ones are rankkd.training.config's).



def _augment(name, **spec):
    return Option(name, "augment", **spec)


OPTIONS = (
    Option("data", "data", group="run", default="demo",
           help="an ImageFolder root holding train/ and val/, 'demo' (the embedded digits set) or 'synthetic' (random "
                "device-resident batches: times the step without I/O)"),
    Option("recipe", "selection", group="run", choices=tuple(name for name in RECIPES if name != "demo-teacher"),
           help="starting point for every setting below; default: demo for --data demo, else imagenet"),
    Option("workers", "data", group="run", type=int, low=1, optional=True,
           help="data loading threads per process (DALI) or workers (torchvision); default: on CUDA the CPUs per "
                "process, at most 8; on the CPU a quarter of them (the rest compute)"),
    Option("data_backend", "data", group="run", default="auto", choices=("auto", "dali", "torchvision"),
           help="auto: DALI when nvidia-dali is installed, else torchvision"),
    Option("num_classes", "data", group="run", type=int, default=1000, low=2,
           help="classes of --data synthetic (default 1000)"),
    Option("steps_per_epoch", "data", group="run", type=int, default=100, low=1,
           help="steps per epoch of --data synthetic (default 100)"),
    Option("image_size", "data", type=int, low=8, group="recipe"),
    Option("val_resize_ratio", "data", type=float, low=1, group="recipe",
           help="val: resize the shorter side to image_size x this, then center-crop"),
    _augment("min_scale", type=float, above=0, high=1, help="random-resized-crop: smallest crop area"),
    _augment("hflip", type=bool),
    _augment("rand_augment_ops", type=int, low=0, help="RandAugment: operations per image, 0 = off (DeiT: 2)"),
    _augment("rand_augment_magnitude", type=float, low=0, high=RAND_AUGMENT_MAX_MAGNITUDE,
             help="RandAugment: magnitude on the 0..10 scale (DeiT: 9)"),
    _augment("random_erasing", type=float, low=0, high=1,
             help="probability of erasing a random box of each train image (DeiT: 0.25)"),
    _augment("repeated_aug", type=int, low=1,
             help="repeated augmentation: copies of each image per epoch, 1 = off (DeiT: 3)"),
    _augment("mixup", type=float, low=0, help="mixup alpha, 0 = off (DeiT: 0.8)"),
    _augment("cutmix", type=float, low=0, help="cutmix alpha, 0 = off (DeiT: 1.0)"),
    _augment("mixup_switch_prob", type=float, low=0, high=1,
             help="with mixup and cutmix on: probability of cutmix for a batch"),
    _augment("label_smoothing", type=float, low=0, high=1,
             help="soft-target cross-entropy with this smoothing (DeiT: 0.1)"),
    _augment("drop_path", type=float, low=0, high=1, help="stochastic depth rate of a timm student (DeiT: 0.1)"),
    *IMAGE_OPTIONS,
)


class ImageNetTask(ClassificationTask):
    name = "imagenet"
    description = __doc__.split("\n\n")[0]
    zoo = imagenet_zoo
    recipes = RECIPES
    own_options = OPTIONS
    loss_recipe_prefixes = ("imagenet-", "deit-")
    data_errors = {BadImageError: EXCLUDE_HINT}

    def recipe(self, args, name=None):
        name = name or args.recipe or ("demo" if args.data == "demo" else "imagenet")
        recipe = RECIPES[name]
        if args.data == "demo" and name not in ("demo", "demo-teacher"):
            recipe = recipe | {field: RECIPES["demo"][field] for field in DEMO_DATA_FIELDS}
        if args.data == "synthetic":
            recipe = recipe | {"teacher_weights": "random"}  # a timing run downloads nothing and reads nothing
        return name, recipe

    def check(self, values, env):
        self.check_models(values)
        if (values["mixup"] or values["cutmix"] or values["label_smoothing"]) and values["loss"].method == "dkd":
            raise ValueError("DKD needs hard labels: turn --mixup, --cutmix and --label-smoothing off, or pick "
                             "another --method")
        if values["data"] not in ("demo", "synthetic") and not Path(values["data"]).is_dir():
            raise ValueError(f"--data {values['data']!r}: no such directory (give an ImageFolder root with train/ and "
                             "val/, 'demo' or 'synthetic')")
        if values["teacher"] is not None and values["teacher_weights"] is None and values["data"] != "demo":
            raise ValueError("--teacher-weights is needed: a torchvision weights name, a checkpoint path, or 'random'")
        if values["workers"] is None:
            cpus = cpus_per_process()
            values["workers"] = min(8, cpus) if env.device.type == "cuda" else max(1, cpus // 4)

    def make_data(self, cfg, env):
        data, augment = cfg.data, cfg.augment
        if env.device.type == "cpu":
            # Loader threads and torch's compute threads share the cores: more threads than cores makes torch's
            # thread pool wait on descheduled threads at every op (several times slower on 2 cores).
            torch.set_num_threads(max(1, cpus_per_process() - data.workers))
        if data.data == "synthetic":
            return synthetic_data(cfg, env)
        if data.data == "demo":
            root = prepare_demo(check_writable(default_cache_dir(), "the cache folder ($RANKKD_CACHE)"))
        else:
            root = data.data
            check_validation_images(root, env)
        augmentation = TrainAugmentation(
            min_scale=augment.min_scale, hflip=augment.hflip, rand_augment_ops=augment.rand_augment_ops,
            rand_augment_magnitude=augment.rand_augment_magnitude, random_erasing=augment.random_erasing,
            repeats=augment.repeated_aug)
        return task_data(make_loaders(root, batch_size=cfg.optim.batch_size, image_size=data.image_size,
                                      rank=env.rank, world_size=env.world_size, device=env.device,
                                      seed=cfg.job.seed, backend=data.data_backend, num_threads=data.workers,
                                      channels_last=cfg.speed.channels_last, val_resize_ratio=data.val_resize_ratio,
                                      augment=augmentation))

    def make_mixer(self, cfg, env, data):
        augment = cfg.augment
        return make_batch_mixer(data.num_classes, mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                                switch_prob=augment.mixup_switch_prob, label_smoothing=augment.label_smoothing,
                                seed=cfg.job.seed, rank=env.rank)

    def build_student(self, cfg, num_classes):
        return self.zoo.build_model(cfg.model.student, num_classes, drop_path_rate=cfg.augment.drop_path,
                                    image_size=cfg.data.image_size)


def cpus_per_process():
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def synthetic_data(cfg, env):
    data = cfg.data
    common = dict(batch_size=cfg.optim.batch_size, image_size=data.image_size, num_classes=data.num_classes,
                  device=env.device, channels_last=cfg.speed.channels_last)
    return TaskData(train=synthetic_loader(steps=data.steps_per_epoch, seed=cfg.job.seed + env.rank, **common),
                    val=synthetic_loader(steps=max(1, data.steps_per_epoch // 10), seed=cfg.job.seed + 7919, **common),
                    num_classes=data.num_classes, backend="synthetic")


def check_validation_images(root, env):
    """A bad validation image would otherwise surface only after a whole training epoch. Each process checks its
    share (in parallel threads), and all stop with the same message."""
    files = list_image_folder(root).val.files
    try:
        check_images(files[env.rank::env.world_size], what=f"{root}/val")
        problem = None
    except BadImageError as error:
        problem = str(error)
    found = [problem for problem in all_gather_objects(problem) if problem]
    if found:
        raise BadImageError(found[0])


TASK = ImageNetTask()
