"""Logit distillation with the Kendall's tau ranking loss on CIFAR-100: the paper's main table, one GPU per run.

    python train/cifar100.py                       # the demo: handwritten digits at 32x32 through the same path
    python train/cifar100.py --data /data/cifar-100-python --pair res32x4_res8x4 \\
        --teacher-weights cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth       # KD + ranking loss (kd+rank)
    python train/cifar100.py ... --method dkd+rank # DKD + ranking loss; --method dkd for the baseline
    python train/cifar100.py --data synthetic --pair res32x4_res8x4 --epochs 2       # on a GPU: the step's speed

The models are megvii-research/mdistiller's CIFAR zoo (rankkd.models.cifar: same names, same state_dict keys), so
its released teachers (cifar_teachers.tar) load as they are. The data set lives on the device as uint8 and is
cropped, flipped and normalized there (rankkd.data.cifar): no loader processes, no host copy per step.

This module is the CIFAR-100 task: its pairs and recipes (mdistiller's solver), options, checks, data and models.
The run itself is rankkd.training.trainer's, shared with the other tasks.
"""
from pathlib import Path

from rankkd import recipes
from rankkd.distill import DistillConfig
from rankkd.models import cifar as cifar_zoo
from rankkd.recipes import CIFAR100_PAIRS
from rankkd.training.config import Option
from rankkd.data.cifar import demo_arrays, load_cifar100, make_device_loaders, synthetic_arrays
from rankkd.data.demo import default_cache_dir
from rankkd.tasks.images import IMAGE_OPTIONS, ClassificationTask, task_data
from rankkd.training.run_folder import check_writable

# ----------------------------------------------------------------------------------------------------------------------
# Recipes. A pair (rankkd.recipes.CIFAR100_PAIRS, by mdistiller's config stem) picks the models, the lr and the loss.

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

OPTIONS = (
    Option("data", "data", group="run", default="demo",
           help="the cifar-100-python folder (or its parent, or cifar-100-python.tar.gz), 'demo' (the embedded digits "
                "set) or 'synthetic' (random images of CIFAR's size: times the step)"),
    Option("steps_per_epoch", "data", type=int, low=1, group="run", optional=True,
           help="--data synthetic: steps per epoch (default: CIFAR-100's 50,000 images)"),
    Option("pair", "model", group="run", choices=tuple(CIFAR100_PAIRS), optional=True,
           help="teacher -> student pair by mdistiller's config name; picks the models, the lr and the loss recipe "
                "(default res32x4_res8x4; the demo has its own pair)"),
    *IMAGE_OPTIONS,
)


class Cifar100Task(ClassificationTask):
    name = "cifar100"
    description = __doc__.split("\n\n")[0]
    zoo = cifar_zoo
    recipes = RECIPES
    own_options = OPTIONS
    loss_recipe_prefixes = ("cifar100-",)

    def recipe(self, args, name=None):
        name = name or ("demo" if args.data == "demo" else "cifar100")
        recipe = dict(RECIPES[name])
        pair = args.pair or recipe["pair"]
        if pair is not None:
            teacher, student = CIFAR100_PAIRS[pair]
            method, with_rank = self.split_method(args.method or "kd+rank")
            # The pair's published loss for the method, with the ranking loss at gamma = alpha for method+rank.
            loss = (DistillConfig(method="ce", rank_weight=1.0 if with_rank else 0.0) if method == "ce"
                    else recipes.cifar100_recipe_name(pair, method, standardize=bool(args.standardize),
                                                      rank=with_rank))
            small_lr = (args.student or student) in SMALL_LR_STUDENTS
            recipe.update(pair=pair, teacher=teacher, student=student, lr=0.01 if small_lr else recipe["lr"],
                          loss=loss)
        if args.data == "synthetic":
            recipe["teacher_weights"] = "random"  # a timing run reads nothing
        return name, recipe

    def check(self, values, env):
        if values["steps_per_epoch"] is not None and values["data"] != "synthetic":
            raise ValueError(f"--steps-per-epoch applies to --data synthetic, not --data {values['data']}")
        self.check_models(values)
        if values["data"] not in ("demo", "synthetic") and not Path(values["data"]).exists():
            raise ValueError(f"--data {values['data']!r}: no such file or folder (give the cifar-100-python folder, "
                             "its parent or cifar-100-python.tar.gz, 'demo' or 'synthetic')")
        if values["teacher"] is not None and values["teacher_weights"] is None and values["data"] != "demo":
            raise ValueError("--teacher-weights is needed: mdistiller's teacher checkpoint (e.g. "
                             "cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth), this trainer's best.pt, or "
                             "'random'")

    def make_data(self, cfg, env):
        data, optim = cfg.data, cfg.optim
        if data.data == "demo":
            arrays = demo_arrays(check_writable(default_cache_dir(), "the cache folder ($RANKKD_CACHE)"))
        elif data.data == "synthetic":
            sizes = {} if data.steps_per_epoch is None else {
                "num_train": data.steps_per_epoch * optim.global_batch_size,
                "num_val": data.steps_per_epoch * optim.global_batch_size // 5}
            arrays = synthetic_arrays(seed=cfg.job.seed, **sizes)
        else:
            arrays = load_cifar100(data.data)
        return task_data(make_device_loaders(arrays, batch_size=optim.batch_size, device=env.device, rank=env.rank,
                                             world_size=env.world_size, seed=cfg.job.seed,
                                             channels_last=cfg.speed.channels_last))


TASK = Cifar100Task()
