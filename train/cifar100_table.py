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

The grid's parts are rankkd/training/grid: cells (the axes, each cell's trainer options, the checks before any
run), scheduler (GPU slots, processes, claims, done/failed markers) and report (the table).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing rankkd

import torch  # noqa: E402

from rankkd.distill import DistillConfig  # noqa: E402
from rankkd.recipes import CIFAR100_PAIRS  # noqa: E402
from rankkd.training.grid.cells import (BASE_METHODS, DEFAULT_METHODS, DEMO_PAIRS, check_grid, read_json,  # noqa: E402
                                        check_grid_record, check_trainer_args, grid_cells, trainer_argv)
from rankkd.training.grid.report import write_table  # noqa: E402
from rankkd.training.grid.scheduler import CELLS_PER_GPU, Runner, find_slots  # noqa: E402
from rankkd.training.run_folder import check_writable  # noqa: E402

TRAINER = Path(__file__).resolve().parent / "cifar100.py"


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
    return parser


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
    args.out = Path(args.out)
    return pairs


def check_and_plan(args):
    """Everything checked before any run starts, and --out claimed for this grid. Returns (cells, their resolved
    settings, where they run, what every cell of the grid shares)."""
    pairs = check_args(args)
    cells = grid_cells(args, pairs)
    placement = find_slots(args.device, args.parallel)
    standardize = check_trainer_args(args.trainer_args)
    configs = check_grid(args, cells, torch.device("cuda" if placement.slots[0] is not None else "cpu"))
    # What every cell of one table shares: its rows compare runs that differ only in the grid's axes.
    grid = {"data": args.data, "trainer_args": args.trainer_args,
            "published_baselines": args.data not in ("demo", "synthetic") and not standardize}
    check_writable(args.out, "--out")
    check_grid_record(args.out, grid)
    check_run_lengths(args.out, cells, {cell: configs[cell].run.epochs for cell in cells})
    return cells, configs, placement, grid


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
    failed (the others still ran), 0 when every cell finished. Returns the table's rows."""
    args = parse_args(argv)
    try:
        cells, configs, placement, grid = check_and_plan(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"cifar100_table.py: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    runner = Runner(args.out, {cell: [sys.executable, str(TRAINER), *trainer_argv(cell, args)] for cell in cells},
                    {cell: configs[cell].run.epochs for cell in cells}, placement,
                    on_cell_done=lambda progress: write_table(args.out, grid, progress))
    axes = f"{len({cell.pair for cell in cells})} pair(s) x {len(args.methods)} method(s) x {len(args.seeds)} seed(s)"
    runner.say(f"grid: {len(cells)} cells ({axes}{' x rank options' if args.rank_k or args.rank_topk else ''}) on "
               f"{placement.describe()}, {placement.threads} CPU thread(s) per run | out {args.out}")
    if placement.rank == 0:
        write_table(args.out, grid, runner.progress())
    failed = runner.run()
    rows, text = write_table(args.out, grid, runner.progress())
    if placement.rank == 0:
        print(f"\n{args.out / 'table.md'}:\n\n{text}")
    if failed:
        runner.say(f"{len(failed)} cell(s) failed: {'; '.join(str(cell) for cell in failed)}. Their train.log says "
                   "why; the same command retries them.")
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
