"""Logit distillation with the Kendall's tau ranking loss: ImageNet with torchrun, or the embedded demo on a laptop.

    python train/imagenet.py                       # the demo: trains a small teacher on handwritten digits (cached),
                                                   # then a KD + ranking-loss student, and prints both top-1 scores
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank
    torchrun --nproc_per_node=4 train/imagenet.py --data /data/imagenet --out runs/r34-r18-kd-rank --resume auto
    python train/imagenet.py --data synthetic --batch-size 256     # on a GPU: the training step alone, no I/O

The file reads top to bottom: the recipes (every number in them can be overridden on the command line), the
command line, the checks that run before any work, the training step, evaluation, the epoch loop, and the demo.
Reusable parts live in rankkd/: models, data, distill (the losses), metrics, train_utils (plumbing).

Batch sizes: --batch-size is per process (per GPU); the global batch is batch size x processes. The learning rate
of a recipe is stated for a reference global batch (lr_reference_batch) and scaled linearly to the actual one.
Defaults that depend on the device: on CUDA, bf16 autocast and torch.compile are on; on the CPU both are off
(compiling costs more than it saves in a short CPU run; turn them on with --precision bf16 --compile).
"""
import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

from rankkd import models  # noqa: E402
from rankkd.training.data import make_loaders, prepare_demo, synthetic_loader  # noqa: E402
from rankkd.training.data.demo import default_cache_dir  # noqa: E402
from rankkd.distill import METHODS, DistillConfig, Distiller, get_recipe  # noqa: E402
from rankkd.distill import RECIPES as LOSS_RECIPES  # noqa: E402
from rankkd.training.metrics import kendall_tau, topk_correct  # noqa: E402
from rankkd.training.utils import (MetricsLog, Progress, all_reduce_sum, average_buffers, barrier,  # noqa: E402
                                broadcast_object, cleanup_distributed, copy_atomically, format_duration,
                                gather_rng_states, init_distributed, learning_rate, load_checkpoint, save_checkpoint,
                                seed_everything, set_rng_state)

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
    log_every=50,
)
# The paper's DeiT students (DESIGN.md): AdamW, 300 epochs, lr 5e-4, weight decay 0.05 (not on norms, biases,
# position embeddings or class token), cosine to a minimum lr of 5e-6 after a 5-epoch warm-up, batch 128 per GPU,
# lr scaled from a global batch of 512 as DeiT does; teacher RegNetY-16GF as in DeiT. DeiT's heavy augmentation
# (RandAugment, mixup, cutmix, random erasing, repeated augmentation) is not part of this trainer.
RECIPES["deit"] = {
    **RECIPES["imagenet"],
    "teacher": "regnet_y_16gf", "teacher_weights": "IMAGENET1K_V2", "student": "deit_tiny_patch16_224",
    "loss": "deit-kd-rank", "epochs": 300, "batch_size": 128,
    "optimizer": "adamw", "lr": 5e-4, "lr_reference_batch": 512, "weight_decay": 0.05, "decay_norm_and_bias": False,
    "schedule": "cosine", "lr_warmup_epochs": 5.0, "warmup_lr": 1e-6, "min_lr": 5e-6,
}
# The embedded demo: 1437 train / 360 val handwritten digits at 32x32, a small CNN pair, a few epochs on a CPU.
# Digits are not mirror-symmetric (no flip), and crops keep most of the digit (min_scale 0.35).
RECIPES["demo"] = {
    **RECIPES["imagenet"],
    "teacher": "demo_cnn_large", "teacher_weights": None,  # None: the demo trains its teacher first (and caches it)
    "student": "demo_cnn_small",
    "loss": None, "method": "kd", "ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0, "rank_weight": 1.0,
    "epochs": 12, "batch_size": 64, "lr": 0.1, "lr_reference_batch": 64, "weight_decay": 5e-4,
    "schedule": "cosine", "lr_warmup_epochs": 0.5, "min_lr": 0.0,
    "image_size": 32, "min_scale": 0.35, "hflip": False, "val_resize_ratio": 1.0,
    "log_every": 10,
}
# How the demo trains its teacher: plain cross-entropy, no teacher of its own.
RECIPES["demo-teacher"] = {
    **RECIPES["demo"],
    "student": "demo_cnn_large", "teacher": None, "method": "ce", "rank_weight": 0.0, "epochs": 10,
}
LOSS_FIELDS = [field.name for field in dataclasses.fields(DistillConfig)]

# ----------------------------------------------------------------------------------------------------------------------
# Command line. Recipe values default to None here: "not given, take the recipe's".


def epoch_list(text):
    return tuple(int(epoch) for epoch in text.split(","))


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--data", default="demo", help="an ImageFolder root holding train/ and val/, 'demo' (the embedded digits set) "
                                       "or 'synthetic' (random device-resident batches: times the step without I/O)")
    add("--recipe", choices=[name for name in RECIPES if name != "demo-teacher"],
        help="starting point for every setting below; default: demo for --data demo, else imagenet")
    add("--out", help="output folder (metrics.jsonl, config.json, last.pt, best.pt, TensorBoard events); default: "
                      "runs/<data>-<student>-<method>-<date-time>")
    add("--resume", choices=["auto"], help="auto: continue from OUT/last.pt when it exists (without --out: the newest "
                                           "matching folder under runs/), else start there")
    add("--seed", type=int, default=0, help="seed of the weights, data order and augmentation (default 0)")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: cuda when there is a GPU")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "off"],
        help="autocast dtype (fp16 adds a GradScaler); auto: bf16 on CUDA, off on the CPU")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the student, teacher and loss; "
                                                                 "default: on for CUDA, off on the CPU")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format (default on)")
    add("--deterministic", action="store_true", help="deterministic kernels (slower; exact reruns on one machine)")
    add("--workers", type=int, help="data loading threads per process (DALI) or workers (torchvision); default: "
                                    "on CUDA the CPUs per process, at most 8; on the CPU a quarter of them (the rest "
                                    "compute)")
    add("--data-backend", default="auto", choices=["auto", "dali", "torchvision"],
        help="auto: DALI when nvidia-dali is installed, else torchvision")
    add("--num-classes", type=int, default=1000, help="classes of --data synthetic (default 1000)")
    add("--steps-per-epoch", type=int, default=100, help="steps per epoch of --data synthetic (default 100)")

    recipe = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    add = recipe.add_argument
    add("--teacher", help="teacher architecture (torchvision name, timm name, demo_cnn_large), or 'none'")
    add("--teacher-weights", help="torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), a checkpoint path, "
                                  "'pretrained' (timm), or 'random' (untrained: for timing)")
    add("--student", help="student architecture")
    add("--epochs", type=int)
    add("--batch-size", type=int, help="images per process (per GPU) and step")
    add("--global-batch-size", type=int, help="images per step over all processes (sets --batch-size)")
    add("--optimizer", choices=["sgd", "adamw"])
    add("--lr", type=float, help="peak learning rate at the reference global batch")
    add("--lr-reference-batch", type=int, help="global batch that --lr is stated for (lr scales linearly)")
    add("--momentum", type=float)
    add("--nesterov", action=argparse.BooleanOptionalAction)
    add("--weight-decay", type=float)
    add("--decay-norm-and-bias", action=argparse.BooleanOptionalAction,
        help="apply weight decay to 1-D parameters (norms, biases) and ViT embeddings too")
    add("--schedule", choices=["step", "cosine"])
    add("--milestones", type=epoch_list, help="step schedule: epochs where the lr drops, e.g. 30,60,90")
    add("--lr-decay", type=float, help="step schedule: factor at each milestone")
    add("--lr-warmup-epochs", type=float)
    add("--warmup-lr", type=float)
    add("--min-lr", type=float, help="cosine schedule: final learning rate")
    add("--image-size", type=int)
    add("--min-scale", type=float, help="random-resized-crop: smallest crop area")
    add("--hflip", action=argparse.BooleanOptionalAction)
    add("--val-resize-ratio", type=float, help="val: resize the shorter side to image_size x this, then center-crop")
    add("--log-every", type=int, help="steps between progress updates (each costs one host sync)")

    loss = parser.add_argument_group("loss (rankkd.distill.DistillConfig; default: the --loss recipe's value)")
    add = loss.add_argument
    add("--loss", help=f"a rankkd.distill recipe: {', '.join(LOSS_RECIPES)}")
    add("--method", choices=METHODS)
    add("--ce-weight", type=float, help="alpha")
    add("--kd-weight", type=float, help="beta: weight of the KD / DKD / DIST term")
    add("--temperature", type=float)
    add("--standardize", action=argparse.BooleanOptionalAction, help="logit standardization (KD and DKD)")
    add("--dkd-alpha", type=float)
    add("--dkd-beta", type=float)
    add("--dkd-warmup-epochs", type=float, dest="warmup_epochs", help="DKD: linear warm-up of its term")
    add("--dist-beta", type=float)
    add("--dist-gamma", type=float)
    add("--rank-weight", type=float, help="gamma: weight of the Kendall ranking loss; 0 turns it off")
    add("--rank-k", type=float, help="ranking loss: tanh steepness k")
    add("--rank-teacher-mode", choices=["tanh", "sign"])
    add("--rank-topk", type=int, help="ranking loss over the teacher's top-K classes only")
    add("--rank-backend", choices=["auto", "cuda", "triton", "cpu", "reference"])
    return parser


def resolve_config(args):
    """The recipe, overridden by what the command line gives, checked. Raises ValueError on a bad argument."""
    recipe = args.recipe or ("demo" if args.data == "demo" else "imagenet")
    settings = vars(args) | {"recipe": recipe}
    for key, value in RECIPES[recipe].items():
        if settings.get(key) is None:
            settings[key] = value
    cfg = SimpleNamespace(**settings)
    if cfg.data == "synthetic" and args.teacher_weights is None:
        cfg.teacher_weights = "random"  # a timing run downloads nothing and reads nothing
    if cfg.teacher == "none":
        cfg.teacher = None
    loss_overrides = {name: settings[name] for name in LOSS_FIELDS if settings.get(name) is not None}
    cfg.distill = get_recipe(cfg.loss, **loss_overrides) if cfg.loss else DistillConfig(**loss_overrides)
    vars(cfg).update(dataclasses.asdict(cfg.distill))  # every loss number, in the one flat record of the run

    for name in (cfg.student, cfg.teacher):
        if name is not None:
            models.check_arch(name)
    if cfg.distill.uses_teacher and cfg.teacher is None:
        raise ValueError(f"method {cfg.method!r} with rank_weight {cfg.rank_weight} needs a --teacher")
    if cfg.data not in ("demo", "synthetic") and not Path(cfg.data).is_dir():
        raise ValueError(f"--data {cfg.data!r}: no such directory (give an ImageFolder root with train/ and val/, "
                         "'demo' or 'synthetic')")
    if cfg.teacher is not None and cfg.teacher_weights is None and cfg.data != "demo":
        raise ValueError("--teacher-weights is needed: a torchvision weights name, a checkpoint path, or 'random'")
    for name, minimum in (("epochs", 1), ("batch_size", 1), ("image_size", 8), ("log_every", 1), ("num_classes", 2),
                          ("steps_per_epoch", 1), ("lr_reference_batch", 1), ("global_batch_size", 1)):
        value = getattr(cfg, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
    if not cfg.lr > 0 or cfg.weight_decay < 0 or cfg.min_lr < 0:
        raise ValueError(f"need --lr > 0, --weight-decay >= 0 and --min-lr >= 0, got {cfg.lr}, {cfg.weight_decay}, "
                         f"{cfg.min_lr}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Set-up: everything a run needs, made and checked before any training, so that a bad setting fails in seconds.


def resolve_for_device(cfg, env):
    """Settings that depend on the processes and the device: batch sizes, scaled lr, precision, compile, workers."""
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size % env.world_size:
            raise ValueError(f"--global-batch-size {cfg.global_batch_size} does not split evenly over "
                             f"{env.world_size} processes")
        cfg.batch_size = cfg.global_batch_size // env.world_size
    cfg.global_batch_size = cfg.batch_size * env.world_size
    cfg.world_size = env.world_size
    cfg.scaled_lr = cfg.lr * cfg.global_batch_size / cfg.lr_reference_batch
    on_cuda = env.device.type == "cuda"
    if cfg.precision == "auto":
        cfg.precision = "bf16" if on_cuda else "off"
    if cfg.compile is None:
        cfg.compile = on_cuda
    cpus = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # this process's share
    if cfg.workers is None:
        cfg.workers = min(8, cpus) if on_cuda else max(1, cpus // 4)
    if not on_cuda:
        # Loader threads and torch's compute threads share the cores: more threads than cores makes torch's
        # thread pool wait on descheduled threads at every op (several times slower on 2 cores).
        torch.set_num_threads(max(1, cpus - cfg.workers))


def output_folder(cfg, env):
    """The run's folder and the checkpoint to continue from (None: a fresh start). Never overwrites a run silently."""
    if cfg.out is None:
        data_name = cfg.data if cfg.data in ("demo", "synthetic") else Path(cfg.data).name
        prefix = f"runs/{data_name}-{cfg.student}-{cfg.method}{'-rank' if cfg.rank_weight else ''}"
        earlier = sorted(Path().glob(f"{prefix}-*/last.pt")) if cfg.resume else []
        # Decided on rank 0 and broadcast, so that every process agrees on one date-time.
        cfg.out = broadcast_object(str(earlier[-1].parent) if earlier else f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
    last = Path(cfg.out) / "last.pt"
    if not last.exists():
        return Path(cfg.out), None
    if not cfg.resume:
        raise ValueError(f"{cfg.out} already holds a run (last.pt): continue it with --resume auto, or pick another "
                         "--out")
    state = load_checkpoint(last)
    if not isinstance(state, dict) or not {"student", "optimizer", "epoch", "config", "rng"} <= state.keys():
        raise ValueError(f"{last} is not a checkpoint of this trainer")
    if state["config"]["student"] != cfg.student:
        raise ValueError(f"{last} holds a {state['config']['student']} student, not --student {cfg.student}")
    changed = [f"{key} {state['config'][key]} -> {value}" for key, value in json_record(cfg).items()
               if key in state["config"] and state["config"][key] != value and key not in ("resume", "out")]
    if changed and env.is_main:
        print(f"resuming with changed settings: {', '.join(changed)}")
    return Path(cfg.out), state


def json_record(cfg):
    """The resolved settings as JSON values (what config.json and every checkpoint hold)."""
    return json.loads(json.dumps({key: value for key, value in vars(cfg).items() if key != "distill"}, default=str))


def make_data(cfg, env):
    if cfg.data == "synthetic":
        common = dict(batch_size=cfg.batch_size, image_size=cfg.image_size, num_classes=cfg.num_classes,
                      device=env.device, channels_last=cfg.channels_last)
        return SimpleNamespace(train=synthetic_loader(steps=cfg.steps_per_epoch, seed=cfg.seed + env.rank, **common),
                               val=synthetic_loader(steps=max(1, cfg.steps_per_epoch // 10), seed=cfg.seed + 7919,
                                                    **common),
                               num_classes=cfg.num_classes)
    root = prepare_demo() if cfg.data == "demo" else cfg.data
    return make_loaders(root, batch_size=cfg.batch_size, image_size=cfg.image_size, rank=env.rank,
                        world_size=env.world_size, device=env.device, seed=cfg.seed, backend=cfg.data_backend,
                        num_threads=cfg.workers, channels_last=cfg.channels_last, min_scale=cfg.min_scale,
                        hflip=cfg.hflip, val_resize_ratio=cfg.val_resize_ratio)


def prepare(cfg, env):
    """Output folder, checkpoint to resume, data, teacher and student. Raises ValueError (or FileNotFoundError for a
    missing data folder) on anything wrong with the arguments."""
    resolve_for_device(cfg, env)
    out, resume_state = output_folder(cfg, env)
    loaders = make_data(cfg, env)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    teacher = None
    if cfg.teacher is not None and cfg.teacher_weights is not None:
        teacher = models.load_teacher(cfg.teacher, cfg.teacher_weights, loaders.num_classes)
    student = models.build_model(cfg.student, loaders.num_classes)
    return SimpleNamespace(cfg=cfg, out=out, resume_state=resume_state, loaders=loaders, teacher=teacher,
                           student=student)


# ----------------------------------------------------------------------------------------------------------------------
# Training.


class NonFiniteLossError(RuntimeError):
    pass


def make_optimizer(student, cfg, device):
    decay, no_decay = [], []
    # timm ViTs name the embeddings that DeiT keeps out of weight decay (position embedding, class token).
    no_decay_names = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    for name, parameter in student.named_parameters():
        skip = not cfg.decay_norm_and_bias and (parameter.ndim <= 1 or name in no_decay_names)
        (no_decay if skip else decay).append(parameter)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if params]
    fused = device.type == "cuda"  # one kernel for the whole update, and no host sync under a GradScaler
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.scaled_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.scaled_lr, fused=fused)


def train_one_epoch(epoch, run, env, forward, optimizer, scaler, autocast, epoch_tensor):
    """One pass over the training set. No host sync inside a step: loss terms stay on the device and are read, summed
    over ranks and checked for NaN/inf once every log_every steps. Returns the epoch's mean terms and img/s."""
    cfg, loader = run.cfg, run.loaders.train
    loader.set_epoch(epoch)
    steps = len(loader)
    progress = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=env.is_main)
    lr_at = partial(learning_rate, schedule=cfg.schedule, lr=cfg.scaled_lr, epochs=cfg.epochs,
                    warmup_epochs=cfg.lr_warmup_epochs, warmup_lr=cfg.warmup_lr, milestones=cfg.milestones,
                    decay=cfg.lr_decay, min_lr=cfg.min_lr)
    # The DKD warm-up reads the epoch, counted from 1 as mdistiller does, from a device tensor: changing it neither
    # recompiles the compiled step nor syncs.
    epoch_tensor.fill_(epoch + 1)
    pending, sums, names = [], None, None
    interval_start = time.perf_counter()
    timed_images, timed_seconds, lr = 0, 0.0, lr_at(epoch)
    for step, (images, labels) in enumerate(loader):
        lr = lr_at(epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            _, terms = forward(images, labels, epoch_tensor)
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        names = names or list(terms)
        pending.append(torch.stack([term.detach().float() for term in terms.values()]))

        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            interval = all_reduce_sum(torch.stack(pending)).cpu().double() / env.world_size  # the one host sync
            bad_rows = (~interval.isfinite().all(dim=1)).nonzero()
            if len(bad_rows):
                bad = step + 1 - len(pending) + int(bad_rows[0])  # 0-based step within the epoch
                values = ", ".join(f"{name} {value:.4g}" for name, value in zip(names, interval[bad_rows[0, 0]]))
                kept = (f"{run.out / 'last.pt'} still holds epoch {epoch}, the last good one" if epoch
                        else "no checkpoint had been written yet")
                raise NonFiniteLossError(
                    f"non-finite loss at step {epoch * steps + bad + 1} (epoch {epoch + 1}, step {bad + 1} of {steps}):"
                    f" {values}. Stopped without saving: {kept}.")
            sums = interval.sum(0) if sums is None else sums + interval.sum(0)
            seconds = time.perf_counter() - interval_start
            images_per_second = len(pending) * cfg.global_batch_size / seconds
            if step + 1 > cfg.log_every or step + 1 == steps:  # the first interval holds compilation and warm-up
                timed_images += len(pending) * cfg.global_batch_size
                timed_seconds += seconds
            mean = interval.mean(0)
            terms_text = " ".join(f"{name} {value:.3f}" for name, value in zip(names[:-1], mean[:-1]))
            progress.update(step + 1, f"loss {mean[-1]:.4f} ({terms_text}) lr {lr:.3g} "
                                      f"{images_per_second:,.0f} img/s")
            pending.clear()
            interval_start = time.perf_counter()
    progress.close()
    means = {f"loss_{name}": float(value) for name, value in zip(names, sums / steps)}
    return {"lr": lr, **means, "train_img_s": timed_images / timed_seconds}


@torch.no_grad()
def evaluate(student, teacher, loader, autocast, env):
    """Top-1 / top-5 (%) of student and teacher over the whole validation set, and the mean Kendall tau-b between
    their logits. Sums stay per rank until one all-reduce at the end (ranks may run different batch counts)."""
    sums = torch.zeros(7, dtype=torch.float64, device=env.device)
    for images, labels in loader:
        with autocast():
            student_logits = student(images)
            teacher_logits = teacher(images) if teacher is not None else None
        sums[0] += labels.numel()
        sums[1:3] += topk_correct(student_logits, labels)
        if teacher_logits is not None:
            sums[3:5] += topk_correct(teacher_logits, labels)
            tau = kendall_tau(student_logits, teacher_logits)
            sums[5] += tau.nansum()
            sums[6] += tau.isfinite().sum()
    images, top1, top5, teacher_top1, teacher_top5, tau_sum, tau_rows = all_reduce_sum(sums).tolist()
    has_teacher = teacher is not None
    return {"val_top1": 100 * top1 / images, "val_top5": 100 * top5 / images,
            "val_tau": tau_sum / tau_rows if has_teacher and tau_rows else None,
            "teacher_top1": 100 * teacher_top1 / images if has_teacher else None,
            "teacher_top5": 100 * teacher_top5 / images if has_teacher else None}


def fit(run, env):
    """Train run.student for the configured epochs (continuing a resumed run), evaluating and checkpointing after
    every epoch. Returns the run's summary."""
    cfg, device = run.cfg, env.device
    print0 = print if env.is_main else (lambda *args, **kwargs: None)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student = run.student.to(device, memory_format=memory_format)
    teacher = run.teacher.to(device, memory_format=memory_format) if run.teacher is not None else None
    optimizer = make_optimizer(student, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = partial(torch.autocast, device.type, dtype=torch.float16 if cfg.precision == "fp16" else torch.bfloat16,
                       enabled=cfg.precision != "off")
    start_epoch, best = 0, {"val_top1": -1.0, "epoch": 0}
    last_record = {}
    if run.resume_state is not None:
        state = run.resume_state
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, last_record = state["epoch"], state["best"], state["last_record"]
        if len(state["rng"]) == env.world_size:
            set_rng_state(state["rng"][env.rank])
        else:
            print0(f"resuming on {env.world_size} processes, saved on {len(state['rng'])}: random streams reseeded")
            seed_everything(cfg.seed + 1_000_003 * start_epoch + env.rank)
        print0(f"resuming {run.out} after epoch {start_epoch}")
    else:
        seed_everything(cfg.seed + env.rank)  # dropout / drop-path differ between ranks

    # The whole training forward (teacher, student, loss terms) is one module, wrapped by DDP and then compiled: the
    # pattern torch.compile supports for DDP, one graph per gradient bucket. DDP syncs only the student's gradients
    # (the teacher's parameters need none).
    train_forward = Distiller(student, teacher if cfg.distill.uses_teacher else None, cfg.distill)
    if env.world_size > 1:
        train_forward = DistributedDataParallel(train_forward, gradient_as_bucket_view=True,
                                                device_ids=[env.local_rank] if device.type == "cuda" else None)
    eval_student, eval_teacher = student, teacher
    if cfg.compile:
        train_forward = torch.compile(train_forward)
        eval_student = torch.compile(student)
        eval_teacher = torch.compile(teacher) if teacher is not None else None
    epoch_tensor = torch.zeros((), device=device)

    log = None
    if env.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(json_record(cfg), indent=2) + "\n")
        log = MetricsLog(run.out, resumed_epochs=start_epoch)
    print0(f"{cfg.student} <- {cfg.teacher or 'no teacher'} | loss {cfg.method}"
           f"{f' + {cfg.rank_weight:g} x rank' if cfg.rank_weight else ''} | {env.world_size} process(es) on "
           f"{device.type}, batch {cfg.batch_size} per process = {cfg.global_batch_size} global | "
           f"lr {cfg.scaled_lr:.4g} (= {cfg.lr:g} x {cfg.global_batch_size}/{cfg.lr_reference_batch}) | "
           f"precision {cfg.precision}, compile {'on' if cfg.compile else 'off'} | "
           f"data {cfg.data} ({run.loaders.train.backend}) | out {run.out}")

    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        train_forward.train()
        train_stats = train_one_epoch(epoch, run, env, train_forward, optimizer, scaler, autocast, epoch_tensor)
        average_buffers(student)
        eval_student.eval()
        val_stats = evaluate(eval_student, eval_teacher, run.loaders.val, autocast, env)
        last_record = {"epoch": epoch + 1, **train_stats, **val_stats,
                       "epoch_time_s": time.perf_counter() - epoch_start}
        is_best = val_stats["val_top1"] > best["val_top1"]
        if is_best:
            best = {"val_top1": val_stats["val_top1"], "epoch": epoch + 1}
        rng = gather_rng_states()  # a collective: every rank takes part
        if env.is_main:
            log.write(last_record)  # before the checkpoint: a resumed run drops lines past its checkpoint
            save_checkpoint({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best,
                             "last_record": last_record, "config": json_record(cfg), "rng": rng},
                            run.out / "last.pt")
            if is_best:
                copy_atomically(run.out / "last.pt", run.out / "best.pt")
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - run_start) / done * (cfg.epochs - epoch - 1)
        tau = last_record["val_tau"]
        print0(f"epoch {epoch + 1}/{cfg.epochs}: loss {train_stats['loss_total']:.4f}, val top-1 "
               f"{val_stats['val_top1']:.2f} top-5 {val_stats['val_top5']:.2f}"
               f"{f', tau {tau:.3f}' if tau is not None else ''}, {train_stats['train_img_s']:,.0f} img/s, "
               f"{last_record['epoch_time_s']:.1f}s; best top-1 {best['val_top1']:.2f} (epoch {best['epoch']})"
               f"{f', ETA {format_duration(eta)}' if eta else ''}", flush=True)
    if log is not None:
        log.close()
    barrier()
    return {"student": student, "best": best, "last": last_record, "out": run.out}


# ----------------------------------------------------------------------------------------------------------------------
# The demo's teacher: trained by this same loop with the "demo-teacher" recipe, cached by its settings.


def demo_teacher_checkpoint(cfg, env):
    """Path of the demo teacher's weights: trained on first use (resumably), then cached under $RANKKD_CACHE (or
    ~/.cache/rankkd), keyed by the recipe it was trained with, and reused by every later run."""
    recipe = {**RECIPES["demo-teacher"], "student": cfg.teacher}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    folder = default_cache_dir() / "demo-teachers" / f"{cfg.teacher}-{key}"
    weights = folder / "teacher.pt"
    if weights.exists():
        return weights
    if env.is_main:
        print(f"training the demo teacher {cfg.teacher} first (cached in {folder} for later runs)", flush=True)
    teacher_args = make_parser().parse_args([
        "--data", "demo", "--student", cfg.teacher, "--out", str(folder), "--resume", "auto",
        "--device", env.device.type, "--precision", cfg.precision, "--compile" if cfg.compile else "--no-compile",
        "--workers", str(cfg.workers), "--data-backend", cfg.data_backend])
    teacher_args.recipe = "demo-teacher"  # not offered on the command line
    teacher_cfg = resolve_config(teacher_args)
    fit(prepare(teacher_cfg, env), env)
    if env.is_main:
        copy_atomically(folder / "last.pt", weights)
    barrier()
    return weights


# ----------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    """Run the trainer on `argv` (default: the command line); returns the summary of the run."""
    args = make_parser().parse_args(argv)
    try:  # every check of the arguments, before any work starts
        env = init_distributed(args.device)
        cfg = resolve_config(args)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        run = prepare(cfg, env)
    except (ValueError, FileNotFoundError) as error:
        stop(f"imagenet.py: error: {error}", 2)
    try:
        if cfg.teacher is not None and run.teacher is None:  # the demo without --teacher-weights
            run.teacher = models.load_teacher(cfg.teacher, demo_teacher_checkpoint(cfg, env), run.loaders.num_classes)
        summary = fit(run, env)
    except NonFiniteLossError as error:
        stop(f"imagenet.py: error: {error}", 1)
    cleanup_distributed()
    if env.is_main:
        print_summary(cfg, summary)
    return summary


def stop(message, exit_code):
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    cleanup_distributed()
    sys.exit(exit_code)


def print_summary(cfg, summary):
    best, last = summary["best"], summary["last"]
    rows = [("model", "role", "top-1", "top-5")]
    if last.get("teacher_top1") is not None:
        rows.append((cfg.teacher, "teacher", f"{last['teacher_top1']:.2f}", f"{last['teacher_top5']:.2f}"))
    loss = f"{cfg.method}{' + rank' if cfg.rank_weight else ''}"
    rows.append((cfg.student, f"student ({loss}), last", f"{last['val_top1']:.2f}", f"{last['val_top5']:.2f}"))
    rows.append(("", f"student, best (epoch {best['epoch']})", f"{best['val_top1']:.2f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"\nvalidation results ({summary['out']}):")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))))
    if last.get("val_tau") is not None:
        print(f"  mean Kendall tau-b, student vs teacher logits: {last['val_tau']:.3f}")


if __name__ == "__main__":
    main()
