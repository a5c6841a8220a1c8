"""The CIFAR-100 grid's cells: one train/cifar100.py run each, in OUT/<pair>/<method>/seed<N>/. A cell's settings are
its trainer command line, resolved and checked with the CIFAR-100 task's own code before any run starts; its folder
holds cell.json (what it runs), done.json or failed.json (the runner's markers) and the run's own files."""
import json
from dataclasses import dataclass
from pathlib import Path

from rankkd import models
from rankkd.distill import DistillConfig
from rankkd.recipes import CIFAR100_PAIRS
from rankkd.training.checkpoint import write_atomically
from rankkd.training.config import check_loss_fits, make_parser, resolve_config
from rankkd.data.cifar import load_cifar100
from rankkd.distributed import DistEnv
from rankkd.training.run_folder import read_metrics as read_metrics_file
from rankkd.tasks.cifar100 import TASK

BASE_METHODS = ("kd", "dkd", "dist")  # each also "<method>+rank": the same loss plus the ranking loss at gamma = alpha
DEFAULT_METHODS = ("kd", "kd+rank", "dkd", "dkd+rank")
# The demo's pairs: the digits have 10 classes, so mdistiller's CIFAR-100 teachers do not apply; both pairs share the
# CIFAR demo's teacher resnet14, trained once and cached (the task's demo recipe).
DEMO_PAIRS = {"demo_res14_res8": ("resnet14", "resnet8"), "demo_res14_wrn_16_1": ("resnet14", "wrn_16_1")}
# mdistiller's cifar_teachers.tar holds <teacher>_vanilla/ckpt_epoch_240.pth for every teacher of its pairs.
TEACHER_FILE = "{teacher}_vanilla/ckpt_epoch_240.pth"
# The trainer options that the runner sets for each cell; options after -- must leave them alone.
CELL_OPTIONS = ("data", "out", "resume", "seed", "device", "pair", "teacher", "student", "teacher_weights", "epochs",
                "method", "loss", "rank_weight", "rank_k", "rank_topk")


@dataclass(frozen=True)
class Cell:
    pair: str
    method: str  # a base method, or one with "+rank"
    seed: int
    rank_k: float | None = None  # set for +rank methods only
    rank_topk: int | None = None  # None: all classes

    @property
    def base(self):
        return self.method.removesuffix("+rank")

    @property
    def variant(self):
        """The method with its ranking-loss options, as the table names it: kd, kd+rank k=100 top-20."""
        if self.rank_k is None:
            return self.method
        k = repr(float(self.rank_k)).removesuffix(".0")  # exact: 10 and 10.0000001 are different cells
        return f"{self.method} k={k}" + (f" top-{self.rank_topk}" if self.rank_topk is not None else "")

    @property
    def folder(self):
        return Path(self.pair) / self.variant.replace("+", "-").replace(" ", "-").replace("=", "") / f"seed{self.seed}"

    def __str__(self):
        return f"{self.pair} {self.variant} seed {self.seed}"


def pair_models(pair):
    """(teacher, student) of a CIFAR-100 or demo pair."""
    return CIFAR100_PAIRS.get(pair) or DEMO_PAIRS[pair]


def grid_cells(args, pairs):
    ranked = [method for method in args.methods if method.endswith("+rank")]
    if (args.rank_k or args.rank_topk) and not ranked:
        raise ValueError("--rank-k and --rank-topk set the ranking loss of +rank methods, and --methods has none")
    ks, topks = args.rank_k or [DistillConfig.rank_k], args.rank_topk or [None]
    cells = []
    for pair in pairs:
        for method in args.methods:
            for seed in args.seeds:
                if method in ranked:
                    cells += [Cell(pair, method, seed, k, topk) for k in ks for topk in topks]
                else:
                    cells.append(Cell(pair, method, seed))
    return cells


def trainer_argv(cell, args):
    """The train/cifar100.py options of a cell's run (its command line without the interpreter and the script)."""
    argv = ["--data", args.data, "--out", str(args.out / cell.folder), "--resume", "auto", "--seed", str(cell.seed),
            "--method", cell.method, "--device", args.device]
    if cell.pair in DEMO_PAIRS:
        teacher, student = DEMO_PAIRS[cell.pair]
        argv += ["--teacher", teacher, "--student", student]
    else:
        argv += ["--pair", cell.pair]
        if args.teachers is not None:
            argv += ["--teacher-weights", str(teacher_file(args.teachers, CIFAR100_PAIRS[cell.pair][0]))]
    if cell.rank_k is not None:
        argv += ["--rank-k", repr(cell.rank_k)]
        argv += ["--rank-topk", str(cell.rank_topk)] if cell.rank_topk is not None else []
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    return argv + args.trainer_args


def teacher_file(teachers, teacher):
    return Path(teachers) / TEACHER_FILE.format(teacher=teacher)


# ----------------------------------------------------------------------------------------------------------------------
# Checks before any run starts: every cell's settings as the trainer resolves them, the data, every teacher file.


def check_trainer_args(trainer_args):
    """Returns whether the options after -- switch on logit standardization (then mdistiller's published numbers are
    not this table's baselines)."""
    parser = make_parser(TASK)
    parser.prog = "train/cifar100.py (the options after --)"
    try:
        given = vars(parser.parse_args(trainer_args))
    except SystemExit:  # argparse printed what it refused
        raise ValueError(f"train/cifar100.py refused the options after -- ({' '.join(trainer_args)}): see its "
                         "message above") from None
    defaults = vars(parser.parse_args([]))
    taken = ["--" + name.replace("_", "-") for name in CELL_OPTIONS if given[name] != defaults[name]]
    if taken:
        raise ValueError(f"the options after -- may not set {', '.join(taken)}: the runner sets them for each cell "
                         "(its own --data, --out, --seeds, --epochs, --device, --pairs, --teachers, --methods, "
                         "--rank-k, --rank-topk)")
    return bool(given["standardize"])


def check_grid(args, cells, device, check_files=True):
    """Each cell's settings (a RunConfig), resolved and checked as its run will on `device`, with the data and teacher
    files unless check_files is False. Raises ValueError naming what is wrong; nothing is written."""
    num_classes = 10 if args.data == "demo" else 100
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)  # every run is one process
    configs = {}
    for cell in cells:
        try:
            cfg = resolve_config(TASK, make_parser(TASK).parse_args(trainer_argv(cell, args)), env)
        except ValueError as error:
            raise ValueError(f"cell {cell}: {error}") from None
        check_loss_fits(cfg.loss, num_classes, device)
        configs[cell] = cfg
    if check_files and args.data not in ("demo", "synthetic"):
        load_cifar100(args.data)  # a missing or foreign file is named here, once, not in every cell's log
        check_teacher_files(args.teachers, {CIFAR100_PAIRS[cell.pair][0] for cell in cells}, num_classes)
    return configs


def check_teacher_files(teachers, names, num_classes):
    missing = [str(teacher_file(teachers, name)) for name in sorted(names)
               if not teacher_file(teachers, name).is_file()]
    if missing:
        raise ValueError(f"--teachers {teachers}: missing teacher checkpoint(s): {', '.join(missing)} "
                         "(mdistiller's cifar_teachers.tar from its GitHub release 'checkpoints' holds them all)")
    for name in sorted(names):
        models.load_teacher(name, teacher_file(teachers, name), num_classes, "cifar")  # the right weights, readable


def check_grid_record(out, grid):
    """A grid folder holds the runs of one data set and one set of trainer options, so that its table compares like
    with like: `grid` must match the grid.json of the runs already there (a new folder gets it)."""
    earlier = read_json(out / "grid.json")
    if earlier is None:
        write_json(out / "grid.json", grid)
        return
    for key, option in (("data", "--data"), ("trainer_args", "the options after --")):
        if earlier[key] != grid[key]:
            raise ValueError(f"--out {out} holds runs made with {option} {earlier[key]}, not {grid[key]}: "
                             "give the same, or another --out")


# ----------------------------------------------------------------------------------------------------------------------
# A cell's files, read by the scheduler and the table alike.


def read_metrics(folder):
    """A cell's epoch records so far, for progress and ETA: a cut-short last line is left out, and a file that can't
    be read counts as no epochs (the cell's end marks it failed, see Runner.finish)."""
    try:
        return read_metrics_file(Path(folder) / "metrics.jsonl")[0]
    except (OSError, ValueError):
        return []


def read_json(path):
    """The JSON in `path`; None when it is missing or unreadable (a marker the runner rewrites)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path, value):
    write_atomically(path, lambda file: file.write((json.dumps(value, indent=2) + "\n").encode()))
