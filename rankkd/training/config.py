"""The settings of a training run, shared by train/imagenet.py and train/cifar100.py: the command-line options both
trainers take, a recipe overridden by them, and the checks that need nothing but the settings.

A run's settings are one object: a SimpleNamespace of the run fields (data, models, optimization, speed) whose
`loss` field holds the rankkd.distill.DistillConfig. config.json and every checkpoint hold record(cfg), the run
fields and the loss fields side by side under their own names (lr, batch_size, ce_weight, rank_weight, ...)."""
import argparse
import dataclasses
import json
from types import SimpleNamespace

from rankkd._args import PRECISIONS, TEACHER_MODES, check_number
from rankkd.distill import METHODS, DistillConfig, get_recipe
from rankkd.distill import LOSS_RECIPES
from rankkd.ops import BACKENDS as OP_BACKENDS
from rankkd.ops import available_backends

LOSS_FIELDS = tuple(field.name for field in dataclasses.fields(DistillConfig))
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def epoch_list(text):
    try:
        return tuple(int(epoch) for epoch in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 30,60,90, got {text!r}") from None


def add_common_arguments(parser):
    """The options every trainer takes. Recipe values default to None: "not given, take the recipe's". Returns the
    recipe-override group, to which a trainer adds its own."""
    add = parser.add_argument
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
    add("--compile-mode", choices=COMPILE_MODES, help="torch.compile mode; reduce-overhead replays CUDA graphs "
                                                      "(one process only); default: the recipe's")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="NHWC memory format (default on)")
    add("--deterministic", action="store_true", help="deterministic kernels (slower; exact reruns on one machine)")

    recipe = parser.add_argument_group("recipe overrides (default: the recipe's value)")
    add = recipe.add_argument
    add("--teacher", help="teacher architecture, or 'none' (with --method ce --rank-weight 0: plain cross-entropy)")
    add("--teacher-weights", help="a checkpoint path, or 'random' (untrained: for timing)")
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
    add("--rank-teacher-mode", choices=TEACHER_MODES)
    add("--rank-topk", type=int, help="ranking loss over the teacher's top-K classes only")
    add("--rank-precision", choices=PRECISIONS,
        help="ranking loss: fast (hardware tanh on GPUs, gradients within 2e-3) or exact (full float32 math)")
    add("--rank-backend", choices=OP_BACKENDS)
    return recipe


def resolve_config(args, recipe_name, recipe):
    """The recipe (a dict of run fields; its "loss" a rankkd.distill recipe name or a DistillConfig), overridden by
    what the command line gives, with the loss in cfg.loss. Raises ValueError on a bad setting."""
    given = vars(args)
    cfg = SimpleNamespace(**{key: value for key, value in given.items() if key not in LOSS_FIELDS})
    cfg.recipe = recipe_name
    for key, value in recipe.items():
        if getattr(cfg, key, None) is None:
            setattr(cfg, key, value)
    loss_overrides = {name: given[name] for name in LOSS_FIELDS if given.get(name) is not None}
    cfg.loss_recipe = cfg.loss if isinstance(cfg.loss, str) else None
    try:
        if isinstance(cfg.loss, DistillConfig):
            cfg.loss = dataclasses.replace(cfg.loss, **loss_overrides)
        else:
            cfg.loss = get_recipe(cfg.loss, **loss_overrides) if cfg.loss else DistillConfig(**loss_overrides)
    except ValueError as error:  # DistillConfig names its fields: say the options instead
        field = str(error).split(" ", 1)[0]
        raise ValueError(str(error).replace(field, flag(field), 1) if field in LOSS_FIELDS else str(error)) from None
    if cfg.teacher == "none":
        cfg.teacher = None
    if cfg.loss.uses_teacher and cfg.teacher is None:
        raise ValueError(f"method {cfg.loss.method!r} with rank_weight {cfg.loss.rank_weight} needs a --teacher (a "
                         "plain cross-entropy run: --teacher none --method ce --rank-weight 0)")
    check_ranges(cfg, epochs=(1, None), batch_size=(1, None), log_every=(1, None), lr_reference_batch=(1, None),
                 global_batch_size=(1, None))
    for field, positive in (("lr", True), ("weight_decay", False), ("min_lr", False), ("warmup_lr", False),
                            ("lr_warmup_epochs", False), ("momentum", False), ("lr_decay", True)):
        check_number(flag(field), getattr(cfg, field), positive=positive)
    return cfg


def flag(field):
    """The command-line option that sets a settings field."""
    return "--dkd-warmup-epochs" if field == "warmup_epochs" else f"--{field.replace('_', '-')}"


def check_ranges(cfg, **ranges):
    """Raise a ValueError naming the option unless each field's value (when set) lies in its [low, high] range (None:
    unbounded)."""
    for field, (low, high) in ranges.items():
        value = getattr(cfg, field)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"{flag(field)} must be {bounds}, got {value}")


def record(cfg):
    """The resolved settings as plain JSON values, run and loss fields side by side: what config.json and every
    checkpoint hold."""
    fields = {key: value for key, value in vars(cfg).items() if key != "loss"} | dataclasses.asdict(cfg.loss)
    return json.loads(json.dumps(fields, default=str))


def check_loss_fits(loss, num_classes, device):
    """The loss settings that depend on the data and the device, checked before any work."""
    if loss.rank_weight == 0:
        return
    if loss.rank_topk is not None and loss.rank_topk > num_classes:
        raise ValueError(f"--rank-topk {loss.rank_topk} is more than the {num_classes} classes of the data")
    available = available_backends(device)
    if loss.rank_backend != "auto" and loss.rank_backend not in available:
        raise ValueError(f"--rank-backend {loss.rank_backend} does not run on {device.type} tensors here; available: "
                         f"{', '.join(available)} (or auto)")
