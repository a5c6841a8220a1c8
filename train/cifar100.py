"""Logit distillation with the Kendall's tau ranking loss on CIFAR-100: the paper's main table, one GPU per run.

    python train/cifar100.py                       # the demo: handwritten digits at 32x32 through the same path
    python train/cifar100.py --data /data/cifar-100-python --pair res32x4_res8x4 \
        --teacher-weights cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth       # KD + ranking loss
    python train/cifar100.py ... --method dkd      # DKD + ranking loss; --rank-weight 0 for the baseline
    python train/cifar100.py --data synthetic --pair res32x4_res8x4 --epochs 2       # on a GPU: the step's speed

The models are megvii-research/mdistiller's CIFAR zoo (rankkd.models.cifar: same names, same state_dict keys), so
its released teachers (cifar_teachers.tar) load as they are. The data set lives on the device as uint8 and is
cropped, flipped and normalized there (rankkd.training.data.cifar): no loader processes, no host copy per step.

The file reads top to bottom: the pairs and the recipe (mdistiller's solver; every number can be overridden on the
command line), the command line, the checks before any work, the data and models, and the demo's teacher. The epoch
loop, evaluation and checkpoints are train/imagenet.py's too (rankkd.training.loop).
"""
import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd import distill  # noqa: E402
from rankkd.distill import DistillConfig  # noqa: E402
from rankkd.models import cifar  # noqa: E402
from rankkd.training.config import add_common_arguments, check_loss_fits, resolve_config  # noqa: E402
from rankkd.training.data.cifar import (demo_arrays, load_cifar100, make_device_loaders,  # noqa: E402
                                        synthetic_arrays)
from rankkd.training.data.demo import default_cache_dir  # noqa: E402
from rankkd.training.loop import cached_teacher, output_folder, resolve_for_device, run_trainer  # noqa: E402
from rankkd.training.utils import check_writable, seed_everything  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------------
# Pairs and recipes. A pair is named by mdistiller's config stem (configs/cifar100/<method>/<stem>.yaml).

PAIRS = {  # stem: (teacher, student)
    "res56_res20": ("resnet56", "resnet20"),
    "res110_res32": ("resnet110", "resnet32"),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4"),
    "wrn40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "vgg13_vgg8": ("vgg13", "vgg8"),
    "res32x4_shuv1": ("resnet32x4", "ShuffleV1"),
    "res32x4_shuv2": ("resnet32x4", "ShuffleV2"),
    "wrn40_2_shuv1": ("wrn_40_2", "ShuffleV1"),
    "vgg13_mv2": ("vgg13", "MobileNetV2"),
    "res50_mv2": ("ResNet50", "MobileNetV2"),
}
# mdistiller's solver for every pair: SGD, momentum 0.9, batch 64, 240 epochs, lr 0.05 (0.01 for the MobileNetV2 and
# ShuffleNet students), x0.1 at epochs 150, 180 and 210, weight decay 5e-4 on every parameter; random crop 32 with
# 4-pixel padding + horizontal flip. CUDA graphs (compile mode reduce-overhead): a batch-64 step of these small
# models is bound by kernel launches.
RECIPES = {}
RECIPES["cifar100"] = dict(
    pair="res32x4_res8x4", teacher_weights=None,
    epochs=240, batch_size=64,
    optimizer="sgd", lr=0.05, lr_reference_batch=64, momentum=0.9, nesterov=False,
    weight_decay=5e-4, decay_norm_and_bias=True,
    schedule="step", milestones=(150, 180, 210), lr_decay=0.1, lr_warmup_epochs=0.0, warmup_lr=0.0, min_lr=0.0,
    compile_mode="reduce-overhead", log_every=100,
)
SMALL_LR_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
# The embedded demo: 1437 train / 360 val handwritten digits at 32x32, a small pair of the same zoo, on a CPU in a
# couple of minutes. Digits are not mirror-symmetric, but the CIFAR path flips: fine for a demo of the machinery.
RECIPES["demo"] = {
    **RECIPES["cifar100"],
    "pair": None, "teacher": "resnet14", "student": "resnet8",
    "loss": DistillConfig(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=4.0, rank_weight=1.0),
    "epochs": 10, "batch_size": 64, "lr": 0.1, "schedule": "cosine", "lr_warmup_epochs": 0.5,
    "compile_mode": "default", "log_every": 10,
}
# How the demo trains its teacher: plain cross-entropy.
RECIPES["demo-teacher"] = {**RECIPES["demo"], "student": "resnet14", "teacher": None,
                           "loss": DistillConfig(method="ce"), "epochs": 12}

# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default="demo", help="the cifar-100-python folder (or its parent, or cifar-100-python.tar.gz), "
                                       "'demo' (the embedded digits set) or 'synthetic' (random images of CIFAR's "
                                       "size: times the step)")
    add("--steps-per-epoch", type=int, help="--data synthetic: steps per epoch (default: CIFAR-100's 50,000 images)")
    add("--pair", choices=PAIRS, help="teacher -> student pair by mdistiller's config name; picks the models, the lr "
                                      "and the loss recipe (default res32x4_res8x4; the demo has its own pair)")
    add_common_arguments(parser)
    return parser


def make_config(args, recipe_name=None):
    """The recipe, adjusted to the pair and method, overridden by the command line, checked."""
    recipe_name = recipe_name or ("demo" if args.data == "demo" else "cifar100")
    recipe = dict(RECIPES[recipe_name])
    pair = args.pair or recipe["pair"]
    if pair is not None:
        teacher, student = PAIRS[pair]
        method = args.method or "kd"
        # The pair's published loss for the method, with the ranking loss at gamma = alpha (--rank-weight 0: off).
        loss = (DistillConfig(method="ce", rank_weight=1.0) if method == "ce"
                else distill.cifar100_recipe_name(pair, method, standardize=bool(args.standardize), rank=True))
        small_lr = (args.student or student) in SMALL_LR_STUDENTS
        recipe.update(pair=pair, teacher=teacher, student=student, lr=0.01 if small_lr else recipe["lr"], loss=loss)
    cfg = resolve_config(args, recipe_name, recipe)
    if cfg.data == "synthetic" and args.teacher_weights is None:
        cfg.teacher_weights = "random"  # a timing run reads nothing
    if cfg.steps_per_epoch is not None and (cfg.data != "synthetic" or cfg.steps_per_epoch < 1):
        raise ValueError(f"--steps-per-epoch applies to --data synthetic and must be >= 1, got {cfg.steps_per_epoch}")
    for name in (cfg.student, cfg.teacher):
        if name is not None:
            cifar.check_name(name)
    if cfg.data not in ("demo", "synthetic") and not Path(cfg.data).exists():
        raise ValueError(f"--data {cfg.data!r}: no such file or folder (give the cifar-100-python folder, its "
                         "parent or cifar-100-python.tar.gz, 'demo' or 'synthetic')")
    if cfg.teacher is not None and cfg.teacher_weights is None and cfg.data != "demo":
        raise ValueError("--teacher-weights is needed: mdistiller's teacher checkpoint (e.g. "
                         "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth), this trainer's best.pt, or 'random'")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Set-up: everything a run needs, made and checked before any training.


def make_data(cfg, env):
    if cfg.data == "demo":
        arrays = demo_arrays(check_writable(default_cache_dir(), "the cache folder ($RANKKD_CACHE)"))
    elif cfg.data == "synthetic":
        sizes = {} if cfg.steps_per_epoch is None else {"num_train": cfg.steps_per_epoch * cfg.global_batch_size,
                                                        "num_val": cfg.steps_per_epoch * cfg.global_batch_size // 5}
        arrays = synthetic_arrays(seed=cfg.seed, **sizes)
    else:
        arrays = load_cifar100(cfg.data)
    return make_device_loaders(arrays, batch_size=cfg.batch_size, device=env.device, rank=env.rank,
                               world_size=env.world_size, seed=cfg.seed, channels_last=cfg.channels_last)


def prepare(cfg, env):
    """Data, output folder (locked once the data checks passed), checkpoint to resume, teacher and student. Raises
    ValueError on anything wrong."""
    resolve_for_device(cfg, env)
    loaders = make_data(cfg, env)
    check_loss_fits(cfg.loss, loaders.num_classes, env.device)
    out, lock, resume_state = output_folder(cfg, env)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    teacher = None
    if cfg.teacher is not None and cfg.teacher_weights is not None:
        teacher = cifar.load_teacher(cfg.teacher, cfg.teacher_weights, loaders.num_classes)
    student = cifar.build(cfg.student, loaders.num_classes)
    return SimpleNamespace(cfg=cfg, out=out, lock=lock, resume_state=resume_state, loaders=loaders, teacher=teacher,
                           student=student, mixer=None)


def demo_teacher(run, env):
    """The demo's teacher: trained by this same loop with the "demo-teacher" recipe on first use, then taken from the
    cache (rankkd.training.loop.cached_teacher)."""
    cfg = run.cfg
    args = make_parser().parse_args(["--data", "demo", "--student", cfg.teacher, "--device", env.device.type,
                                     "--precision", cfg.precision, "--compile" if cfg.compile else "--no-compile"])
    weights = cached_teacher(make_config(args, "demo-teacher"), env, prepare)
    return cifar.load_teacher(cfg.teacher, weights, run.loaders.num_classes)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """Run the trainer on `argv` (default: the command line); returns the summary of the run."""
    return run_trainer("cifar100.py", make_parser().parse_args(argv), make_config, prepare, demo_teacher)


if __name__ == "__main__":
    main()
