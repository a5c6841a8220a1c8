"""Logit distillation with the Kendall's tau ranking loss on COCO detection: Faster R-CNN FPN, the box head's class
logits distilled as mdistiller's detection code does, the paper's third benchmark.

    python train/coco.py                           # the demo: generated shapes in COCO format, a small teacher
                                                   # (trained first, cached), then a KD + ranking-loss student
    torchrun --nproc_per_node=8 train/coco.py --data /data/coco --pair r101_r18 \\
        --teacher-weights runs/coco-r101/best.pt --method dkd+rank --out runs/coco-r101-r18-dkd-rank
    python train/coco.py --data /data/coco --pair r101_r18 --student resnet101 --teacher none --method none \\
        --out runs/coco-r101                       # a teacher: plain detection training (1x)
    torchrun --nproc_per_node=8 train/coco.py --data /data/coco --recipe coco-teacher-3x --pair r101_r18 \\
        --batch-size 1 --out runs/coco-r101-3x     # the pair's teacher on detectron2's 3x schedule

An epoch here is --iters-per-epoch iterations (default 5000), after each of which the model is evaluated (COCO box
AP) and checkpointed: detectron2's 1x schedule at batch 8 (180k iterations) is 36 epochs, lr x0.1 at epochs 24 and
32, its 3x (540k) 108 epochs, x0.1 at 84 and 100 (rankkd.recipes.COCO_SCHEDULES); a linear warm-up over the first
0.2 epoch (1000 iterations).

This module is the COCO task: its pairs and recipes, options, checks, data, detectors, training forward and
evaluation. The run itself is rankkd.training.trainer's, shared with the other tasks.
"""
import argparse
import math
import sys
from pathlib import Path

import torch

from rankkd.detection import zoo as detection_zoo
from rankkd.distill import DistillConfig
from rankkd.recipes import COCO_PAIRS, COCO_SCHEDULES
from rankkd.training.config import Option
from rankkd.data import LOADER_BACKENDS
from rankkd.data.demo import default_cache_dir
from rankkd.distributed import all_reduce_sum
from rankkd.training.metrics import kendall_tau
from rankkd.tasks.images import IMAGE_OPTIONS, ImageTask
from rankkd.training.run_folder import check_writable
from rankkd.training.task import TaskData

# ----------------------------------------------------------------------------------------------------------------------
# Recipes.

RECIPES = {}
# mdistiller's detection setup (detection/configs/DKD/*.yaml over detectron2's defaults), which the paper's COCO batch
# of 8 comes from: SGD momentum 0.9, 8 images a step, lr 0.01, 180k iterations (detectron2's 1x), x0.1 at 120k and
# 160k, warm-up 1000 iterations linear from 0.001 x lr, weight decay 1e-4; multi-scale training (shorter side 640-800,
# longer <= 1333), flip, test at 800 / 1333. Students start from ImageNet weights of their backbone.
RECIPES["coco"] = dict(
    pair="r101_r18", teacher_weights=None, student_weights="imagenet", loss="coco-dkd-rank",
    **COCO_SCHEDULES["1x"], batch_size=8,
    optimizer="sgd", lr=0.01, lr_reference_batch=8, momentum=0.9, nesterov=False,
    weight_decay=1e-4, decay_norm_and_bias=True,
    schedule="step", lr_decay=0.1, lr_warmup_epochs=0.2, warmup_lr=1e-5, min_lr=0.0,
    train_sizes=(640, 672, 704, 736, 768, 800), test_size=800, max_size=1333, hflip=True,
    compile_mode="default", log_every=20,
)
# A teacher trained as detectron2's model zoo trains the published ones: plain detection training of the pair's
# teacher backbone (R-101 for r101_*, R-50 for r50_mv2) from its ImageNet weights, on the 3x schedule (540k iterations
# at 8 images; the zoo's 270k at 16), the rest as above.
RECIPES["coco-teacher-3x"] = {**RECIPES["coco"], **COCO_SCHEDULES["3x"], "loss": DistillConfig(method="ce")}
TEACHER_RECIPES = ("coco-teacher-3x",)  # recipes that train the pair's teacher, with no teacher of their own
# The embedded demo: 480 train / 120 val generated 128 px images of three shape classes in COCO format, a small
# detector pair trained from scratch; teacher then student in a few minutes on a 2-core CPU.
RECIPES["demo"] = {
    **RECIPES["coco"],
    "pair": "demo", "student_weights": None,
    "loss": DistillConfig(method="kd", ce_weight=1.0, kd_weight=1.0, temperature=1.0, rank_weight=1.0),
    "epochs": 2, "iters_per_epoch": 120, "lr": 0.02, "milestones": (1.6,), "lr_warmup_epochs": 0.2,
    "warmup_lr": 2e-5, "train_sizes": (96, 112, 128, 144, 160), "test_size": 128, "max_size": 213, "log_every": 10,
}
# How the demo trains its teacher: plain detection training, a little longer.
RECIPES["demo-teacher"] = {**RECIPES["demo"], "pair": None, "student": "demo_small", "teacher": None,
                           "loss": DistillConfig(method="ce"), "iters_per_epoch": 150}


def size_list(text) -> tuple[int, ...]:
    try:
        sizes = tuple(int(size) for size in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 16:
        raise argparse.ArgumentTypeError(f"expected comma-separated image sizes >= 16 such as 640,800, got {text!r}")
    return sizes



OPTIONS = (
    Option("data", "data", default="demo", group="run",
          help="a COCO 2017 root (train2017/, val2017/, annotations/instances_{train,val}2017.json), 'demo' (generated "
               "shapes in COCO format) or 'synthetic' (random device-resident images and boxes: times the step)"),
    Option("recipe", "selection", group="run", choices=("coco", "coco-teacher-3x", "demo"),
           help="starting point for every setting below; default: demo for --data demo, else coco; "
                "coco-teacher-3x trains the pair's teacher on detectron2's 3x schedule"),
    Option("pair", "model", group="run", choices=tuple(COCO_PAIRS), optional=True,
           help="teacher -> student backbones (mdistiller's detection pairs; default r101_r18, the demo its own)"),
    Option("student_weights", "model", group="recipe", optional=True,
           help="the student backbone's ImageNet weights: 'imagenet' (torchvision's), a classification state_dict "
                "file, a torchvision weights name, or 'none' (random init)"),
    Option("workers", "data", type=int, low=0, default=2, group="run",
          help="per process: DALI's CPU threads (at least 1) or the torchvision loader's worker processes (default 2)"),
    Option("data_backend", "data", default="auto", choices=LOADER_BACKENDS, group="run",
          help="dali (DALI's COCO reader, decoding on the GPU), torchvision (PIL in worker processes) or auto: DALI "
               "when nvidia-dali is installed"),
    Option("iters_per_epoch", "data", type=int, low=1, group="recipe",
          help="iterations per epoch: evaluation and checkpoint after each (synthetic data: the steps of an epoch)"),
    Option("test_size", "data", type=int, low=16, group="recipe", help="val: shorter side (detectron2: 800)"),
    Option("max_size", "data", type=int, low=16, group="recipe", help="longer side at most (detectron2: 1333)"),
    Option("train_sizes", "augment", type=size_list, group="recipe",
           help="train: shorter side drawn from these per image, e.g. 640,672,704,736,768,800"),
    Option("hflip", "augment", type=bool, group="recipe", help="random horizontal flip, boxes moved with the image"),
    Option("teacher_ap", "job", type=bool, default=True, identity=False, group="run",
           help="also report the teacher's box AP (once per run: it is frozen)"),
    *IMAGE_OPTIONS,
)


# The distillations of the box head this task has recipes for ("none": plain detection training).
DETECTION_METHODS = ("none", "kd", "kd+rank", "dkd", "dkd+rank")


class CocoTask(ImageTask):
    name = "coco"
    description = __doc__.split("\n\n")[0]
    zoo = detection_zoo
    recipes = RECIPES
    own_options = OPTIONS
    methods = DETECTION_METHODS
    methods_help = ("the logit distillation of the box head: kd, dkd (mdistiller's detection DKD) or none (plain "
                    "detection training); +rank adds the ranking loss at gamma = alpha")
    loss_recipe_prefixes = ("coco-",)
    primary_metric = "box_ap"
    summary_metrics = (("AP", "box_ap", "teacher_box_ap"), ("AP50", "box_ap50", "teacher_box_ap50"),
                       ("AP75", "box_ap75", "teacher_box_ap75"))

    def __init__(self):
        super().__init__()
        self._teacher_metrics = {}  # id(teacher) -> its box AP: the teacher is frozen, one evaluation is enough

    def split_method(self, method):
        return ("ce", False) if method == "none" else super().split_method(method)  # none: no distillation

    def recipe(self, args, name=None):
        name = name or args.recipe or ("demo" if args.data == "demo" else "coco")
        recipe = dict(RECIPES[name])
        pair = args.pair or recipe["pair"]
        if pair is not None:
            teacher, student = COCO_PAIRS[pair]
            recipe.update(pair=pair, teacher=teacher, student=student)
            if name in TEACHER_RECIPES:
                recipe.update(teacher=None, student=teacher)
        if args.method is not None and name == "coco":  # the method's published detection loss
            method, with_rank = self.split_method(args.method)
            recipe["loss"] = (DistillConfig(method="ce") if method == "ce"
                              else f"coco-{method}{'-rank' if with_rank else ''}")
        if args.data == "synthetic":
            recipe.update(teacher_weights="random", student_weights=None)  # a timing run reads nothing
        return name, recipe

    def check(self, values, env):
        self.check_models(values)
        data = values["data"]
        if data not in ("demo", "synthetic") and not Path(data).is_dir():
            raise ValueError(f"--data {data!r}: no such folder (give a COCO 2017 root, 'demo' or 'synthetic')")
        if values["teacher"] is not None and values["teacher_weights"] is None and data != "demo":
            raise ValueError("--teacher-weights is needed: a checkpoint this trainer wrote (train one with --method "
                             "none), a detectron2 model-zoo Faster R-CNN R50-FPN / R101-FPN (.pkl or .pth), "
                             "torchvision's FasterRCNN_ResNet50_FPN_Weights.COCO_V1 for resnet50, or 'random'")
        if values["student_weights"] == "none":
            values["student_weights"] = None
        self.zoo.fetch_model_weights(values["student"], values["student_weights"], values["teacher"],
                                                 values["teacher_weights"])

    def make_data(self, cfg, env):
        from rankkd.data.coco import check_coco
        from rankkd.data.coco_loaders import SyntheticDetectionLoader, make_coco_loaders
        from rankkd.data.coco_demo import prepare_demo_coco
        from rankkd.detection.evaluate import load_coco_gt

        data = cfg.data
        if data.data == "synthetic":
            common = dict(batch_size=cfg.optim.batch_size, image_size=(data.test_size, data.test_size),
                          num_classes=81, device=env.device)
            return TaskData(train=SyntheticDetectionLoader(steps=data.iters_per_epoch, seed=cfg.job.seed, **common),
                            val=None, num_classes=81, backend="synthetic")
        root = data.data
        if root == "demo":
            root = prepare_demo_coco(check_writable(default_cache_dir(), "the cache folder ($RANKKD_CACHE)"))
        dataset = check_coco(root)
        if env.is_main and dataset.train.left_out:
            print(dataset.train.left_out_note(), file=sys.stderr, flush=True)
        train, val = make_coco_loaders(
            dataset, batch_size=cfg.optim.batch_size, val_batch_size=cfg.optim.batch_size, rank=env.rank,
            world_size=env.world_size, device=env.device, seed=cfg.job.seed, num_workers=data.workers,
            backend=data.data_backend, train_sizes=cfg.augment.train_sizes, test_size=data.test_size,
            max_size=data.max_size)
        val.coco_gt, val.label_to_category = load_coco_gt(dataset.val.annotation_file), dataset.label_to_category
        return TaskData(train=IterationLoader(train, data.iters_per_epoch), val=val, num_classes=dataset.num_classes,
                        backend=train.backend)

    def build_student(self, cfg, num_classes):
        return self.zoo.build_model(cfg.model.student, num_classes, cfg.model.student_weights)

    def train_forward(self, student, teacher, cfg):
        from rankkd.detection.distill import DetectionDistiller

        return DetectionDistiller(student, teacher if cfg.loss.uses_teacher else None, cfg.loss)

    def compile(self, module, mode):
        """Only the backbones: the RPN and RoI heads have data-dependent shapes (proposals, NMS) that graphs can't
        hold, and the backbones are most of the time. The distiller and both detectors share them, so compiling
        through the distiller (train_forward, compiled first) serves the evaluation models too."""
        for detector in (getattr(module, "student", module), getattr(module, "teacher", None)):
            if detector is not None and not isinstance(detector.backbone, torch._dynamo.eval_frame.OptimizedModule):
                detector.backbone = torch.compile(detector.backbone, mode=mode)
        return module

    def evaluate(self, student, teacher, loader, autocast, env, cfg):
        from rankkd.detection.evaluate import METRIC_NAMES, evaluate_detector

        if loader is None:  # synthetic data: nothing to score against
            return {name: math.nan for name in METRIC_NAMES} | {"val_tau": None}
        known = self._teacher_metrics.get(id(teacher)) if teacher is not None else None
        score_teacher = teacher if teacher is not None and cfg.job.teacher_ap and known is None else None
        metrics = evaluate_detector(student, score_teacher, loader, loader.coco_gt, loader.label_to_category,
                                    autocast, env)
        if score_teacher is not None:
            self._teacher_metrics[id(teacher)] = {key: value for key, value in metrics.items()
                                                  if key.startswith("teacher_")}
        metrics |= self._teacher_metrics.get(id(teacher), {}) if teacher is not None else {}
        return metrics | {"val_tau": roi_tau(student, teacher, loader, autocast, env) if teacher is not None else None}


class IterationLoader:
    """A pass-based train loader cut into epochs of `steps` iterations: epoch e is iterations [e * steps, (e + 1) *
    steps) of the endless sequence of passes, each pass as the inner loader yields it (its order and augmentation a
    function of seed, pass and rank), so a run resumed at any epoch sees exactly the batches it would have."""

    def __init__(self, passes, steps):
        if len(passes) == 0:
            raise ValueError("the training set has fewer images than one batch per process")
        self.passes, self.steps = passes, steps
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.steps

    def __iter__(self):
        iteration, end = self.epoch * self.steps, (self.epoch + 1) * self.steps
        while iteration < end:
            self.passes.set_epoch(iteration // len(self.passes))
            for batch in self.passes.batches_from(iteration % len(self.passes)):
                yield batch
                iteration += 1
                if iteration == end:
                    return


@torch.no_grad()
def roi_tau(student, teacher, loader, autocast, env):
    """Mean Kendall tau-b between the student's and the teacher's box-head class logits at the student's proposals
    on the validation images: how well the student ranks the classes as its teacher does, per RoI."""
    from rankkd.detection.distill import roi_logits

    sums = torch.zeros(2, dtype=torch.float64, device=env.device)
    for images, _ in loader:
        with autocast():
            rois = roi_logits(student, teacher, images)
        tau = kendall_tau(rois.student.float(), rois.teacher.float())
        sums[0] += tau.nansum()
        sums[1] += tau.isfinite().sum()
    tau_sum, rows = all_reduce_sum(sums).tolist()
    return tau_sum / rows if rows else None


TASK = CocoTask()
