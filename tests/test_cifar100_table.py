"""The CIFAR-100 grid runner, train/cifar100_table.py, run as users run it: a grid on a generated CIFAR-format folder
with teachers in mdistiller's release layout, its table checked against the runs' own metrics.jsonl; a second
invocation that skips everything; a runner killed mid-cell and restarted; two torchrun processes sharing one grid;
the demo; bad settings refused before any run. Tiny data (128 train images) keeps each cell to seconds."""
import csv
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import lock_is_free, write_cifar100

from rankkd.models import build_model
from rankkd.recipes import CIFAR100_PUBLISHED_TOP1
from rankkd.training.config import flat_settings
from rankkd.grid import report, scheduler
from rankkd.grid.cells import Cell

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "train" / "cifar100_table.py"
PAIRS = {"res56_res20": "resnet56", "res110_res32": "resnet110"}  # the two smallest teachers of mdistiller's pairs
TINY_RUNS = ["--", "--batch-size", "32", "--log-every", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("data"), num_train=128, num_test=64)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Untrained teachers saved as mdistiller's cifar_teachers.tar holds them."""
    root = tmp_path_factory.mktemp("cifar_teachers")
    torch.manual_seed(0)
    for name in PAIRS.values():
        (root / f"{name}_vanilla").mkdir()
        torch.save({"model": build_model(name, 100, "cifar").state_dict(), "epoch": 240},
                   root / f"{name}_vanilla/ckpt_epoch_240.pth")
    return root


def run_grid(*args, cache=None, timeout=600):
    """The runner on the CPU (--device cpu: the same on a machine with GPUs)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"RANKKD_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, str(RUNNER), "--device", "cpu", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def read_csv(out):
    with open(out / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def number(text):
    return None if text == "" else float(text)


def expected_row(folders, epochs=None):
    """What the table must say of a group of runs, computed here from their metrics.jsonl (up to `epochs`)."""
    runs = [[record for record in metrics(folder) if epochs is None or record["epoch"] <= epochs]
            for folder in folders]
    best = [max(record["val_top1"] for record in records) for records in runs]
    last = [records[-1]["val_top1"] for records in runs]
    return {"seeds": len(runs), "epochs": runs[0][-1]["epoch"],
            "top1_best_mean": statistics.fmean(best), "top1_last_mean": statistics.fmean(last),
            "top1_best_std": statistics.stdev(best) if len(runs) > 1 else None,
            "top1_last_std": statistics.stdev(last) if len(runs) > 1 else None,
            "tau_mean": statistics.fmean(records[-1]["val_tau"] for records in runs),
            "teacher_top1": statistics.fmean(records[-1]["teacher_top1"] for records in runs),
            "time_per_run_s": statistics.fmean(sum(r["epoch_time_s"] for r in records) for records in runs)}


def check_row(row, expected):
    assert int(row["seeds"]) == expected["seeds"] and int(row["epochs"]) == expected["epochs"], row
    for key, value in expected.items():
        if key in ("seeds", "epochs"):
            continue
        assert (number(row[key]) is None) == (value is None), (key, row)
        if value is not None:
            assert number(row[key]) == pytest.approx(value, rel=1e-12, abs=1e-12), (key, row)


def test_grid_table_equals_the_runs_metrics_and_a_second_invocation_skips_every_cell(data, teachers, tmp_path):
    out = tmp_path / "table"
    result = run_grid("--data", data, "--teachers", teachers, "--out", out, "--pairs", ",".join(PAIRS),
                      "--methods", "kd,kd+rank", "--epochs", 1, *TINY_RUNS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("start ") == 4 and result.stdout.count("done ") == 4, result.stdout
    rows = read_csv(out)
    assert [(row["pair"], row["method"]) for row in rows] == [(pair, method) for pair in PAIRS
                                                               for method in ("kd", "kd+rank")]
    table = (out / "table.md").read_text()
    for row in rows:
        folder = out / row["pair"] / ("kd" if row["method"] == "kd" else "kd-rank-k1") / "seed0"
        expected = expected_row([folder])
        check_row(row, expected)
        config = flat_settings(json.loads((folder / "config.json").read_text()))
        assert config["rank_weight"] == (0.0 if row["method"] == "kd" else config["ce_weight"])
        assert config["epochs"] == 1
        assert config["teacher_weights"] == str(teachers / f"{PAIRS[row['pair']]}_vanilla/ckpt_epoch_240.pth")
        published = CIFAR100_PUBLISHED_TOP1[row["pair"]]["kd"] if row["method"] == "kd" else None
        assert number(row["published_top1"]) == published
        line = next(line for line in table.splitlines()
                    if line.startswith(f"| {row['pair']} |") and f"| {row['method']}" in line)
        assert f"| {expected['top1_best_mean']:.2f} | {expected['top1_last_mean']:.2f} |" in line, line
        assert f"| {expected['tau_mean']:.3f} |" in line, line
    for pair in PAIRS:
        base, ranked = (next(row for row in rows if row["pair"] == pair and row["method"] == method)
                        for method in ("kd", "kd+rank"))
        assert number(ranked["rank_gain_best"]) == pytest.approx(number(ranked["top1_best_mean"])
                                                                 - number(base["top1_best_mean"]), abs=1e-12)
        assert number(ranked["rank_gain_last"]) == pytest.approx(number(ranked["top1_last_mean"])
                                                                 - number(base["top1_last_mean"]), abs=1e-12)
        assert number(base["rank_gain_best"]) is None
    png = (out / "table.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    assert matplotlib.image.imread(out / "table.png").shape[2] in (3, 4)

    runs = sorted(out.glob("*/*/seed0"))
    before = {folder: ((folder / "metrics.jsonl").read_bytes(), (folder / "last.pt").stat().st_mtime_ns)
              for folder in runs}
    again = run_grid("--data", data, "--teachers", teachers, "--out", out, "--pairs", ",".join(PAIRS),
                     "--methods", "kd,kd+rank", "--epochs", 1, *TINY_RUNS)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 of 4 cells already finished: skipped" in again.stdout and "start " not in again.stdout, again.stdout
    assert before == {folder: ((folder / "metrics.jsonl").read_bytes(), (folder / "last.pt").stat().st_mtime_ns)
                      for folder in runs}
    assert read_csv(out) == rows


def test_seeds_and_rank_k_are_axes(data, teachers, tmp_path):
    out = tmp_path / "table"
    result = run_grid("--data", data, "--teachers", teachers, "--out", out, "--pairs", "res56_res20",
                      "--methods", "kd+rank", "--seeds", "0,1", "--rank-k", "1,100", "--epochs", 1, "--parallel", 2,
                      *TINY_RUNS)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [line.split()[0] for line in result.stdout.splitlines() if line.startswith(("start ", "done "))]
    assert events[:2] == ["start", "start"] and events.count("start") == 4, result.stdout  # two cells at once
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores shared out
    assert f"the CPU, 2 cell(s) at once, {threads} CPU thread(s) per run" in result.stdout, result.stdout
    rows = read_csv(out)
    assert [(row["method"], number(row["rank_k"])) for row in rows] == [("kd+rank", 1.0), ("kd+rank", 100.0)]
    for row in rows:
        folders = [out / "res56_res20" / f"kd-rank-k{number(row['rank_k']):g}" / f"seed{seed}" for seed in (0, 1)]
        check_row(row, expected_row(folders))
        for seed, folder in enumerate(folders):
            config = flat_settings(json.loads((folder / "config.json").read_text()))
            assert (config["rank_k"], config["seed"]) == (number(row["rank_k"]), seed)
    assert "kd+rank k=100 |" in (out / "table.md").read_text()


@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_stopped_runner_resumes_its_cell_from_the_last_checkpoint(data, teachers, tmp_path, signal_number):
    """Stop the runner mid-cell, SIGTERM (it stops its run) or SIGKILL (the run gets SIGTERM as its runner dies): no
    run lives on holding the folder, and the same command continues that cell from its checkpoint."""
    out = tmp_path / "table"
    args = ["--data", data, "--teachers", teachers, "--out", out, "--pairs", "res56_res20", "--methods", "kd",
            "--epochs", 3, *TINY_RUNS]
    runner = subprocess.Popen([sys.executable, str(RUNNER), "--device", "cpu", *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cell = out / "res56_res20" / "kd" / "seed0"
    deadline = time.monotonic() + 300
    while not (cell / "last.pt").exists():  # the first epoch's checkpoint
        assert runner.poll() is None and time.monotonic() < deadline, "the cell's first epoch never finished"
        time.sleep(0.05)
    runner.send_signal(signal_number)
    output = runner.communicate(timeout=120)[0]
    assert runner.returncode == -signal_number if signal_number == signal.SIGKILL else 128 + signal_number, output
    if signal_number == signal.SIGTERM:
        assert "stopped res56_res20 kd seed 0" in output and "the same command continues the grid" in output, output
    first_epoch = metrics(cell)[0]
    deadline = time.monotonic() + 60
    while not lock_is_free(cell):  # the run got SIGTERM when its runner died
        assert time.monotonic() < deadline, "the run outlived its killed runner"
        time.sleep(0.1)
    assert not (cell / "done.json").exists()

    result = run_grid(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (cell / "train.log").read_text()
    assert log.count("==== ") == 2 and "resuming" in log, log
    records = metrics(cell)
    assert [record["epoch"] for record in records] == [1, 2, 3]
    assert records[0] == first_epoch  # continued, not restarted


def test_two_torchrun_processes_share_the_grid(data, teachers, tmp_path):
    """Every cell runs once, in one of the two processes (the runs themselves are single-process: the launcher's
    variables do not reach them)."""
    out = tmp_path / "table"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RUNNER),
               "--device", "cpu", "--data", str(data), "--teachers", str(teachers), "--out", str(out),
               "--pairs", ",".join(PAIRS), "--methods", "kd,kd+rank", "--epochs", "1", *TINY_RUNS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    logs = [(folder / "train.log").read_text() for folder in sorted(out.glob("*/*/seed0"))]
    assert len(logs) == 4 and all(log.count("==== ") == 1 for log in logs)
    assert all("1 process(es) on cpu" in log for log in logs)
    starts = [line for line in result.stdout.splitlines() if " start " in line]
    assert len(starts) == 4 and {line.split("]")[0] for line in starts} == {"[process 0", "[process 1"}, starts
    assert len(read_csv(out)) == 4


@pytest.mark.slow
def test_demo_grid(tmp_path):
    """`python train/cifar100_table.py` on the demo digits: its two pairs share the cached demo teacher, trained
    once."""
    out = tmp_path / "table"
    result = run_grid("--out", out, "--methods", "kd,kd+rank", "--epochs", 1, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    logs = "".join((folder / "train.log").read_text() for folder in out.glob("*/*/seed0"))
    assert logs.count("training the teacher resnet14 first") == 1
    rows = read_csv(out)
    assert {(row["pair"], row["method"]) for row in rows} == {(pair, method) for pair in
                                                              ("demo_res14_res8", "demo_res14_wrn_16_1")
                                                              for method in ("kd", "kd+rank")}
    for row in rows:
        folder = out / row["pair"] / ("kd" if row["method"] == "kd" else "kd-rank-k1") / "seed0"
        check_row(row, expected_row([folder]))
        assert number(row["teacher_top1"]) >= 90  # the trained demo teacher, not an untrained one
    assert (out / "table.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("case", ["missing teachers", "unknown pair", "unknown method", "k without rank",
                                  "trainer option", "cell option", "no teachers", "topk over classes", "other data",
                                  "other options", "demo with teachers", "topk 1", "negative seed", "spaced pairs",
                                  "tiny k", "shorter run"])
def test_bad_settings_are_refused_before_any_run(data, teachers, tmp_path, case):
    out = tmp_path / "table"
    args = {
        "missing teachers": (["--teachers", tmp_path / "few", "--pairs", "res56_res20,res110_res32,res32x4_res8x4"],
                             "missing teacher checkpoint(s): "),
        "unknown pair": (["--teachers", teachers, "--pairs", "res56_res20,res9_res1"], "--pairs: unknown res9_res1"),
        "unknown method": (["--teachers", teachers, "--methods", "kd,kd+ranked"], "--methods: unknown kd+ranked"),
        "k without rank": (["--teachers", teachers, "--methods", "kd,dkd", "--rank-k", "100"],
                           "--rank-k and --rank-topk set the ranking loss of +rank methods"),
        "trainer option": (["--teachers", teachers, "--", "--no-such-option"], "refused the options after --"),
        "cell option": (["--teachers", teachers, "--", "--rank-w", "0", "--lr", "0.1"],
                        "the options after -- may not set --rank-weight: the runner sets them for each cell"),
        "no teachers": ([], "--teachers is needed"),
        "topk over classes": (["--teachers", teachers, "--pairs", "res56_res20", "--methods", "kd+rank",
                               "--rank-topk", "101"], "--rank-topk 101 is more than the 100 classes"),
        "other data": (["--teachers", teachers, "--pairs", "res56_res20"],
                       "holds runs made with --data /elsewhere/cifar-100-python, not "),
        "other options": (["--teachers", teachers, "--pairs", "res56_res20", "--", "--batch-size", "32"],
                          "holds runs made with the options after -- ['--batch-size', '16'], not ['--batch-size', "
                          "'32']: give the same, or another --out"),
        "demo with teachers": (["--teachers", teachers], "--teachers goes with CIFAR-100 data, not --data demo"),
        "topk 1": (["--teachers", teachers, "--methods", "kd+rank", "--rank-topk", "all,1"],
                   "argument --rank-topk: expected comma-separated class counts >= 2 or 'all', got 'all,1'"),
        "negative seed": (["--teachers", teachers, "--seeds", "0,-1"], "--seeds must be >= 0, got 0,-1"),
        "spaced pairs": (["--teachers", teachers, "--pairs", "res56_res20, res9_res1"], "--pairs: unknown res9_res1 "),
        "tiny k": (["--teachers", teachers, "--pairs", "res56_res20", "--methods", "kd+rank", "--rank-k", "1e-300"],
                   "--rank-k must be a finite number in [2^-126, 3.4e38]"),
        "shorter run": (["--teachers", teachers, "--pairs", "res56_res20", "--methods", "kd", "--epochs", "2"],
                        "holds cells that finished longer runs than --epochs 2: res56_res20 kd seed 0 (3 epochs)"),
    }
    extra, message = args[case]
    if case == "missing teachers":
        (tmp_path / "few" / "resnet56_vanilla").mkdir(parents=True)
        (tmp_path / "few" / "resnet56_vanilla" / "ckpt_epoch_240.pth").write_bytes(
            (teachers / "resnet56_vanilla" / "ckpt_epoch_240.pth").read_bytes())
    if case in ("other data", "other options", "shorter run"):
        out.mkdir()
        (out / "grid.json").write_text(json.dumps({
            "data": "/elsewhere/cifar-100-python" if case == "other data" else str(data.resolve()),
            "trainer_args": [] if case == "shorter run" else ["--batch-size", "16"], "published_baselines": True}))
    if case == "shorter run":  # a finished 3-epoch cell: a 2-epoch table would show it as if asked for
        (out / "res56_res20" / "kd" / "seed0").mkdir(parents=True)
        (out / "res56_res20" / "kd" / "seed0" / "done.json").write_text(json.dumps({"epochs": 3, "time": 0.0}))
    result = run_grid("--data", "demo" if case == "demo with teachers" else data, "--out", out, *extra)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    if case == "missing teachers":  # every missing file is named, the present one is not
        for name in ("resnet110", "resnet32x4"):
            assert str(tmp_path / "few" / f"{name}_vanilla" / "ckpt_epoch_240.pth") in result.stderr
        assert "resnet56_vanilla" not in result.stderr
    assert "Traceback" not in result.stderr
    if case in ("other data", "other options", "shorter run"):
        assert "grid.json" in [path.name for path in out.iterdir()] and not list(out.glob("**/cell.json"))
    else:
        assert not out.exists()


def write_cell(out, cell, top1s, taus, seconds=2.0, finished=True):
    """A cell folder as the runner leaves it, with the given per-epoch validation results."""
    folder = out / cell.folder
    folder.mkdir(parents=True)
    (folder / "cell.json").write_text(json.dumps({"cell": dataclasses.asdict(cell), "command": []}))
    records = [{"epoch": epoch + 1, "val_top1": top1, "val_tau": tau, "teacher_top1": 75.0, "epoch_time_s": seconds}
               for epoch, (top1, tau) in enumerate(zip(top1s, taus))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if finished:
        (folder / "done.json").write_text(json.dumps({"epochs": len(records), "time": 0.0}))
    return folder


def test_table_groups_seeds_and_lengths_and_skips_the_chart_without_matplotlib(tmp_path, monkeypatch):
    """The table's arithmetic on made-up runs: mean and std over seeds, runs of another length in their own row
    (with their own baseline), unfinished runs left out, a reopened cell counted as the run it finished, the
    published numbers only for CIFAR-100 data; without matplotlib no chart."""
    generator = torch.Generator().manual_seed(1)
    out = tmp_path / "table"

    def results(epochs):
        return (60 + 20 * torch.rand(epochs, generator=generator, dtype=torch.float64)).tolist(), \
            torch.rand(epochs, generator=generator, dtype=torch.float64).tolist()

    groups = {}
    for method, rank_k in (("kd", None), ("kd+rank", 100.0)):
        groups[method, 3] = [write_cell(out, Cell("res56_res20", method, seed, rank_k), *results(3))
                             for seed in (0, 1, 2)]
        groups[method, 1] = [write_cell(out, Cell("res56_res20", method, 3, rank_k), *results(1))]
    write_cell(out, Cell("res56_res20", "kd", 4), *results(2), finished=False)
    reopened = write_cell(out, Cell("res56_res20", "kd", 5), *results(3))  # finished 2 epochs, then extended to 3
    (reopened / "done.json").write_text(json.dumps({"epochs": 2, "time": 0.0}))
    groups["kd", 2] = [reopened]
    groups["dkd", 2] = [write_cell(out, Cell("res110_res32", "dkd", 0), *results(2))]
    (out / "table.png").write_bytes(b"an old chart")
    monkeypatch.setattr(report, "matplotlib_installed", lambda: False)

    cifar_grid = {"data": "/data/cifar-100-python", "trainer_args": [], "published_baselines": True}
    rows, text = report.write_table(out, cifar_grid, "progress")
    assert [(row["pair"], row["method"], row["epochs"]) for row in rows] == [
        ("res56_res20", "kd", 1), ("res56_res20", "kd", 2), ("res56_res20", "kd", 3), ("res56_res20", "kd+rank", 1),
        ("res56_res20", "kd+rank", 3), ("res110_res32", "dkd", 2)]
    written = read_csv(out)
    for row, (method, epochs) in zip(written, [(r["method"], r["epochs"]) for r in rows]):
        check_row(row, expected_row(groups[method, epochs], epochs=epochs))
        if method == "kd+rank":
            baseline = next(other for other in written if other["method"] == "kd" and int(other["epochs"]) == epochs)
            assert number(row["rank_gain_best"]) == pytest.approx(
                number(row["top1_best_mean"]) - number(baseline["top1_best_mean"]), abs=1e-12)
            assert number(row["rank_k"]) == 100.0
    assert number(written[-1]["published_top1"]) == CIFAR100_PUBLISHED_TOP1["res110_res32"]["dkd"]
    assert number(written[0]["published_top1"]) == CIFAR100_PUBLISHED_TOP1["res56_res20"]["kd"]
    assert not (out / "table.png").exists()
    assert text == (out / "table.md").read_text() and "table.png is skipped: matplotlib is not installed" in text

    synthetic_grid = {"data": "synthetic", "trainer_args": ["--batch-size", "32"], "published_baselines": False}
    rows, text = report.write_table(out, synthetic_grid, "progress")
    assert all(row["published_top1"] is None for row in rows)
    assert "Options of every run: --batch-size 32." in text

    monkeypatch.setattr(report, "matplotlib_installed", lambda: True)  # the chart of runs of several lengths
    rows, text = report.write_table(out, cifar_grid, "progress")
    assert "table.png" not in text and (out / "table.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_slots_follow_the_visible_gpus_and_runs_leave_the_launchers_variables(monkeypatch):
    """Where the runs go on a machine with GPUs (faked here): N cells on each visible GPU by its real id, one GPU per
    torchrun process; a run's environment names its GPU and its share of the cores, and none of torchrun's
    variables (or the run would take itself for a process of the runner's launch)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    placement = scheduler.find_slots("auto", 3)
    assert placement.slots == ["3", "3", "3", "5", "5", "5"] and placement.world_size == 1
    cores = len(os.sched_getaffinity(0))
    assert placement.threads == max(1, cores // 6)

    torchrun = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
                "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "grid", "OMP_NUM_THREADS": "1"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    placement = scheduler.find_slots("auto", None)
    assert placement.slots == ["5"] * scheduler.CELLS_PER_GPU and (placement.rank, placement.world_size) == (3, 4)
    assert placement.threads == max(1, cores // (2 * scheduler.CELLS_PER_GPU))
    env = scheduler.run_environment("5", placement)
    assert env["CUDA_VISIBLE_DEVICES"] == "5" and env["OMP_NUM_THREADS"] == str(placement.threads)
    assert not set(torchrun) - {"OMP_NUM_THREADS"} & set(env)
    assert scheduler.find_slots("cpu", None).slots == [None]


def test_a_cell_whose_files_cannot_be_read_fails_alone(tmp_path):
    # A metrics.jsonl damaged in the middle (not just a cut-short last line) fails its cell with a reason; the runner
    # goes on, and the table leaves the cell out instead of stopping.
    from rankkd.grid.cells import Cell
    from rankkd.grid.report import finished_cells
    from rankkd.grid.scheduler import Placement, Runner, RunningCell
    from rankkd.training.run_folder import RunLock

    broken, cut_short = Cell("res56_res20", "kd", 0), Cell("res56_res20", "kd", 1)
    for cell in (broken, cut_short):
        write_cell(tmp_path, cell, [50.0, 60.0], [0.5, 0.6], finished=False)
        (tmp_path / cell.folder / "train.log").write_text("epoch 2/2: ...\n")
    lines = (tmp_path / broken.folder / "metrics.jsonl").read_text().splitlines()
    (tmp_path / broken.folder / "metrics.jsonl").write_text(f"{lines[0][:10]}\n{lines[1]}\n")
    with open(tmp_path / cut_short.folder / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 3, "val_')
    placement = Placement(rank=0, world_size=1, slots=[None], threads=1)
    runner = Runner(tmp_path, {broken: [], cut_short: []}, {broken: 2, cut_short: 2}, placement,
                    on_cell_done=lambda progress: None)
    for cell in (broken, cut_short):
        claim = RunLock(tmp_path / cell.folder, name=".claim").acquire()
        runner.finish(RunningCell(cell, subprocess.Popen(["true"]), claim, 0.0), 0)
    failed = json.loads((tmp_path / broken.folder / "failed.json").read_text())
    assert "can't be read" in failed["reason"] and "line 1" in failed["reason"]
    assert json.loads((tmp_path / cut_short.folder / "done.json").read_text())["epochs"] == 2
    assert [cell for cell, _ in finished_cells(tmp_path)] == [cut_short]
