"""The paper's CIFAR-100 table in one command: a grid of (pair x method x seed) runs of train/cifar100.py, resumable,
with the results gathered into a table after every finished run.

    python train/cifar100_table.py              # the demo: two small pairs on the embedded digits, 4 methods
    python train/cifar100_table.py --data /data/cifar-100-python --teachers cifar_teachers --out runs/cifar100-table
    python train/cifar100_table.py ... --pairs res32x4_res8x4,vgg13_vgg8 --methods kd,kd+rank --seeds 0,1,2
    python train/cifar100_table.py ... --methods kd+rank --rank-k 1,10,100    # the ranking loss's k as an axis
    python train/cifar100_table.py ... -- --rank-precision exact             # after --: options of every run
    torchrun --nproc_per_node 8 train/cifar100_table.py ...                  # one GPU per process, cells shared
    python train/cifar100_table.py ... --launcher slurm --partition gpu --max-jobs 16   # one SLURM job per cell
    python train/cifar100_table.py ... --progress                            # each cell's state, and the table

Each cell is one train/cifar100.py run in its own process, in OUT/<pair>/<method>/seed<N>/ (its train.log, metrics,
checkpoints). --parallel N runs N cells at once on each GPU. Cells are claimed through a lock file, so the processes
of a torchrun launch (or two runners on one --out) share the grid without running a cell twice. Stopping the runner
stops its runs; the same command again skips the finished cells and continues the interrupted ones from their last
checkpoint (--resume auto), losing at most the epoch in progress. After every finished cell, table.md, results.csv
and table.png (with matplotlib installed) in OUT are rewritten from the finished cells' metrics.jsonl.

--launcher local runs each cell as a submitit job on this machine, --launcher slurm submits the cells as one SLURM job
array and exits: the jobs write the table, a preempted or timed-out job requeues itself and continues its run from
its checkpoint, and the same command again shows where the grid is and resubmits the cells whose jobs failed or were
lost. The cell folders hold the grid's state, so any launcher can take a grid over from another.

The grid's parts are rankkd/training/grid: cells (the axes, each cell's trainer options, the checks before any
run), scheduler (GPU slots, processes, claims, done/failed markers), launchers (cells as submitit jobs, their states)
and report (the table).
"""
import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

import torch  # noqa: E402

from rankkd.distill import DistillConfig  # noqa: E402
from rankkd.recipes import CIFAR100_PAIRS  # noqa: E402
from rankkd.training.config import OneLineParser  # noqa: E402
from rankkd.grid import launchers  # noqa: E402
from rankkd.grid.cells import (BASE_METHODS, DEFAULT_METHODS, DEMO_PAIRS, check_grid, read_json,  # noqa: E402
                                        check_grid_record, check_trainer_args, grid_cells, trainer_argv)
from rankkd.grid.report import write_table  # noqa: E402
from rankkd.grid.scheduler import CELLS_PER_GPU, Runner, find_slots, is_done, progress_line  # noqa: E402
from rankkd.training.run_folder import check_writable  # noqa: E402

TRAINER = Path(__file__).resolve().parent / "cifar100.py"
SLURM_MINUTES = 240  # a job's time limit: a 240-epoch cell takes far less on one GPU, and a longer one requeues
LOCAL_MINUTES = 7 * 24 * 60  # local jobs have no queue time to share: in effect no limit
# The SlurmExecutor parameters that options of their own set.
SLURM_OPTIONS = {"partition": "--partition", "account": "--account", "time": "--time",
                 "gpus_per_node": "--gpus-per-cell", "constraint": "--constraint", "array_parallelism": "--max-jobs"}


def comma_list(kind, what):
    def parse(text):
        try:
            values = [kind(item.strip()) for item in text.split(",") if item.strip()]
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
    parser = OneLineParser(description=__doc__.split("\n\n")[0],
                           usage="%(prog)s [options] [-- options of every train/cifar100.py run]")
    add = parser.add_argument
    add("--data", default="demo", help="the cifar-100-python folder (or its parent, or the .tar.gz), 'demo' (the "
                                       "embedded digits and two small pairs) or 'synthetic' (random images: timing)")
    add("--teachers", help="the folder of mdistiller's cifar_teachers (<teacher>_vanilla/ckpt_epoch_240.pth); needed "
                           "with a CIFAR-100 --data")
    add("--out", default="runs/cifar100-table", help="the grid's folder: one folder per cell, table.md, results.csv, "
                                                     "table.png (default runs/cifar100-table)")
    add("--pairs", type=comma_list(str, "pair names"),
        help=f"pairs by mdistiller's config stem, default all: {', '.join(CIFAR100_PAIRS)} (demo: "
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
    add("--launcher", default="here", choices=["here", "local", "slurm"],
        help="here: the cells as processes of this runner (default); local: as submitit jobs on this machine; "
             "slurm: as one SLURM job array, submitted, then this runner exits (needs submitit)")
    add("--progress", action="store_true",
        help="print each cell's state, epochs and the training time it still needs, and the table so far; run and "
             "submit nothing")
    add("--time", type=float, help="--launcher local and slurm: minutes a job may run before it is stopped and "
                                   "requeued, its run continuing from its checkpoint (default: slurm "
                                   f"{SLURM_MINUTES}, local {LOCAL_MINUTES})")
    slurm = parser.add_argument_group("--launcher slurm: one job per cell (through submitit's SlurmExecutor)")
    slurm.add_argument("--partition", help="the partition of the jobs")
    slurm.add_argument("--account", help="the account the jobs are charged to")
    slurm.add_argument("--gpus-per-cell", type=int, help="GPUs of each job (default 1; 0 with --device cpu)")
    slurm.add_argument("--constraint", help="node features the jobs need, e.g. h100")
    slurm.add_argument("--max-jobs", type=int, help="cells running at once (the job array's limit; default all)")
    slurm.add_argument("--slurm", type=slurm_parameter, action="append", default=[], metavar="KEY=VALUE",
                       help="any other parameter of submitit's SlurmExecutor, VALUE as JSON when it is JSON, e.g. "
                            "cpus_per_task=8, mem=64G, qos=high, 'setup=[\"module load cuda\"]' (repeatable)")
    return parser


def slurm_parameter(text):
    try:
        return launchers.parse_parameter(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}") from None


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = make_parser().parse_args(argv[:split])
    args.trainer_args = argv[split + 1:]
    return args


def check_args(args):
    if args.data in ("demo", "synthetic"):
        if args.teachers is not None:
            raise ValueError(f"--teachers goes with CIFAR-100 data, not --data {args.data}: the demo trains its own "
                             "teacher (the digits have 10 classes), synthetic runs use untrained ones")
        pairs = args.pairs or list(DEMO_PAIRS if args.data == "demo" else CIFAR100_PAIRS)
    else:
        if not Path(args.data).exists():
            raise ValueError(f"--data {args.data!r}: no such file or folder")
        if args.teachers is None:
            raise ValueError("--teachers is needed with CIFAR-100 data: the folder of mdistiller's cifar_teachers "
                             "(<teacher>_vanilla/ckpt_epoch_240.pth)")
        if not Path(args.teachers).is_dir():
            raise ValueError(f"--teachers {args.teachers!r} is not a folder")
        args.data = str(Path(args.data).resolve())  # the same data whatever folder the runner is started from
        pairs = args.pairs or list(CIFAR100_PAIRS)
    known = DEMO_PAIRS if args.data == "demo" else CIFAR100_PAIRS
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
    check_launcher_args(args)
    args.out = Path(args.out)
    return pairs


def check_launcher_args(args):
    slurm_only = [option for option, value in (("--partition", args.partition), ("--account", args.account),
                                               ("--gpus-per-cell", args.gpus_per_cell),
                                               ("--constraint", args.constraint), ("--max-jobs", args.max_jobs),
                                               ("--slurm", args.slurm)) if value not in (None, [])]
    if args.launcher != "here" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError(f"--launcher {args.launcher} submits from one process: start it with python, not torchrun")
    if slurm_only and args.launcher != "slurm":
        raise ValueError(f"{', '.join(slurm_only)} set SLURM jobs: give --launcher slurm (not {args.launcher})")
    if args.launcher == "slurm" and args.parallel is not None:
        raise ValueError("--parallel applies to --launcher here and local: SLURM runs one cell per job (--max-jobs "
                         "caps how many at once)")
    if args.time is not None and args.launcher == "here":
        raise ValueError("--time is the time limit of a job: give --launcher local or slurm")
    if args.time is not None and not args.time > 0:
        raise ValueError(f"--time must be > 0 minutes, got {args.time:g}")
    if args.max_jobs is not None and args.max_jobs < 1:
        raise ValueError(f"--max-jobs must be >= 1, got {args.max_jobs}")
    if args.gpus_per_cell is not None and args.gpus_per_cell < 0:
        raise ValueError(f"--gpus-per-cell must be >= 0, got {args.gpus_per_cell}")
    for key, _ in args.slurm:
        if key in SLURM_OPTIONS:
            raise ValueError(f"--slurm {key}=...: give {SLURM_OPTIONS[key]} instead")


def slurm_parameters(args, out):
    """submitit's SlurmExecutor parameters of the grid's jobs: one task, its GPUs, the options, --slurm's."""
    parameters = {"job_name": f"rankkd-{out.resolve().name}", "nodes": 1, "ntasks_per_node": 1,
                  "time": math.ceil(args.time or SLURM_MINUTES)}
    gpus = args.gpus_per_cell if args.gpus_per_cell is not None else int(args.device != "cpu")
    if gpus:
        parameters["gpus_per_node"] = gpus
    for name in ("partition", "account", "constraint"):
        if getattr(args, name) is not None:
            parameters[name] = getattr(args, name)
    if args.max_jobs is not None:
        parameters["array_parallelism"] = args.max_jobs
    return parameters | dict(args.slurm)


def check_and_plan(args):
    """Everything checked before any run starts or job is submitted, and --out claimed for this grid (--progress:
    the settings only, nothing written). Returns (cells, their resolved settings, where they run here (None for
    SLURM and --progress), what every cell of the grid shares, the SLURM executor (None without slurm))."""
    pairs = check_args(args)
    cells = grid_cells(args, pairs)
    placement = find_slots(args.device, args.parallel) if args.launcher != "slurm" and not args.progress else None
    standardize = check_trainer_args(args.trainer_args)
    # Checked for the devices that the runs will have: a SLURM job's GPU, not the login node's.
    on_gpu = placement.slots[0] is not None if placement is not None else args.device != "cpu"
    configs = check_grid(args, cells, torch.device("cuda" if on_gpu else "cpu"), check_files=not args.progress)
    # What every cell of one table shares: its rows compare runs that differ only in the grid's axes.
    grid = {"data": args.data, "trainer_args": args.trainer_args,
            "published_baselines": args.data not in ("demo", "synthetic") and not standardize}
    if args.progress:
        return cells, configs, None, grid, None
    executor = None
    if args.launcher == "slurm":
        executor = launchers.slurm_executor(args.out, slurm_parameters(args, args.out))
    elif args.launcher == "local":
        launchers.import_submitit()
    check_writable(args.out, "--out")
    check_grid_record(args.out, grid)
    check_run_lengths(args.out, cells, {cell: configs[cell].job.epochs for cell in cells})
    return cells, configs, placement, grid, executor


def check_run_lengths(out, cells, epochs):
    """The table shows the run length asked for: a grid whose cells finished longer runs is not shown as shorter."""
    longer = [f"{cell} ({done['epochs']} epochs)" for cell in cells
              if (done := read_json(out / cell.folder / "done.json")) is not None and done["epochs"] > epochs[cell]]
    if longer:
        raise ValueError(f"--out {out} holds cells that finished longer runs than --epochs {epochs[cells[0]]}: "
                         f"{', '.join(longer[:3])}{' ...' if len(longer) > 3 else ''}; give --epochs "
                         "at least that, or another --out")


def main(argv=None):
    """Run the grid of `argv` (default: the command line). Exits 2 on bad settings (nothing run), 1 when a cell
    failed (the others still ran), 0 when every cell finished; with --launcher slurm, once the cells that need a job
    are submitted, and with --progress once the report is printed. Returns the table's rows (so far)."""
    args = parse_args(argv)
    try:
        cells, configs, placement, grid, executor = check_and_plan(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"cifar100_table.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    commands = {cell: [sys.executable, str(TRAINER), *trainer_argv(cell, args)] for cell in cells}
    epochs = {cell: configs[cell].job.epochs for cell in cells}
    if args.progress:
        return launchers.print_progress(args.out, epochs, grid)
    axes = f"{len({cell.pair for cell in cells})} pair(s) x {len(args.methods)} method(s) x {len(args.seeds)} seed(s)"
    axes = f"{len(cells)} cells ({axes}{' x rank options' if args.rank_k or args.rank_topk else ''})"
    if args.launcher == "slurm":
        return submit_to_slurm(args, executor, commands, epochs, grid, axes)
    if args.launcher == "local":
        runner = launchers.LocalRunner(args.out, commands, epochs, grid, placement, args.time or LOCAL_MINUTES)
        runner.say(f"grid: {axes} as local jobs on {placement.describe()}, {placement.threads} CPU thread(s) per run "
                   f"| out {args.out}")
        write_table(args.out, grid, progress_line(args.out, epochs))
    else:
        runner = Runner(args.out, commands, epochs, placement,
                        on_cell_done=lambda progress: write_table(args.out, grid, progress))
        runner.say(f"grid: {axes} on {placement.describe()}, {placement.threads} CPU thread(s) per run | out "
                   f"{args.out}")
        if placement.rank == 0:
            write_table(args.out, grid, runner.progress())
    failed = runner.run()
    rows, text = write_table(args.out, grid, progress_line(args.out, epochs))
    if placement.rank == 0:
        print(f"\n{args.out / 'table.md'}:\n\n{text}")
    if failed:
        runner.say(f"{len(failed)} cell(s) failed: {'; '.join(str(cell) for cell in failed)}. Their train.log says "
                   "why; the same command retries them.")
        sys.exit(1)
    return rows


def submit_to_slurm(args, executor, commands, epochs, grid, axes):
    """Submit the cells that need a job and exit: the jobs write the table. Returns the table's rows so far."""
    print(f"grid: {axes} as SLURM jobs | out {args.out}", flush=True)
    submitted = launchers.submit_slurm(executor, args.out, commands, epochs, grid)
    rows, text = write_table(args.out, grid, progress_line(args.out, epochs))
    if not submitted:
        done = all(is_done(args.out / cell.folder, cell_epochs) for cell, cell_epochs in epochs.items())
        print(f"\n{args.out / 'table.md'}:\n\n{text}" if done else
              "no cell needs a job: the others are queued or running", flush=True)
        return rows
    print(f"the jobs write {args.out / 'table.md'} as their cells finish; the same command with --progress shows where "
          "the grid is, and without it resubmits the cells whose jobs failed or were lost", flush=True)
    return rows


if __name__ == "__main__":
    main()
