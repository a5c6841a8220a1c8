"""The settings of a training run, as one frozen object.

Every command-line option is declared once, as an Option: its type, valid range, help text and the part of the
settings it fills. A task (rankkd.tasks) adds its own options to the shared ones. resolve_config() then
builds the RunConfig in one go: the task's recipe, overridden by the command line, completed with what the processes
and the device decide (global batch, scaled lr, precision, compile mode), checked with the option's name in every
message, and frozen. Nothing changes it afterwards; config.json and every checkpoint hold record(cfg).

A RunConfig is made of parts passed whole to the code that needs them, each a frozen dataclass whose fields have their
options' types: job (folder, resume, seed, device, length, logging: how this invocation runs), model, data, optim
(optimizer, batch and schedule), speed (precision, compile), the parts a task's own options add (the image tasks'
augment) and loss (a rankkd.distill.DistillConfig). Field names are unique across the parts, so flat_settings() gives
one flat dict whose keys are the option names without dashes, whatever the parts were called when it was written:
that is what resuming compares.
"""
import argparse
import dataclasses
import functools
import itertools
import json
import math
import time
import typing
from collections.abc import Callable
from pathlib import Path

from rankkd._args import K_RULE, PRECISIONS, TEACHER_MODES, check_steepness
from rankkd.distill import METHODS, DistillConfig
from rankkd.ops import BACKENDS as OP_BACKENDS
from rankkd.ops import available_backends
from rankkd.recipes import LOSS_RECIPES, get_recipe
from rankkd.distributed import broadcast_object

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# The parts of every task's settings (then a task's own, then loss). Options of the "selection" part (--recipe, --loss,
# --method) choose values and are not kept themselves; "loss" is the DistillConfig.
SHARED_SECTIONS = ("job", "model", "data", "optim", "speed")
SEED_LIMIT = 2**32  # numpy's generators take seeds below 2^32
# A method names the base loss, and "+rank" the ranking loss on top: the same names in every trainer and the grid.
METHOD_NAMES = tuple(name for method in METHODS for name in (method, f"{method}+rank"))


def epoch_list(text) -> tuple[int | float, ...]:
    """Epochs such as 30,60,90; a fraction (24.5) where an epoch is a fixed number of iterations (COCO)."""
    try:
        return tuple(float(epoch) if "." in epoch else int(epoch) for epoch in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs such as 30,60,90, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Option:
    """One setting: its command-line option (`flag`, default --name-with-dashes), its type and valid range, and the
    part of the RunConfig it fills. default None means "the recipe's value"; settings that no recipe sets have a
    real default. A setting holds a value of its type; one that is `optional` may hold None (off, or not given: then
    decided when the settings are resolved). A setting with command_line=False is decided by the processes or the
    device, never typed in."""
    name: str
    section: str
    type: type | Callable[[str], object] = str  # a type, or a converter whose return annotation is the value's type
    help: str = ""
    default: object = None
    choices: tuple | None = None
    low: float | None = None  # inclusive lower bound
    high: float | None = None  # inclusive upper bound
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    flag: str | None = None
    group: str = "recipe"  # where --help lists it: "run", "recipe", "loss" or the task's
    command_line: bool = True
    identity: bool = True  # part of what the experiment is: a resumed run may not change it (see changed_settings)
    optional: bool = False

    @property
    def option(self):
        return self.flag or f"--{self.name.replace('_', '-')}"

    def check(self, value):
        """Raise a ValueError naming the option unless `value` (None: not set) is valid."""
        if value is None or self.type in (str, bool) or self.choices:
            return
        if self.type is epoch_list:
            if any(epoch < 0 for epoch in value):
                raise ValueError(f"{self.option} takes epochs >= 0, got {','.join(map(str, value))}")
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.option} must be a finite number, got {value}")
        bounds = [(self.low, ">=", value >= self.low if self.low is not None else True),
                  (self.above, ">", value > self.above if self.above is not None else True),
                  (self.high, "<=", value <= self.high if self.high is not None else True),
                  (self.below, "<", value < self.below if self.below is not None else True)]
        if not all(ok for _, _, ok in bounds):
            rule = " and ".join(f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}"
                                for bound, sign, _ in bounds if bound is not None)
            raise ValueError(f"{self.option} must be {rule}, got {value}")


def _options(section, group, *specs):
    return tuple(Option(name, section, **({"group": group} | spec)) for name, spec in specs)


# identity=False: not part of what the experiment is (where, how fast, how long, how it logs); see changed_settings.
JOB_OPTIONS = _options(
    "job", "run",
    ("out", dict(identity=False, optional=True,
                 help="output folder (metrics.jsonl, config.json, last.pt, best.pt, TensorBoard events); default: "
                      "runs/<data>-<student>-<method>-<date-time>")),
    ("resume", dict(identity=False, optional=True, choices=("auto",),
                    help="auto: continue from OUT/last.pt when it exists (without --out: the newest folder under "
                         "runs/ with the same experiment settings), else start there")),
    ("seed", dict(type=int, default=0, low=0, below=SEED_LIMIT,
                  help="seed of the weights, data order and augmentation (default 0)")),
    ("device", dict(identity=False, default="auto", choices=("auto", "cuda", "cpu"),
                    help="default: cuda when there is a GPU")),
    ("deterministic", dict(identity=False, type=bool, default=False,
                           help="deterministic kernels (slower; exact reruns on one machine)")),
    ("epochs", dict(identity=False, type=int, low=1, group="recipe")),
    ("log_every", dict(identity=False, type=int, low=1, group="recipe",
                       help="steps between progress updates (each costs one host sync)")),
    ("world_size", dict(identity=False, type=int, command_line=False)),
    ("allow_changed_settings", dict(identity=False, type=bool, default=False,
                                    help="with --resume auto: continue a run whose folder holds other experiment "
                                         "settings (metrics.jsonl records the change)")),
)
SPEED_OPTIONS = _options(
    "speed", "run",
    ("precision", dict(default="auto", choices=("auto", "bf16", "fp16", "off"),
                       help="autocast dtype (fp16 adds a GradScaler); auto: bf16 on CUDA, off on the CPU")),
    ("compile", dict(identity=False, type=bool, optional=True,
                     help="torch.compile the student, teacher and loss; default: on for CUDA, off on the CPU")),
    ("compile_mode", dict(identity=False, choices=COMPILE_MODES,
                          help="torch.compile mode; reduce-overhead replays CUDA graphs (one process only); default: "
                               "the recipe's")),
)
MODEL_OPTIONS = _options(
    "model", "recipe",
    ("teacher", dict(optional=True, help="teacher architecture, or 'none' (with --method ce: plain cross-entropy)")),
    ("teacher_weights", dict(optional=True, help="a checkpoint path, or 'random' (untrained: for timing)")),
    ("student", dict(help="student architecture")),
)
OPTIM_OPTIONS = _options(
    "optim", "recipe",
    ("batch_size", dict(identity=False, type=int, low=1, help="samples per process (per GPU) and step")),
    ("global_batch_size", dict(type=int, low=1, optional=True,
                               help="samples per optimizer step over all processes (sets --batch-size)")),
    ("grad_accum_steps", dict(identity=False, type=int, low=1, default=1,
                              help="batches whose gradients each optimizer step sums (default 1): a global batch "
                                   "of --batch-size x processes x this")),
    ("optimizer", dict(choices=("sgd", "adamw"))),
    ("lr", dict(type=float, above=0, help="peak learning rate at the reference global batch")),
    ("lr_reference_batch", dict(type=int, low=1, help="global batch that --lr is stated for (lr scales linearly)")),
    ("scaled_lr", dict(identity=False, type=float, command_line=False)),
    ("momentum", dict(type=float, low=0, below=1)),
    ("nesterov", dict(type=bool)),
    ("weight_decay", dict(type=float, low=0)),
    ("decay_norm_and_bias", dict(type=bool, help="apply weight decay to 1-D parameters (norms, biases) and ViT "
                                                 "embeddings too")),
    ("schedule", dict(choices=("step", "cosine"))),
    ("milestones", dict(type=epoch_list, help="step schedule: epochs where the lr drops, e.g. 30,60,90")),
    ("lr_decay", dict(type=float, above=0, help="step schedule: factor at each milestone")),
    ("lr_warmup_epochs", dict(type=float, low=0)),
    ("warmup_lr", dict(type=float, low=0)),
    ("min_lr", dict(type=float, low=0, help="cosine schedule: final learning rate")),
)
LOSS_OPTIONS = _options(
    "loss", "loss",
    ("ce_weight", dict(type=float, low=0, help="alpha")),
    ("kd_weight", dict(type=float, low=0, help="beta: weight of the KD / DKD / DIST term")),
    ("temperature", dict(type=float, above=0)),
    ("standardize", dict(type=bool, help="logit standardization (KD and DKD)")),
    ("dkd_alpha", dict(type=float, low=0)),
    ("dkd_beta", dict(type=float, low=0)),
    ("warmup_epochs", dict(type=float, low=0, flag="--dkd-warmup-epochs", help="DKD: linear warm-up of its term")),
    ("dist_beta", dict(type=float, low=0)),
    ("dist_gamma", dict(type=float, low=0)),
    ("rank_weight", dict(type=float, low=0, help="gamma: weight of the Kendall ranking loss; 0 turns it off")),
    ("rank_k", dict(type=float, above=0, help="ranking loss: tanh steepness k")),
    ("rank_teacher_mode", dict(choices=TEACHER_MODES)),
    ("rank_topk", dict(type=int, low=2, help="ranking loss over the teacher's top-K classes only")),
    ("rank_precision", dict(choices=PRECISIONS, help="ranking loss: fast (hardware tanh on GPUs, gradients within "
                                                     "2e-3) or exact (full float32 math)")),
    ("rank_backend", dict(identity=False, choices=OP_BACKENDS)),
)
METHODS_HELP = ("the distillation loss, and with +rank the Kendall ranking loss on top at gamma = alpha (the CE "
                "weight; --rank-weight overrides it); ce: cross-entropy alone")


def task_options(task):
    """Every option of `task`: its own, then the shared ones, with --method offering the task's methods
    (task.methods, explained by task.methods_help) and --loss its own loss recipes (task_loss_recipes)."""
    recipes = task_loss_recipes(task)
    selection = (Option("loss", "selection", group="loss", help=f"a loss recipe: {', '.join(recipes)}"),
                 Option("method", "selection", group="loss", choices=task.methods, help=task.methods_help))
    return task.own_options + JOB_OPTIONS + SPEED_OPTIONS + MODEL_OPTIONS + OPTIM_OPTIONS + selection + LOSS_OPTIONS


def task_loss_recipes(task):
    """The rankkd.recipes loss recipes of `task`: those whose names start with one of task.loss_recipe_prefixes."""
    return tuple(name for name in LOSS_RECIPES if name.startswith(task.loss_recipe_prefixes))
# The options a demo's teacher run takes over from the run that needs it: where and how fast it runs.
TEACHER_RUN_INHERITS = ("device", "precision", "compile", "workers", "data_backend")

GROUP_TITLES = {"recipe": "recipe overrides (default: the recipe's value)",
                "loss": "loss (rankkd.distill.DistillConfig; default: the --loss recipe's value)"}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run is, resolved once: its task and recipes, and the parts that each task's subclass adds
    (config_type): the shared parts, the task's own, then loss."""
    task: str
    recipe: str
    loss_recipe: str | None


def task_sections(task):
    """The parts of `task`'s settings before loss: the shared ones, then those that its own options name."""
    own = (option.section for option in task.options if option.section not in (*SHARED_SECTIONS, "selection", "loss"))
    return SHARED_SECTIONS + tuple(dict.fromkeys(own))


def field_type(option):
    """The type of `option`'s field: its type, or what its converter returns; or None where it is optional."""
    kind = option.type
    if not isinstance(kind, type):
        kind = typing.get_type_hints(kind).get("return")
        if kind is None:
            raise TypeError(f"option {option.option}: its converter {option.type.__name__} declares no return type")
    return kind | None if option.optional else kind


@functools.cache
def config_type(task):
    """The RunConfig subclass of `task`: a part per section, each a frozen dataclass with a typed field per option."""
    parts = [(section, dataclasses.make_dataclass(
        f"{task.name.title()}{section.title()}",
        [(option.name, field_type(option)) for option in task.options if option.section == section], frozen=True))
        for section in task_sections(task)]
    return dataclasses.make_dataclass(f"{task.name.title()}Config", [*parts, ("loss", DistillConfig)],
                                      bases=(RunConfig,), frozen=True)


# ---------------------------------------------------------------------------------------------------------------------
# The command line.


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line: the usage, some fifty lines for a trainer, is --help's."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def make_parser(task):
    """The task's command line: its own options first, then the shared ones, grouped as --help shows them."""
    parser = OneLineParser(description=task.description)
    groups = {"run": parser}
    for option in task.options:
        if not option.command_line:
            continue
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(GROUP_TITLES.get(option.group, option.group))
        kwargs = dict(default=option.default, help=option.help or None, dest=option.name)
        if option.type is bool:  # off unless given: a plain switch; else --x / --no-x
            kwargs["action"] = "store_true" if option.default is False else argparse.BooleanOptionalAction
        else:
            kwargs.update(type=option.type if option.type is not str else None, choices=option.choices)
        groups[option.group].add_argument(option.option, **kwargs)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Resolution: recipe + command line + processes and device, checked, frozen.


def resolve_config(task, args, env, recipe_name=None):
    """The frozen RunConfig of `task` for the parsed `args` on `env` (a DistEnv). recipe_name overrides the task's
    choice of recipe (the demo teacher's own). Raises a ValueError naming the option on any bad setting."""
    recipe_name, recipe = task.recipe(args, recipe_name)
    given = {name: value for name, value in vars(args).items() if value is not None}
    values = {option.name: option.default for option in task.options} | recipe | given
    unset = [option.option for option in task.options if option.section not in ("selection", "loss")
             and option.command_line and not option.optional and values[option.name] is None]
    if unset:
        them = "it" if len(unset) == 1 else "them"
        raise ValueError(f"recipe {recipe_name!r} sets no {', '.join(unset)}: give {them} on the command line")
    values["loss_recipe"] = values["loss"] if isinstance(values.get("loss"), str) else None
    for option in task.options:
        option.check(values.get(option.name))
    loss_overrides = {name: given[name] for name in given if _section(task, name) == "loss"}
    method = task.split_method(given["method"]) if "method" in given else None
    values["loss"] = resolve_loss(values, loss_overrides, method, task_loss_recipes(task))
    if values["teacher"] == "none":
        values["teacher"] = None
    loss = values["loss"]
    if loss.uses_teacher and values["teacher"] is None:
        raise ValueError(f"method {loss.method!r} with rank_weight {loss.rank_weight} needs a --teacher (a plain "
                         "cross-entropy run: --teacher none --method ce)")
    resolve_for_device(values, env)
    task.check(values, env)
    values["out"] = run_folder_name(values, task, env)
    return freeze(task, recipe_name, values)


def _section(task, name):
    return next((option.section for option in task.options if option.name == name), None)


def split_method(method):
    """("kd", True) for "kd+rank": the base method and whether the ranking loss is on."""
    return method.removesuffix("+rank"), method.endswith("+rank")


def resolve_loss(values, overrides, method=None, known=tuple(LOSS_RECIPES)):
    """The recipe's loss (a name among `known`, a DistillConfig, or None: DistillConfig's defaults) with the command
    line's loss options on top, and `method` ((base method, ranking loss on) of --method; None: the recipe's). The
    options' own ranges were checked already; what is left are rules between them."""
    base = values.get("loss")
    if isinstance(base, str):
        if base not in known:
            raise ValueError(f"--loss {base!r} is not a loss recipe of this trainer; known: {', '.join(known)}")
        base = get_recipe(base)
    merged = dataclasses.asdict(base or DistillConfig()) | overrides
    if method is not None:
        merged["method"], with_rank = method
        if "rank_weight" not in overrides:
            merged["rank_weight"] = merged["ce_weight"] if with_rank else 0.0
    if merged["rank_weight"] > 0:
        try:
            check_steepness(merged["rank_k"])
        except ValueError:
            rule = K_RULE.replace("k (the tanh steepness)", "--rank-k")
            raise ValueError(f"{rule}, got {merged['rank_k']:g}") from None
    if merged["standardize"] and merged["method"] not in ("kd", "dkd"):
        raise ValueError(f"--standardize applies to --method kd and dkd, not {merged['method']!r}")
    return DistillConfig(**merged)


def resolve_for_device(values, env):
    """What the processes and the device decide: batch sizes, the scaled lr, precision and compile."""
    world_size = env.world_size
    accumulated = world_size * values["grad_accum_steps"]
    if values.get("global_batch_size") is not None:
        if values["global_batch_size"] % accumulated:
            raise ValueError(f"--global-batch-size {values['global_batch_size']} does not split evenly over "
                             f"{world_size} processes x --grad-accum-steps {values['grad_accum_steps']}")
        values["batch_size"] = values["global_batch_size"] // accumulated
    values["global_batch_size"] = values["batch_size"] * accumulated
    values["world_size"] = world_size
    values["scaled_lr"] = values["lr"] * values["global_batch_size"] / values["lr_reference_batch"]
    on_cuda = env.device.type == "cuda"
    if values["precision"] == "auto":
        values["precision"] = "bf16" if on_cuda else "off"
    if values["compile"] is None:
        values["compile"] = on_cuda
    if values["compile_mode"] == "reduce-overhead" and world_size > 1:
        # CUDA graphs and DDP's gradient hooks do not mix: several processes compile without graphs.
        values["compile_mode"] = "default"


def run_folder_name(values, task, env):
    """--out, or runs/<data>-<student>-<method>[-rank]-<date-time>[-N] (-2, -3, ... where that folder exists). With
    --resume auto, the newest such folder whose run has these experiment settings (a run with another seed or loss is
    another run, never adopted). Decided on rank 0 and broadcast, so that every process agrees on one name."""
    if values["out"] is not None:
        return values["out"]
    data = values["data"]
    data_name = data if data in ("demo", "synthetic") else Path(data).name
    loss = values["loss"]
    prefix = f"runs/{data_name}-{values['student']}-{loss.method}{'-rank' if loss.rank_weight else ''}"
    earlier = sorted(Path().glob(f"{prefix}-*/config.json")) if values["resume"] else []
    requested = settings_of_values(task, values)
    same = [path.parent for path in earlier if _same_experiment(task, path, requested)]
    if same:
        return broadcast_object(str(same[-1]))
    # A run started within the second of another (a refused folder, a quick rerun) gets a suffix: never its folder.
    stamped = out = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in itertools.count(2):
        if not Path(out).exists():
            break
        out = f"{stamped}-{suffix}"
    out = broadcast_object(out)
    if earlier and env.is_main:
        print(f"no run under runs/ has these settings (the newest like it: {earlier[-1].parent}): starting a new run "
              f"in {out}")
    return out


def _same_experiment(task, path, requested):
    """Whether the run folder whose config.json is `path` holds the experiment of the flat settings `requested`. A
    record that can't be read, or that holds none of these settings, is no match: the run starts anew instead of
    adopting that folder (an empty record would agree with every setting)."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    saved = flat_settings(saved) if isinstance(saved, dict) else {}
    return bool(saved.keys() & requested.keys()) and not changed_settings(task, saved, requested)


def settings_of_values(task, values):
    """The flat settings (as flat_settings gives them) of resolved values that are not frozen yet."""
    flat = {option.name: values[option.name] for option in task.options if option.section not in ("selection", "loss")}
    return json.loads(json.dumps(flat | dataclasses.asdict(values["loss"])))


def changed_settings(task, saved, requested):
    """The experiment settings (Option.identity: not the folder, device, speed or length) that differ between two
    flat settings dicts, as "--option old -> new" texts. A setting one side lacks (a record from an older version)
    is not compared."""
    options = {option.name: option for option in task.options}
    changed = []
    for name, value in requested.items():
        option = options.get(name)
        if (option is None or option.identity) and name in saved and saved[name] != value:
            flag = option.option if option is not None else f"--{name.replace('_', '-')}"
            changed.append(f"{flag} {saved[name]} -> {value}")
    return changed


def freeze(task, recipe_name, values):
    config = config_type(task)
    parts = {part.name: part.type(**{option.name: values[option.name] for option in task.options
                                     if option.section == part.name})
             for part in dataclasses.fields(config) if part.name in task_sections(task)}
    return config(task=task.name, recipe=recipe_name, loss_recipe=values["loss_recipe"], loss=values["loss"], **parts)


# ---------------------------------------------------------------------------------------------------------------------
# The record of a run's settings.


def record(cfg):
    """The settings as plain JSON values, part by part: what config.json and every checkpoint hold."""
    head = {"task": cfg.task, "recipe": cfg.recipe, "loss_recipe": cfg.loss_recipe}
    parts = {part.name: dataclasses.asdict(getattr(cfg, part.name)) for part in dataclasses.fields(cfg)
             if part.name not in head}
    return head | {section: {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
                   for section, fields in parts.items()}


def flat_settings(saved):
    """A record() as one flat dict of option names to values, for comparing two runs' settings. Records of earlier
    versions read the same: their parts under the names of their day (the job's was "run"), or the flat dict that
    config.json held before the settings had parts."""
    flat = {}
    for key, value in saved.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


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
