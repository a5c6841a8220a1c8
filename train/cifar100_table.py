"""The paper's CIFAR-100 table in one command: a grid of (pair x method x seed) runs of train/cifar100.py, resumable,
with the results gathered into a table after every finished run.

    python train/cifar100_table.py              # the demo: two small pairs on the embedded digits, 4 methods
    python train/cifar100_table.py --data /data/cifar-100-python --teachers cifar_teachers --out runs/cifar100-table
    python train/cifar100_table.py ... --pairs res32x4_res8x4,vgg13_vgg8 --methods kd,kd+rank --seeds 0,1,2
    python train/cifar100_table.py ... --methods kd+rank --rank-k 1,10,100    # the ranking loss's k as an axis
    python train/cifar100_table.py ... -- --rank-precision exact             # after --: options of every run
    torchrun --nproc_per_node 8 train/cifar100_table.py ...                  # one GPU per process, cells shared

Each cell is one train/cifar100.py run in its own process, in OUT/<pair>/<method>/seed<N>/ (its train.log, metrics,
checkpoints). --parallel N runs N cells at once on each GPU. Cells are claimed through a lock file, so the processes
of a torchrun launch (or two runners on one --out) share the grid without running a cell twice. Stopping the runner
stops its runs; the same command again skips the finished cells and continues the interrupted ones from their last
checkpoint (--resume auto), losing at most the epoch in progress. After every finished cell, table.md, results.csv
and table.png (with matplotlib installed) in OUT are rewritten from the finished cells' metrics.jsonl.
"""
import argparse
import csv
import ctypes
import importlib.util
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TRAIN_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(TRAIN_DIR))  # the trainer, train/cifar100.py, is imported for its pairs and settings checks
sys.path.insert(0, str(TRAIN_DIR.parent))  # run from a source checkout without installing rankkd

import torch  # noqa: E402

import cifar100 as trainer  # noqa: E402
from rankkd.distill import CIFAR100_PUBLISHED_TOP1, DistillConfig  # noqa: E402
from rankkd.models import cifar  # noqa: E402
from rankkd.training.config import check_loss_fits  # noqa: E402
from rankkd.training.data.cifar import load_cifar100  # noqa: E402
from rankkd.training.utils import (FolderInUseError, RunLock, check_writable, format_duration,  # noqa: E402
                                   write_atomically)

# ----------------------------------------------------------------------------------------------------------------------
# The grid's axes and defaults.

BASE_METHODS = ("kd", "dkd", "dist")  # each also "<method>+rank": the same loss plus the ranking loss at gamma = alpha
DEFAULT_METHODS = ("kd", "kd+rank", "dkd", "dkd+rank")
# The demo's pairs: the digits have 10 classes, so mdistiller's CIFAR-100 teachers do not apply; both pairs share the
# CIFAR demo's teacher resnet14, trained once and cached (train/cifar100.py's demo recipe).
DEMO_PAIRS = {"demo_res14_res8": ("resnet14", "resnet8"), "demo_res14_wrn_16_1": ("resnet14", "wrn_16_1")}
# mdistiller's cifar_teachers.tar holds <teacher>_vanilla/ckpt_epoch_240.pth for every teacher of its pairs.
TEACHER_FILE = "{teacher}_vanilla/ckpt_epoch_240.pth"
CELLS_PER_GPU = 4  # --parallel's default on a GPU: one batch-64 run of these small models leaves most of it idle
POLL_S = 1.0  # how often the runner looks at its runs
STATUS_EVERY_S = 300.0  # a status line with every running cell's epoch and the ETA

# ----------------------------------------------------------------------------------------------------------------------
# Command line.


def comma_list(kind, what):
    def parse(text):
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of {what}, got {text!r}")
        return values
    return parse


def topk_value(text):
    if text == "all":
        return None
    if int(text) < 2:
        raise ValueError  # comma_list names the option's values
    return int(text)


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [options] [-- options of every train/cifar100.py run]")
    add = parser.add_argument
    add("--data", default="demo", help="the cifar-100-python folder (or its parent, or the .tar.gz), 'demo' (the "
                                       "embedded digits and two small pairs) or 'synthetic' (random images: timing)")
    add("--teachers", help="the folder of mdistiller's cifar_teachers (<teacher>_vanilla/ckpt_epoch_240.pth); needed "
                           "with a CIFAR-100 --data")
    add("--out", default="runs/cifar100-table", help="the grid's folder: one folder per cell, table.md, results.csv, "
                                                     "table.png (default runs/cifar100-table)")
    add("--pairs", type=comma_list(str, "pair names"),
        help=f"pairs by mdistiller's config stem, default all: {', '.join(trainer.PAIRS)} (demo: "
             f"{', '.join(DEMO_PAIRS)})")
    add("--methods", type=comma_list(str, "methods"), default=list(DEFAULT_METHODS),
        help=f"{', '.join(BASE_METHODS)}, each also with +rank (default {','.join(DEFAULT_METHODS)})")
    add("--seeds", type=comma_list(int, "integer seeds"), default=[0], help="e.g. 0,1,2 (default 0)")
    add("--epochs", type=int, help="epochs of every run (default: the recipe's, 240; the demo's 10)")
    add("--rank-k", type=comma_list(float, "numbers"),
        help=f"+rank methods: one cell per tanh steepness k, e.g. 1,10,100 (default {DistillConfig.rank_k:g})")
    add("--rank-topk", type=comma_list(topk_value, "class counts >= 2 or 'all'"),
        help="+rank methods: one cell per channel count, the teacher's top-K classes, e.g. all,20 (default all)")
    add("--parallel", type=int, help=f"cells run at once on each GPU (default {CELLS_PER_GPU}; on the CPU 1)")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"], help="default: the GPUs when there are any")
    return parser


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = make_parser().parse_args(argv[:split])
    args.trainer_args = argv[split + 1:]
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Cells: one run of the grid each.


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
            "--method", cell.base, "--device", args.device]
    if cell.pair in DEMO_PAIRS:
        teacher, student = DEMO_PAIRS[cell.pair]
        argv += ["--teacher", teacher, "--student", student]
    else:
        argv += ["--pair", cell.pair]
        if args.teachers is not None:
            argv += ["--teacher-weights", str(teacher_file(args.teachers, trainer.PAIRS[cell.pair][0]))]
    if cell.rank_k is None:
        argv += ["--rank-weight", "0"]  # the base method alone: the recipe's rank weight is gamma = alpha
    else:
        argv += ["--rank-k", repr(cell.rank_k)]
        argv += ["--rank-topk", str(cell.rank_topk)] if cell.rank_topk is not None else []
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    return argv + args.trainer_args


def teacher_file(teachers, teacher):
    return Path(teachers) / TEACHER_FILE.format(teacher=teacher)


# ----------------------------------------------------------------------------------------------------------------------
# Checks before any run starts: every cell's settings as the trainer resolves them, the data, every teacher file.


# The trainer options that the runner sets for each cell; options after -- must leave them alone.
CELL_OPTIONS = ("data", "out", "resume", "seed", "device", "pair", "teacher", "student", "teacher_weights", "epochs",
                "method", "loss", "rank_weight", "rank_k", "rank_topk")


def check_trainer_args(args):
    """Returns whether the options after -- switch on logit standardization (then mdistiller's published numbers are
    not this table's baselines)."""
    parser = trainer.make_parser()
    parser.prog = "train/cifar100.py (the options after --)"
    try:
        given = vars(parser.parse_args(args.trainer_args))
    except SystemExit:  # argparse printed what it refused
        raise ValueError(f"train/cifar100.py refused the options after -- ({' '.join(args.trainer_args)}): see its "
                         "message above") from None
    defaults = vars(parser.parse_args([]))
    taken = ["--" + name.replace("_", "-") for name in CELL_OPTIONS if given[name] != defaults[name]]
    if taken:
        raise ValueError(f"the options after -- may not set {', '.join(taken)}: the runner sets them for each cell "
                         "(its own --data, --out, --seeds, --epochs, --device, --pairs, --teachers, --methods, "
                         "--rank-k, --rank-topk)")
    return bool(given["standardize"])


def check_grid(args, cells, device):
    """Each cell's resolved trainer settings (cfg), checked the trainer's way, with the data and teacher files.
    Raises ValueError naming what is wrong; nothing is written."""
    num_classes = 10 if args.data == "demo" else 100
    configs = {}
    for cell in cells:
        try:
            cfg = trainer.make_config(trainer.make_parser().parse_args(trainer_argv(cell, args)))
        except ValueError as error:
            raise ValueError(f"cell {cell}: {error}") from None
        check_loss_fits(cfg.loss, num_classes, device)
        configs[cell] = cfg
    if args.data not in ("demo", "synthetic"):
        load_cifar100(args.data)  # a missing or foreign file is named here, once, not in every cell's log
        teachers = {trainer.PAIRS[cell.pair][0] for cell in cells}
        missing = [str(teacher_file(args.teachers, name)) for name in sorted(teachers)
                   if not teacher_file(args.teachers, name).is_file()]
        if missing:
            raise ValueError(f"--teachers {args.teachers}: missing teacher checkpoint(s): {', '.join(missing)} "
                             "(mdistiller's cifar_teachers.tar from its GitHub release 'checkpoints' holds them all)")
        for name in sorted(teachers):
            cifar.load_teacher(name, teacher_file(args.teachers, name), num_classes)  # the right weights, readable
    return configs


def check_args(args):
    if args.data in ("demo", "synthetic"):
        if args.teachers is not None:
            raise ValueError(f"--teachers goes with CIFAR-100 data, not --data {args.data}: the demo trains its own "
                             "teacher (the digits have 10 classes), synthetic runs use untrained ones")
        pairs = args.pairs or list(DEMO_PAIRS if args.data == "demo" else trainer.PAIRS)
    else:
        if not Path(args.data).exists():
            raise ValueError(f"--data {args.data!r}: no such file or folder")
        if args.teachers is None:
            raise ValueError("--teachers is needed with CIFAR-100 data: the folder of mdistiller's cifar_teachers "
                             "(<teacher>_vanilla/ckpt_epoch_240.pth)")
        if not Path(args.teachers).is_dir():
            raise ValueError(f"--teachers {args.teachers!r} is not a folder")
        args.data = str(Path(args.data).resolve())  # the same data whatever folder the runner is started from
        pairs = args.pairs or list(trainer.PAIRS)
    known = DEMO_PAIRS if args.data == "demo" else trainer.PAIRS
    unknown = [pair for pair in pairs if pair not in known]
    if unknown:
        raise ValueError(f"--pairs: unknown {', '.join(unknown)} for --data {args.data}; known: {', '.join(known)}")
    methods = BASE_METHODS + tuple(f"{method}+rank" for method in BASE_METHODS)
    unknown = [method for method in args.methods if method not in methods]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(methods)}")
    for option, values in (("--pairs", pairs), ("--methods", args.methods), ("--seeds", args.seeds),
                           ("--rank-k", args.rank_k or []), ("--rank-topk", args.rank_topk or [])):
        if len(set(values)) != len(values):
            raise ValueError(f"{option} lists a value twice: {','.join(map(str, values))}")
    if min(args.seeds) < 0:
        raise ValueError(f"--seeds must be >= 0, got {','.join(map(str, args.seeds))}")
    if args.parallel is not None and args.parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {args.parallel}")
    if args.epochs is not None and args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    args.out = Path(args.out)
    return pairs


# ----------------------------------------------------------------------------------------------------------------------
# Where the runs go: this process's GPUs (or the CPU), and how many cells at once.


@dataclass
class Launch:
    rank: int  # among the processes of a torchrun launch (0 for plain python)
    world_size: int
    slots: list  # one entry per cell this process may run at once: a GPU id for CUDA_VISIBLE_DEVICES, or None (CPU)
    threads: int  # CPU threads per run (OpenMP, Inductor's compile workers): the machine's cores shared by its runs


def find_slots(args):
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpu_count = torch.cuda.device_count() if args.device != "cpu" else 0
    if args.device == "cuda" and gpu_count == 0:
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    if gpu_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",")[:gpu_count] if visible else [str(index) for index in range(gpu_count)]
        if world_size > 1:  # torchrun: one GPU per process, as for the trainer
            if local_rank >= len(ids):
                raise ValueError(f"process {rank} (local rank {local_rank}) has no GPU: {len(ids)} visible")
            ids = [ids[local_rank]]
        slots = [gpu for gpu in ids for _ in range(args.parallel or CELLS_PER_GPU)]
    else:
        slots = [None] * (args.parallel or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Launch(rank, world_size, slots, max(1, cores // (len(slots) * local_world_size)))


# torchrun's variables: a run must not take itself for one process of the runner's launch.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_environment(slot, launch):
    """The environment of a run in `slot`: the runner's, without torchrun's variables, on its GPU, with its share
    of the CPU (torchrun's own OMP_NUM_THREADS=1 replaced)."""
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("TORCHELASTIC_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(launch.threads),
               TORCHINDUCTOR_COMPILE_THREADS=str(launch.threads))
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    return env


def end_with(runner_pid):
    """What a run's process does before it starts: die with the runner, even a SIGKILLed one, instead of running on
    unwatched and holding the cell's folder (Linux: PR_SET_PDEATHSIG, checked against a runner already gone)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arrange():
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != runner_pid:
            os._exit(1)
    return arrange


# ----------------------------------------------------------------------------------------------------------------------
# A cell's state on disk: cell.json (what it runs), done.json (finished), failed.json (its last run failed), and the
# trainer's own files (train.log, metrics.jsonl, last.pt, ...).


def read_metrics(folder):
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def write_json(path, value):
    write_atomically(path, lambda file: file.write((json.dumps(value, indent=2) + "\n").encode()))


def is_done(folder, epochs):
    done = read_json(Path(folder) / "done.json")
    return done is not None and done["epochs"] >= epochs


def failed_since(folder, start):
    """The failure record of the cell's run when one failed after `start` (this launch): not retried until the
    runner is started again."""
    failed = read_json(Path(folder) / "failed.json")
    return failed if failed is not None and failed["time"] >= start else None


def last_log_line(path):
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


# ----------------------------------------------------------------------------------------------------------------------
# The table: every finished cell under --out, grouped by pair and method over seeds.

CSV_COLUMNS = ("pair", "teacher", "student", "method", "rank_k", "rank_topk", "seeds", "epochs",
               "top1_best_mean", "top1_best_std", "top1_last_mean", "top1_last_std", "tau_mean", "teacher_top1",
               "time_per_run_s", "published_top1", "rank_gain_best", "rank_gain_last")


def finished_cells(out):
    """(Cell, its metrics records) for every finished cell folder under `out`: the records up to the epochs it
    finished (a cell that a larger --epochs reopened counts as its finished run until it finishes again)."""
    cells = []
    for done in sorted(Path(out).glob("*/*/seed*/done.json")):
        epochs = read_json(done)["epochs"]
        records = [record for record in read_metrics(done.parent) if record["epoch"] <= epochs]
        description = read_json(done.parent / "cell.json")
        if records and description is not None:
            cells.append((Cell(**description["cell"]), records))
    return cells


def table_rows(out, published_baselines):
    """One row per (pair, method with its ranking options): the CSV_COLUMNS, numbers as floats (None when absent)."""
    groups = {}  # runs of different lengths (a short trial, then the full grid) are different rows
    for cell, records in finished_cells(out):
        key = (cell.pair, cell.method, cell.rank_k, cell.rank_topk, records[-1]["epoch"])
        groups.setdefault(key, []).append(records)
    pair_order = {pair: index for index, pair in enumerate([*trainer.PAIRS, *DEMO_PAIRS])}
    method_order = {method: index for index, method in enumerate(
        [f"{base}{suffix}" for base in BASE_METHODS for suffix in ("", "+rank")])}
    keys = sorted(groups, key=lambda key: (pair_order.get(key[0], len(pair_order)), key[0], method_order[key[1]],
                                           key[2] or 0.0, key[3] or 0, key[4]))
    rows = []
    for key in keys:
        pair, method, rank_k, rank_topk, epochs = key
        runs = groups[key]
        best = [max(record["val_top1"] for record in records) for records in runs]
        last = [records[-1]["val_top1"] for records in runs]
        taus = [records[-1]["val_tau"] for records in runs if records[-1].get("val_tau") is not None]
        teacher_top1 = [records[-1]["teacher_top1"] for records in runs
                        if records[-1].get("teacher_top1") is not None]
        teacher, student = trainer.PAIRS.get(pair) or DEMO_PAIRS[pair]
        base = method.removesuffix("+rank")
        rows.append({
            "pair": pair, "teacher": teacher, "student": student, "method": method, "rank_k": rank_k,
            "rank_topk": rank_topk, "seeds": len(runs), "epochs": epochs,
            "top1_best_mean": statistics.fmean(best), "top1_best_std": stdev(best),
            "top1_last_mean": statistics.fmean(last), "top1_last_std": stdev(last),
            "tau_mean": statistics.fmean(taus) if taus else None,
            "teacher_top1": statistics.fmean(teacher_top1) if teacher_top1 else None,
            "time_per_run_s": statistics.fmean(sum(record["epoch_time_s"] for record in records) for records in runs),
            "published_top1": CIFAR100_PUBLISHED_TOP1.get(pair, {}).get(method) if published_baselines else None,
            "rank_gain_best": None, "rank_gain_last": None,
        })
        if method != base:
            baseline = next((row for row in rows
                             if row["pair"] == pair and row["method"] == base and row["epochs"] == epochs), None)
            if baseline is not None:
                rows[-1]["rank_gain_best"] = rows[-1]["top1_best_mean"] - baseline["top1_best_mean"]
                rows[-1]["rank_gain_last"] = rows[-1]["top1_last_mean"] - baseline["top1_last_mean"]
    return rows


def variant(row):
    """A table row's method with its ranking-loss options, as Cell.variant names them."""
    return Cell(row["pair"], row["method"], 0, row["rank_k"], row["rank_topk"]).variant


def stdev(values):
    """The sample standard deviation, None for a single value."""
    return statistics.stdev(values) if len(values) > 1 else None


def mean_std(mean, std):
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def markdown_table(rows, grid, progress, chart_note=""):
    options = f" Options of every run: {' '.join(grid['trainer_args'])}." if grid["trainer_args"] else ""
    lines = [
        "# Logit distillation with and without the Kendall ranking loss", "",
        f"Data: {grid['data']}.{options} {progress}. Written {time.strftime('%Y-%m-%d %H:%M:%S')}.{chart_note}", "",
        "Top-1 (%) on the validation set, mean ± standard deviation over the finished seeds: *best* is each run's "
        "best epoch, *last* its final epoch. τ: mean Kendall τ-b between student and teacher logits (final epoch). "
        "Time: training and evaluation per run. Published: mdistiller's README (240 epochs, no ranking loss). "
        "+rank gain: the row's mean top-1 minus its base method's, same pair (best / last).", "",
        "| pair | teacher → student | method | seeds | epochs | top-1 best | top-1 last | τ | teacher top-1 "
        "| time per run | published | +rank gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        columns = [row["pair"], f"{row['teacher']} → {row['student']}", variant(row), str(row["seeds"]),
                   str(row["epochs"]),
                   mean_std(row["top1_best_mean"], row["top1_best_std"]),
                   mean_std(row["top1_last_mean"], row["top1_last_std"]),
                   "" if row["tau_mean"] is None else f"{row['tau_mean']:.3f}",
                   "" if row["teacher_top1"] is None else f"{row['teacher_top1']:.2f}",
                   format_duration(row["time_per_run_s"]),
                   "" if row["published_top1"] is None else f"{row['published_top1']:.2f}",
                   "" if row["rank_gain_best"] is None
                   else f"{row['rank_gain_best']:+.2f} / {row['rank_gain_last']:+.2f}"]
        lines.append("| " + " | ".join(columns) + " |")
    if not rows:
        lines.append("| (no finished run yet) |" + " |" * 11)
    return "\n".join(lines) + "\n"


def csv_text(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def plot(rows, path, data):
    """A grouped bar chart of the best-epoch top-1 per pair (one bar per method, the std over seeds as error bars),
    with mdistiller's published KD and DKD numbers marked on their bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(row["pair"] for row in rows))
    several_lengths = len({row["epochs"] for row in rows}) > 1

    def label(row):
        return variant(row) + (f" ({row['epochs']} epochs)" if several_lengths else "")
    bar_labels = list(dict.fromkeys(label(row) for row in rows))
    width = 0.8 / len(bar_labels)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(pairs) * max(1, len(bar_labels) / 4)), 4.5))
    heights, labelled = [], False
    for index, bar_label in enumerate(bar_labels):
        xs, ys, errors, published = [], [], [], []
        for row in rows:
            if label(row) != bar_label:
                continue
            x = pairs.index(row["pair"]) - 0.4 + width * (index + 0.5)
            xs.append(x)
            ys.append(row["top1_best_mean"])
            errors.append(row["top1_best_std"] or 0.0)
            if row["published_top1"] is not None:
                published.append((x, row["published_top1"]))
        axes.bar(xs, ys, width, yerr=errors if any(errors) else None, capsize=2, label=bar_label)
        heights += ys + [value for _, value in published]
        if published:
            axes.scatter(*zip(*published), marker="_", s=200, color="black", zorder=3,
                         label=None if labelled else "published (mdistiller)")
            labelled = True
    low, high = min(heights), max(heights)
    axes.set_ylim(max(0.0, low - max(2.0, 0.3 * (high - low))), min(100.0, high + max(1.0, 0.1 * (high - low))))
    axes.set_xticks(range(len(pairs)), pairs, rotation=30, ha="right")
    axes.set_ylabel("top-1 (%), best epoch")
    data_name = "demo digits" if data == "demo" else Path(data).name
    axes.set_title(f"top-1, mean over seeds ({data_name})", fontsize="medium")
    axes.legend(fontsize="small", ncol=min(4, len(bar_labels) + 1), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    figure.tight_layout()
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=120))
    plt.close(figure)


def write_table(out, grid, progress):
    """Rewrite table.md, results.csv and table.png in `out` from its finished cells, under a lock so that the
    processes sharing the grid write one after another. Returns the rows and the table's text."""
    with RunLock(out, wait=True, what="the table of", name=".table.lock"):
        rows = table_rows(out, grid["published_baselines"])
        chart_note = ""
        if not matplotlib_installed():
            chart_note = " The chart table.png is skipped: matplotlib is not installed."
        elif rows:
            try:
                plot(rows, out / "table.png", grid["data"])
            except Exception as error:  # a chart is not worth the runs that a crash of the runner would stop
                chart_note = f" The chart table.png could not be drawn: {type(error).__name__}: {error}."
        if chart_note:
            (out / "table.png").unlink(missing_ok=True)  # an old chart would disagree with the table
        text = markdown_table(rows, grid, progress, chart_note)
        write_atomically(out / "table.md", lambda file: file.write(text.encode()))
        write_atomically(out / "results.csv", lambda file: file.write(csv_text(rows).encode()))
    return rows, text


def matplotlib_installed():
    return importlib.util.find_spec("matplotlib") is not None


# ----------------------------------------------------------------------------------------------------------------------
# The runner.


class Runner:
    """Runs the cells of the grid that no other process has claimed, len(launch.slots) at a time."""

    def __init__(self, args, cells, configs, launch, grid):
        self.args, self.cells, self.configs, self.launch, self.grid = args, cells, configs, launch, grid
        self.epochs = {cell: configs[cell].epochs for cell in cells}
        self.start = time.time()
        self.running = {}  # slot index -> (cell, process, claim, started at)
        self.last_status = time.monotonic()
        self.prefix = f"[process {launch.rank}] " if launch.world_size > 1 else ""

    def say(self, text):
        print(f"{self.prefix}{text}", flush=True)

    def folder(self, cell):
        return self.args.out / cell.folder

    def done(self, cell):
        return is_done(self.folder(cell), self.epochs[cell])

    def failed(self, cell):
        return failed_since(self.folder(cell), self.start)

    def progress(self):
        done = sum(self.done(cell) for cell in self.cells)
        return f"{done} of the {len(self.cells)} cells of this grid finished"

    def run(self):
        finished = [cell for cell in self.cells if self.done(cell)]
        if finished:
            self.say(f"{len(finished)} of {len(self.cells)} cells already finished: skipped")
        waiting_said = False
        while True:
            self.reap()
            self.fill_slots()
            if not self.running:
                left = [cell for cell in self.cells if not self.done(cell) and not self.failed(cell)]
                if not left:
                    break
                if not waiting_said:  # every cell left is claimed by another process of the launch
                    self.say(f"waiting for {len(left)} cell(s) that other processes run")
                    waiting_said = True
            if time.monotonic() - self.last_status >= STATUS_EVERY_S:
                self.status()
            time.sleep(POLL_S)
        return [cell for cell in self.cells if self.failed(cell)]

    def fill_slots(self):
        for slot_index, slot in enumerate(self.launch.slots):
            if slot_index in self.running:
                continue
            cell = self.claim_next()
            if cell is None:
                return
            self.start_cell(slot_index, slot, *cell)

    def claim_next(self):
        busy = {cell for cell, *_ in self.running.values()}
        for cell in self.cells:
            if cell in busy or self.done(cell) or self.failed(cell):
                continue
            try:
                claim = RunLock(self.folder(cell), what="grid cell", name=".claim").acquire()
            except FolderInUseError:
                continue  # another process runs it
            if self.done(cell) or self.failed(cell):  # it finished while we looked
                claim.release()
                continue
            return cell, claim
        return None

    def start_cell(self, slot_index, slot, cell, claim):
        folder = self.folder(cell)
        argv = [sys.executable, str(TRAIN_DIR / "cifar100.py"), *trainer_argv(cell, self.args)]
        write_json(folder / "cell.json", {"cell": asdict(cell), "command": argv})
        log = open(folder / "train.log", "a")
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=run_environment(slot, self.launch),
                                   preexec_fn=end_with(os.getpid()) if sys.platform == "linux" else None)
        log.close()  # the run holds its own descriptor
        self.running[slot_index] = (cell, process, claim, time.monotonic())
        where = f"GPU {slot}" if slot is not None else "CPU"
        epochs_done = len(read_metrics(folder))
        resumed = f", from epoch {epochs_done}" if epochs_done else ""
        self.say(f"start {cell} on {where}{resumed} (log: {folder / 'train.log'})")

    def reap(self):
        for slot_index, (cell, process, claim, started) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            del self.running[slot_index]
            folder = self.folder(cell)
            seconds = time.monotonic() - started
            records = read_metrics(folder)
            if code == 0 and (not records or records[-1]["epoch"] < self.epochs[cell]):
                code = "0, short of its epochs"  # cannot happen with train/cifar100.py as it is; never call it done
            if code == 0:
                write_json(folder / "done.json", {"epochs": records[-1]["epoch"], "time": time.time()})
                (folder / "failed.json").unlink(missing_ok=True)
                claim.release()
                last = records[-1]
                tau = f", tau {last['val_tau']:.3f}" if last.get("val_tau") is not None else ""
                self.say(f"done {cell}: top-1 {last['val_top1']:.2f} (best "
                         f"{max(record['val_top1'] for record in records):.2f}){tau}, {format_duration(seconds)} | "
                         f"{self.progress()}{self.eta()}")
                write_table(self.args.out, self.grid, self.progress())
            else:
                reason = last_log_line(folder / "train.log")
                write_json(folder / "failed.json", {"exit": code, "time": time.time(), "reason": reason})
                claim.release()
                self.say(f"FAILED {cell} (exit {code}): {reason} (log: {folder / 'train.log'})")

    def eta(self):
        """", ETA ..." from the epoch times seen so far: the epochs left in every unfinished cell of the grid, each at
        its own pace, else its pair's, else the mean."""
        paces, left = {}, []
        for cell in self.cells:
            records = read_metrics(self.folder(cell))
            if records:
                paces.setdefault(cell.pair, []).append(statistics.fmean(r["epoch_time_s"] for r in records))
            if not self.done(cell) and not self.failed(cell):
                left.append((cell, self.epochs[cell] - len(records),
                             statistics.fmean(r["epoch_time_s"] for r in records) if records else None))
        if not left:
            return ""
        if not paces:
            return ", ETA: after the first epoch"
        overall = statistics.fmean(pace for pair_paces in paces.values() for pace in pair_paces)
        seconds = [epochs * (pace or statistics.fmean(paces.get(cell.pair, [overall]))) for cell, epochs, pace in left]
        # The work shared out over every process's slots, but never less than the longest cell left.
        slots = len(self.launch.slots) * self.launch.world_size
        return f", ETA {format_duration(max(sum(seconds) / slots, max(seconds)))}"

    def status(self):
        self.last_status = time.monotonic()
        running = []
        for cell, *_ in self.running.values():
            records = read_metrics(self.folder(cell))
            running.append(f"{cell} epoch {len(records)}/{self.epochs[cell]}")
        self.say(f"status: {'; '.join(running) or 'no cell running here'} | {self.progress()}{self.eta()}")

    def stop(self):
        """End the runs of this process (each keeps its last checkpoint), release their claims."""
        for _, process, *_ in self.running.values():
            process.terminate()
        for cell, process, claim, _ in self.running.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            claim.release()
            self.say(f"stopped {cell}: {len(read_metrics(self.folder(cell)))} epoch(s) kept")
        self.running.clear()


def prepare(args):
    """Everything checked before any run starts. Returns (cells, their trainer settings, where they run)."""
    pairs = check_args(args)
    cells = grid_cells(args, pairs)
    launch = find_slots(args)
    standardize = check_trainer_args(args)
    configs = check_grid(args, cells, torch.device("cuda" if launch.slots[0] is not None else "cpu"))
    # What every cell of one table shares: its rows compare runs that differ only in the grid's axes.
    grid = {"data": args.data, "trainer_args": args.trainer_args,
            "published_baselines": args.data not in ("demo", "synthetic") and not standardize}
    check_writable(args.out, "--out")
    earlier = read_json(args.out / "grid.json")
    if earlier is not None:
        for key, option in (("data", "--data"), ("trainer_args", "the options after --")):
            if earlier[key] != grid[key]:
                raise ValueError(f"--out {args.out} holds runs made with {option} {earlier[key]}, not {grid[key]}: "
                                 "give the same, or another --out")
    else:
        write_json(args.out / "grid.json", grid)
    return cells, configs, launch, grid


def main(argv=None):
    """Run the grid of `argv` (default: the command line). Exits 2 on bad settings (nothing run), 1 when a cell
    failed (the others still ran), 0 when every cell finished. Returns the table's rows."""
    args = parse_args(argv)
    try:
        cells, configs, launch, grid = prepare(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"cifar100_table.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    runner = Runner(args, cells, configs, launch, grid)
    gpus = sorted(set(launch.slots), key=launch.slots.index)
    where = (f"GPU {','.join(gpus)}, {len(launch.slots) // len(gpus)} cell(s) each" if gpus != [None]
             else f"the CPU, {len(launch.slots)} cell(s) at once")
    axes = f"{len({cell.pair for cell in cells})} pair(s) x {len(args.methods)} method(s) x {len(args.seeds)} seed(s)"
    runner.say(f"grid: {len(cells)} cells ({axes}{' x rank options' if args.rank_k or args.rank_topk else ''}) on "
               f"{where}, {launch.threads} CPU thread(s) per run | out {args.out}")
    if launch.rank == 0:
        write_table(args.out, grid, runner.progress())
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # torchrun's stop: end the runs too
    try:
        failed = runner.run()
    except (KeyboardInterrupt, SystemExit) as stopped:
        runner.stop()
        runner.say("stopped: the same command continues the grid (finished cells are skipped)")
        sys.exit(130 if isinstance(stopped, KeyboardInterrupt) else stopped.code)
    rows, text = write_table(args.out, grid, runner.progress())
    if launch.rank == 0:
        print(f"\n{args.out / 'table.md'}:\n\n{text}")
    if failed:
        runner.say(f"{len(failed)} cell(s) failed: {'; '.join(str(cell) for cell in failed)}. Their train.log says "
                   "why; the same command retries them.")
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
