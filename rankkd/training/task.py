"""The task contract: what a task states, only what differs between benchmarks. The trainer (rankkd.training.trainer)
does the rest, and knows nothing of the kind of data: images, detection or text are the tasks' business.

A task is a subclass of Task that defines every abstract member below (a class attribute does for a property).
Instantiating one that lacks a member fails at once, naming it (abc's TypeError), and Task.__init__ checks what the
members must agree on, so a task module that imports is a task the trainer can run. A subclass that defines __init__
calls super().__init__(). What the image tasks share (models from a zoo, channels_last, throughput in images) is
rankkd.tasks.images's.
"""
import abc
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch

from rankkd.training.config import METHOD_NAMES, METHODS_HELP, Option, config_type, split_method, task_options


class TrainLoader(Protocol):
    """What the epoch loop asks of a training loader: the batches of an epoch as (inputs, targets), as many on every
    rank, and the epoch before each pass (order and augmentation follow it)."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[object, object]]: ...


class BatchMixer(Protocol):
    """A transform of each training batch that draws per epoch: mixup, cutmix, label smoothing."""

    def set_epoch(self, epoch: int) -> None: ...

    def __call__(self, inputs: object, targets: object) -> tuple[object, object]: ...


@dataclass(frozen=True)
class TaskData:
    """A run's data, as make_data gives it.

    train: the training batches; val: what evaluate() reads (None: nothing to score against, as synthetic data);
    num_classes: the classes the models predict (a language model's vocabulary), which --rank-topk may not exceed;
    backend: what feeds `train` ("dali", "torchvision", "synthetic", ...), for the run's header line."""

    train: TrainLoader
    val: Iterable[tuple[object, object]] | None
    num_classes: int
    backend: str


class Task(abc.ABC):
    """A benchmark, as the trainer runs it. `options` (its own options, then the shared ones of
    rankkd.training.config, with --method and --loss offering what the task offers) is set by __init__."""

    options: tuple[Option, ...]
    # What --method offers (explained by methods_help), and the rankkd.recipes loss recipes that --loss offers: those
    # whose names start with one of loss_recipe_prefixes.
    methods: tuple[str, ...] = METHOD_NAMES
    methods_help: str = METHODS_HELP
    loss_recipe_prefixes: tuple[str, ...] = ()
    # Whether a larger primary_metric is the better one (False for a loss or a perplexity).
    greater_is_better: bool = True
    # The errors its data raises for a damaged input file, each with how to leave the file out: before training they
    # stop the run as a bad setting does (exit status 2), mid-epoch with what the run saved (exit status 1).
    data_errors: Mapping[type[Exception], str] = MappingProxyType({})

    def __init__(self):
        self.options = task_options(self)
        check_task(self)

    # -----------------------------------------------------------------------------------------------------------------
    # What the task is.

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Its name: its command is train/NAME.py (messages say NAME.py), and config.json's "task" holds it."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """One line: the first of --help."""

    @property
    @abc.abstractmethod
    def recipes(self) -> Mapping[str, Mapping[str, object]]:
        """Recipe name -> option values ("loss": a rankkd.recipes name or a DistillConfig). A demo whose teacher is
        trained on first use has a "demo-teacher" recipe, which trains it (rankkd.training.teacher_cache)."""

    @property
    @abc.abstractmethod
    def own_options(self) -> tuple[Option, ...]:
        """Its options beside the shared ones, among them "data" (section "data"): what the run's folder and header
        name. An option may fill a shared part or a part of the task's own (the image tasks' "augment")."""

    @property
    @abc.abstractmethod
    def primary_metric(self) -> str:
        """The evaluate() key that picks best.pt (see greater_is_better): summary_metrics' first student key."""

    @property
    @abc.abstractmethod
    def summary_metrics(self) -> tuple[tuple[str, str, str], ...]:
        """(label, student key, teacher key) of evaluate() per column of the summary table and the epoch line."""

    @property
    @abc.abstractmethod
    def unit(self) -> str:
        """What throughput counts, as a short word: "img" for images, "tok" for tokens. Progress shows UNIT/s and
        metrics.jsonl train_UNIT_s; batch_units() counts them."""

    # -----------------------------------------------------------------------------------------------------------------
    # Settings, data and models.

    @abc.abstractmethod
    def recipe(self, args, name: str | None = None) -> tuple[str, dict[str, object]]:
        """The recipe that the parsed command line `args` starts from (`name` if given: the demo teacher's), as (name,
        option values) adjusted to the command line (a pair picks the models and the loss)."""

    @abc.abstractmethod
    def check(self, values: dict[str, object], env) -> None:
        """Its own rules over the resolved values (paths, architectures, combinations), raising a ValueError that
        names the option. It may set what depends on the machine (loader workers)."""

    @abc.abstractmethod
    def make_data(self, cfg, env) -> TaskData:
        """The loaders of this rank (`env`, a rankkd.distributed.DistEnv) for the settings `cfg`."""

    def make_mixer(self, cfg, env, data: TaskData) -> BatchMixer | None:
        """What transforms each training batch (the teacher sees the same inputs as the student); None: nothing."""
        return None

    @abc.abstractmethod
    def build_student(self, cfg, num_classes: int) -> torch.nn.Module:
        """The student, freshly initialized (the run seeds every rank alike first)."""

    @abc.abstractmethod
    def load_teacher(self, cfg, weights: str, num_classes: int) -> torch.nn.Module:
        """The teacher with `weights` (a file, a named set of weights or "random"), frozen and in eval mode."""

    def runs_teacher(self, cfg) -> bool:
        """Whether the run loads a teacher model (a teacher's outputs read from disk need none)."""
        return cfg.model.teacher is not None

    def place_model(self, model: torch.nn.Module, cfg, device: torch.device) -> torch.nn.Module:
        """`model` on `device`, laid out as the task's batches are."""
        return model.to(device)

    # -----------------------------------------------------------------------------------------------------------------
    # Training and evaluation.

    @abc.abstractmethod
    def train_forward(self, student: torch.nn.Module, teacher: torch.nn.Module | None, cfg) -> torch.nn.Module:
        """The module that is trained: forward(inputs, targets, epoch) -> (outputs, terms), terms a dict of 0-dim loss
        tensors, "total" (what is minimized) among them; epoch a 0-dim device tensor counting epochs from 1. The
        trainer wraps it in DDP and compiles it (compile())."""

    @abc.abstractmethod
    def batch_units(self, inputs: object, targets: object) -> int | torch.Tensor:
        """How many units (see unit) a training batch of this rank holds: an int, or a 0-dim tensor on the device,
        which is read only at the next progress update (no host sync per step)."""

    def compile(self, module: torch.nn.Module, mode: str) -> torch.nn.Module:
        """How --compile applies to the training forward and to the models evaluated."""
        return torch.compile(module, mode=mode)

    @abc.abstractmethod
    def evaluate(self, student: torch.nn.Module, teacher: torch.nn.Module | None, loader, autocast, env,
                 cfg) -> dict[str, float | None]:
        """The validation metrics of one epoch over TaskData.val, the same on every rank: the keys of
        summary_metrics, and "val_tau" (the mean Kendall tau-b between student and teacher, None without a
        teacher) where the task measures it."""

    def split_method(self, method: str) -> tuple[str, bool]:
        """The base loss method and whether the ranking loss is on, for a --method name ("kd+rank": ("kd", True))."""
        return split_method(method)


def check_task(task: Task) -> None:
    """What the members of `task` must agree on; a TypeError names the task and what is wrong."""
    names = [option.name for option in task.options]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise TypeError(f"task {task.name!r} declares options twice: {', '.join(twice)}")
    if not any(option.name == "data" and option.section == "data" for option in task.own_options):
        raise TypeError(f"task {task.name!r} declares no option 'data' of section 'data' (the run's folder and "
                        "header name the data)")
    misplaced = [option.name for option in task.own_options
                 if option.section in ("task", "recipe", "loss_recipe", "loss") or not option.section.isidentifier()]
    if misplaced:
        raise TypeError(f"task {task.name!r}: options {', '.join(misplaced)} name a section that is not a part of "
                        "its own (not task, recipe, loss_recipe or loss: the loss is a DistillConfig)")
    if not task.summary_metrics or task.summary_metrics[0][1] != task.primary_metric:
        raise TypeError(f"task {task.name!r}: the first of summary_metrics must be the primary metric "
                        f"{task.primary_metric!r} (the best epoch is shown in its column)")
    config_type(task)  # every option has a type that its field can take
