"""Logit distillation with the Kendall's tau ranking loss: ImageNet with torchrun, or the embedded demo on a laptop.

    python train/imagenet.py                       # the demo: trains a small teacher on handwritten digits (cached),
                                                   # then a KD + ranking-loss student, and prints both top-1 scores
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank --resume auto
    python train/imagenet.py --data synthetic --batch-size 256     # on a GPU: the training step alone, no I/O

The file reads top to bottom: the recipes (every number in them can be overridden on the command line), the
command line, the checks that run before any work, the data and models, and the demo's teacher. What both trainers
share lives in rankkd/training/: the options and settings (config), the epoch loop, evaluation, checkpoints and the
teacher cache (loop), the input pipelines (data); the losses are rankkd.distill, the models rankkd.models.

Batch sizes: --batch-size is per process (per GPU); the global batch is batch size x processes. The learning rate
of a recipe is stated for a reference global batch (lr_reference_batch) and scaled linearly to the actual one.
Defaults that depend on the device: on CUDA, bf16 autocast and torch.compile are on; on the CPU both are off
(compiling costs more than it saves in a short CPU run; turn them on with --precision bf16 --compile).
"""
import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd import models  # noqa: E402
from rankkd.distill import DistillConfig  # noqa: E402
from rankkd.training.config import add_common_arguments, check_loss_fits, check_ranges, resolve_config  # noqa: E402
from rankkd.training.data import make_loaders, prepare_demo, synthetic_loader  # noqa: E402
from rankkd.training.data.demo import default_cache_dir  # noqa: E402
from rankkd.training.data.folder import BadImageError, check_images, list_image_folder  # noqa: E402
from rankkd.training.data.mixing import make_batch_mixer  # noqa: E402
from rankkd.training.loop import cached_teacher, output_folder, resolve_for_device, run_trainer  # noqa: E402
from rankkd.training.utils import all_gather_objects, check_writable, seed_everything  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Recipes. A run starts from one of these and overrides what the command line sets.

RECIPES = {}
# The paper's ImageNet setup, which is mdistiller's: SGD, 100 epochs, lr 0.2 for a global batch of 512 (4 GPUs x 128),
# x0.1 at epochs 30, 60 and 90, weight decay 1e-4 on every parameter; standard random-resized-crop + flip.
RECIPES["imagenet"] = dict(
    teacher="resnet34", teacher_weights="IMAGENET1K_V1", student="resnet18",
    loss="imagenet-kd-rank",                            # a rankkd.distill recipe; loss options below override it
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
# Command line. Recipe values default to None here: "not given, take the recipe's".


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default="demo", help="an ImageFolder root holding train/ and val/, 'demo' (the embedded digits set) "
                                       "or 'synthetic' (random device-resident batches: times the step without I/O)")
    add("--recipe", choices=[name for name in RECIPES if name != "demo-teacher"],
        help="starting point for every setting below; default: demo for --data demo, else imagenet")
    add("--workers", type=int, help="data loading threads per process (DALI) or workers (torchvision); default: "
                                    "on CUDA the CPUs per process, at most 8; on the CPU a quarter of them (the rest "
                                    "compute)")
    add("--data-backend", default="auto", choices=["auto", "dali", "torchvision"],
        help="auto: DALI when nvidia-dali is installed, else torchvision")
    add("--num-classes", type=int, default=1000, help="classes of --data synthetic (default 1000)")
    add("--steps-per-epoch", type=int, default=100, help="steps per epoch of --data synthetic (default 100)")
    recipe = add_common_arguments(parser)
    add = recipe.add_argument
    add("--image-size", type=int)
    add("--min-scale", type=float, help="random-resized-crop: smallest crop area")
    add("--hflip", action=argparse.BooleanOptionalAction)
    add("--val-resize-ratio", type=float, help="val: resize the shorter side to image_size x this, then center-crop")
    add("--rand-augment-ops", type=int, help="RandAugment: operations per image, 0 = off (DeiT: 2)")
    add("--rand-augment-magnitude", type=float, help="RandAugment: magnitude on the 0..10 scale (DeiT: 9)")
    add("--random-erasing", type=float, help="probability of erasing a random box of each train image (DeiT: 0.25)")
    add("--repeated-aug", type=int, help="repeated augmentation: copies of each image per epoch, 1 = off (DeiT: 3)")
    add("--mixup", type=float, help="mixup alpha, 0 = off (DeiT: 0.8)")
    add("--cutmix", type=float, help="cutmix alpha, 0 = off (DeiT: 1.0)")
    add("--mixup-switch-prob", type=float, help="with mixup and cutmix on: probability of cutmix for a batch")
    add("--label-smoothing", type=float, help="soft-target cross-entropy with this smoothing (DeiT: 0.1)")
    add("--drop-path", type=float, help="stochastic depth rate of a timm student (DeiT: 0.1)")
    return parser


def make_config(args):
    """The recipe, overridden by what the command line gives, checked. Raises ValueError on a bad argument."""
    name = args.recipe or ("demo" if args.data == "demo" else "imagenet")
    recipe = RECIPES[name]
    if args.data == "demo" and name not in ("demo", "demo-teacher"):
        recipe = recipe | {field: RECIPES["demo"][field] for field in DEMO_DATA_FIELDS}
    cfg = resolve_config(args, name, recipe)
    if cfg.data == "synthetic" and args.teacher_weights is None:
        cfg.teacher_weights = "random"  # a timing run downloads nothing and reads nothing
    for arch in (cfg.student, cfg.teacher):
        if arch is not None:
            models.check_arch(arch)
    if (cfg.mixup or cfg.cutmix or cfg.label_smoothing) and cfg.loss.method == "dkd":
        raise ValueError("DKD needs hard labels: turn --mixup, --cutmix and --label-smoothing off, or pick another "
                         "--method")
    if cfg.data not in ("demo", "synthetic") and not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data!r}: no such directory (give an ImageFolder root with train/ and val/, "
                         "'demo' or 'synthetic')")
    if cfg.teacher is not None and cfg.teacher_weights is None and cfg.data != "demo":
        raise ValueError("--teacher-weights is needed: a torchvision weights name, a checkpoint path, or 'random'")
    check_ranges(cfg, image_size=(8, None), num_classes=(2, None), steps_per_epoch=(1, None), workers=(1, None),
                 repeated_aug=(1, None), rand_augment_ops=(0, None), rand_augment_magnitude=(0, 10), mixup=(0, None),
                 cutmix=(0, None), mixup_switch_prob=(0, 1), label_smoothing=(0, 1), random_erasing=(0, 1),
                 drop_path=(0, 1))
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Set-up: everything a run needs, made and checked before any training, so that a bad setting fails in seconds.


def make_data(cfg, env):
    if cfg.data == "synthetic":
        common = dict(batch_size=cfg.batch_size, image_size=cfg.image_size, num_classes=cfg.num_classes,
                      device=env.device, channels_last=cfg.channels_last)
        return SimpleNamespace(train=synthetic_loader(steps=cfg.steps_per_epoch, seed=cfg.seed + env.rank, **common),
                               val=synthetic_loader(steps=max(1, cfg.steps_per_epoch // 10), seed=cfg.seed + 7919,
                                                    **common),
                               num_classes=cfg.num_classes)
    if cfg.data == "demo":
        root = prepare_demo(check_writable(default_cache_dir(), "the cache folder ($RANKKD_CACHE)"))
    else:
        root = cfg.data
        check_validation_images(root, env)
    return make_loaders(root, batch_size=cfg.batch_size, image_size=cfg.image_size, rank=env.rank,
                        world_size=env.world_size, device=env.device, seed=cfg.seed, backend=cfg.data_backend,
                        num_threads=cfg.workers, channels_last=cfg.channels_last, min_scale=cfg.min_scale,
                        hflip=cfg.hflip, val_resize_ratio=cfg.val_resize_ratio, rand_augment_ops=cfg.rand_augment_ops,
                        rand_augment_magnitude=cfg.rand_augment_magnitude, random_erasing=cfg.random_erasing,
                        repeats=cfg.repeated_aug)


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


def resolve_workers(cfg, env):
    on_cuda = env.device.type == "cuda"
    cpus = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # this process's share
    if cfg.workers is None:
        cfg.workers = min(8, cpus) if on_cuda else max(1, cpus // 4)
    if not on_cuda:
        # Loader threads and torch's compute threads share the cores: more threads than cores makes torch's
        # thread pool wait on descheduled threads at every op (several times slower on 2 cores).
        torch.set_num_threads(max(1, cpus - cfg.workers))


def prepare(cfg, env):
    """Data, output folder (locked once the data checks passed), checkpoint to resume, teacher and student. Raises
    ValueError (or FileNotFoundError for a missing data folder) on anything wrong with the arguments."""
    resolve_for_device(cfg, env)
    resolve_workers(cfg, env)
    loaders = make_data(cfg, env)
    check_loss_fits(cfg.loss, loaders.num_classes, env.device)
    mixer = make_batch_mixer(loaders.num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                             switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                             rank=env.rank)
    out, lock, resume_state = output_folder(cfg, env)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    teacher = None
    if cfg.teacher is not None and cfg.teacher_weights is not None:
        teacher = models.load_teacher(cfg.teacher, cfg.teacher_weights, loaders.num_classes)
    student = models.build_model(cfg.student, loaders.num_classes, drop_path_rate=cfg.drop_path,
                                 image_size=cfg.image_size)
    return SimpleNamespace(cfg=cfg, out=out, lock=lock, resume_state=resume_state, loaders=loaders, teacher=teacher,
                           student=student, mixer=mixer)


# ----------------------------------------------------------------------------------------------------------------------
# The demo's teacher: trained by this same loop with the "demo-teacher" recipe, cached by its settings.


def demo_teacher(run, env):
    """The demo's teacher: trained by this same loop with the "demo-teacher" recipe on first use, then taken from the
    cache (rankkd.training.loop.cached_teacher)."""
    cfg = run.cfg
    args = make_parser().parse_args([
        "--data", "demo", "--student", cfg.teacher, "--device", env.device.type, "--precision", cfg.precision,
        "--compile" if cfg.compile else "--no-compile", "--workers", str(cfg.workers),
        "--data-backend", cfg.data_backend])
    args.recipe = "demo-teacher"  # not offered on the command line
    return models.load_teacher(cfg.teacher, cached_teacher(make_config(args), env, prepare), run.loaders.num_classes)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """Run the trainer on `argv` (default: the command line); returns the summary of the run."""
    return run_trainer("imagenet.py", make_parser().parse_args(argv), make_config, prepare, demo_teacher)


if __name__ == "__main__":
    main()
