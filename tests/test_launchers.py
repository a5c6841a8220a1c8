"""The grid runner's launchers, train/cifar100_table.py --launcher local and slurm. Local jobs as users run them: a
job preempted (SIGUSR2, as SLURM signals a job: it requeues itself and its run continues from its checkpoint), then
killed (the next launch resumes its cell and skips the finished one), its cell equal to an uninterrupted run. SLURM
submission through stand-ins for sbatch and sacct: the batch script, the job records, which cells a rerun
resubmits, the progress report. Tiny synthetic runs (res56 -> res20, 2 steps an epoch) keep each cell to seconds."""
import csv
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import lock_is_free

pytest.importorskip("submitit", reason="the launchers need submitit (pip install submitit)")
from submitit.core.utils import DelayedSubmission  # noqa: E402

from rankkd.grid.cells import Cell  # noqa: E402
from rankkd.training.run_folder import RunLock  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "train" / "cifar100_table.py"
GRID = ["--device", "cpu", "--data", "synthetic", "--pairs", "res56_res20", "--epochs", "3"]
TINY = ["--", "--steps-per-epoch", "2", "--batch-size", "8", "--deterministic", "--log-every", "2"]
TIMING = ("epoch_time_s", "train_img_s")  # the only numbers two runs of one cell may differ in


def run_grid(*args):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def metrics(folder):
    return [{key: value for key, value in json.loads(line).items() if key not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def table_rows(out):
    with open(out / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def job_after_epoch(folder, epoch, runner):
    """The process id of the job that runs the cell in `folder` (the holder of its claim), once its run saved the
    checkpoint of `epoch` (the epoch's line follows it)."""
    deadline = time.monotonic() + 300
    while f"epoch {epoch}/3:" not in ((folder / "train.log").read_text() if (folder / "train.log").exists() else ""):
        assert runner.poll() is None and time.monotonic() < deadline, f"the cell's epoch {epoch} never finished"
        time.sleep(0.02)
    return json.loads((folder / ".claim").read_text())["pid"]


def test_local_job_preempted_then_killed_ends_equal_to_an_uninterrupted_run(tmp_path):
    """One cell's job is preempted after its first epoch (SIGUSR2, as SLURM signals a job: it requeues itself and
    continues in the same launch), then killed after its second (the runner marks the cell failed); the next launch
    resumes it and leaves the other, finished cell alone. The cell ends as an uninterrupted run of its command."""
    out = tmp_path / "grid"
    command = [*GRID, "--methods", "kd,kd+rank", "--out", out, "--launcher", "local", "--parallel", 1, *TINY]
    runner = subprocess.Popen([sys.executable, str(RUNNER), *map(str, command)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    interrupted, other = out / "res56_res20" / "kd" / "seed0", out / "res56_res20" / "kd-rank-k1" / "seed0"
    os.kill(job_after_epoch(interrupted, 1, runner), signal.SIGUSR2)  # SLURM's word for preemption and time-out
    os.kill(job_after_epoch(interrupted, 2, runner), signal.SIGKILL)
    output = runner.communicate(timeout=300)[0]
    assert runner.returncode == 1, output
    assert re.search(r"start res56_res20 kd seed 0 as local job \d+ on CPU \(log: ", output), output
    assert "FAILED res56_res20 kd seed 0, exit none: its job ended without a result (killed?)" in output, output
    assert "done res56_res20 kd+rank k=1 seed 0: top-1" in output, output
    log = (interrupted / "train.log").read_text()
    assert log.count("==== ") == 2 and log.count("resuming") == 1, log  # requeued by submitit, in the same launch
    job_log = out / ".submitit" / f"{json.loads((interrupted / 'job.json').read_text())['job_id']}_0_log.out"
    assert "this job is preempted" in job_log.read_text() and "Requeued job" in job_log.read_text()
    deadline = time.monotonic() + 60
    while not lock_is_free(interrupted):  # the run got SIGTERM when its job died
        assert time.monotonic() < deadline, "the run outlived its killed job"
        time.sleep(0.1)
    finished_log = (other / "train.log").read_text()

    again = run_grid(*command)
    assert again.returncode == 0, again.stdout + again.stderr
    report = again.stdout.split("the grid so far:")[1]
    assert re.search(r"res56_res20 kd seed 0\s+failed\s+[23]/3 .*its job ended without a result", report), report
    assert re.search(r"res56_res20 kd\+rank k=1 seed 0\s+done\s+3/3", report), report
    starts = [line for line in again.stdout.splitlines() if line.startswith("start ")]
    assert len(starts) == 1 and re.search(r"kd seed 0 as local job \d+ on CPU, from epoch [23]", starts[0]), starts
    assert (other / "train.log").read_text() == finished_log  # a finished cell is never run again
    assert (interrupted / "train.log").read_text().count("resuming") == 2

    # The same command, uninterrupted, in a folder of its own.
    trainer = json.loads((interrupted / "cell.json").read_text())["command"]
    reference = tmp_path / "reference"
    trainer[trainer.index("--out") + 1] = str(reference)
    result = subprocess.run(trainer, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [record["epoch"] for record in metrics(interrupted)] == [1, 2, 3]
    assert metrics(interrupted) == metrics(reference)
    weights, expected = (torch.load(folder / "last.pt", weights_only=True)["student"]
                         for folder in (interrupted, reference))
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    rows = {row["method"]: row for row in table_rows(out)}
    assert rows.keys() == {"kd", "kd+rank"} and float(rows["kd"]["tau_mean"]) == metrics(reference)[-1]["val_tau"]


# ----------------------------------------------------------------------------------------------------------------------
# SLURM, through stand-ins for its commands: sbatch keeps each script and answers with the next job id, sacct reports
# what the test writes into sacct.txt, srun only needs to exist.

FAKE_SLURM = {
    "sbatch": '#!/bin/sh\nn=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 999) + 1 ))\n'
              'echo $n > "$FAKE_SLURM/count"\ncp "$1" "$FAKE_SLURM/sbatch-$n.sh"\necho "Submitted batch job $n"\n',
    "sacct": '#!/bin/sh\necho "JobID|State|NodeList"\ncat "$FAKE_SLURM/sacct.txt" 2>/dev/null\nexit 0\n',
    "srun": "#!/bin/sh\nexit 0\n",
}


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A folder of stand-in SLURM commands first on PATH; returns the folder where they keep their records."""
    commands, records = tmp_path / "slurm-bin", tmp_path / "slurm"
    commands.mkdir()
    records.mkdir()
    for name, text in FAKE_SLURM.items():
        (commands / name).write_text(text)
        (commands / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{commands}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(records))
    return records


@pytest.fixture(scope="module")
def table_runner():
    """train/cifar100_table.py as a module: its main() called in this process (the SLURM launcher runs nothing)."""
    spec = importlib.util.spec_from_file_location("cifar100_table", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sbatch_options(script):
    return dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines()
                if line.startswith("#SBATCH --"))


def finish_cell(out, cell, epochs):
    """A cell as its job leaves it once done: cell.json, its epoch records, done.json."""
    folder = out / cell.folder
    (folder / "cell.json").write_text(json.dumps({"cell": dataclasses.asdict(cell), "command": []}))
    records = [{"epoch": epoch, "val_top1": 10.0 * epoch, "val_tau": 0.5, "teacher_top1": 70.0, "epoch_time_s": 3.0}
               for epoch in range(1, epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (folder / "done.json").write_text(json.dumps({"epochs": epochs, "time": time.time()}))


def test_slurm_submits_one_array_then_resubmits_only_failed_and_lost_cells(slurm, table_runner, tmp_path, capsys):
    out = tmp_path / "grid"
    methods = ("kd", "kd+rank", "dkd", "dkd+rank", "dist")
    command = [*GRID, "--methods", ",".join(methods), "--out", str(out), "--launcher", "slurm", "--partition", "gpu",
               "--account", "proj", "--time", "90", "--gpus-per-cell", "2", "--constraint", "h100", "--max-jobs", "2",
               "--slurm", "cpus_per_task=8", "--slurm", "qos=high", "--slurm", 'setup=["module load cuda"]', *TINY]
    table_runner.main(command)
    output = capsys.readouterr().out
    assert "submitted 5 cell(s) as SLURM job 1000 (an array, at most 2 at once)" in output, output
    script = (slurm / "sbatch-1000.sh").read_text()
    assert {key: value for key, value in sbatch_options(script).items() if key not in ("output", "error")} == {
        "array": "0-4%2", "partition": "gpu", "account": "proj", "time": "90", "gpus-per-node": "2",
        "constraint": "h100", "cpus-per-task": "8", "qos": "high", "nodes": "1", "ntasks-per-node": "1",
        "job-name": "rankkd-grid", "signal": "USR2@90", "open-mode": "append", "wckey": "submitit"}
    assert "\nmodule load cuda\n" in script and "-m submitit.core._submit" in script
    cells = [Cell("res56_res20", method, 0, 1.0 if method.endswith("+rank") else None) for method in methods]
    for index, cell in enumerate(cells):  # each array task's pickle runs its cell: the job record says which
        folder = out / cell.folder
        assert json.loads((folder / "job.json").read_text())["job_id"] == f"1000_{index}"
        job = DelayedSubmission.load(out / ".submitit" / f"1000_{index}_submitted.pkl").function
        assert (job.cell, job.epochs, job.out) == (cell, 3, out.resolve())
        assert job.command[job.command.index("--out") + 1] == str(out / cell.folder)
        assert "--resume" in job.command and not (folder / "train.log").exists()  # submitted, nothing run

    # The jobs' fates: kd finished, kd+rank cancelled before it ran, dkd pending, dkd+rank running (this process
    # holds its claim, as its job would), dist failed.
    done, lost, queued, running, failed = (out / cell.folder for cell in cells)
    finish_cell(out, cells[0], 3)
    (failed / "failed.json").write_text(json.dumps({"exit": 1, "time": time.time(), "reason": "a bad day"}))
    claim = RunLock(running, name=".claim").acquire()
    (slurm / "sacct.txt").write_text("1000_0|COMPLETED|n1\n1000_1|CANCELLED by 42|\n1000_[2]|PENDING|\n"
                                     "1000_3|RUNNING|n2\n1000_4|FAILED|n3\n")
    try:
        table_runner.main([*command[:command.index("--")], "--progress", *TINY])
        progress = capsys.readouterr().out
        table_runner.main(command)
        output = capsys.readouterr().out
    finally:
        claim.release()
    for line in (r"res56_res20 kd seed 0\s+done\s+3/3\s+top-1 30.00",
                 r"res56_res20 kd\+rank k=1 seed 0\s+lost\s+0/3\s+0:09\s+slurm job 1000_1 CANCELLED",
                 r"res56_res20 dkd seed 0\s+queued\s+0/3\s+0:09\s+slurm job 1000_2 PENDING",
                 r"res56_res20 dkd\+rank k=1 seed 0\s+running\s+0/3\s+0:09\s+by process \d+ on",
                 r"res56_res20 dist seed 0\s+failed\s+0/3\s+0:09\s+exit 1: a bad day",
                 r"1 of the 5 cells of this grid finished \(1 done, 1 running, 1 queued, 1 failed, 1 lost\)"):
        assert re.search(line, progress) and re.search(line, output), (line, progress)
    assert "| res56_res20 | resnet56 → resnet20 | kd | 1 | 3 | 30.00 | 30.00 |" in progress  # the table so far
    assert "submitted 2 cell(s) as SLURM job 1001 (an array, at most 2 at once)" in output, output
    assert sorted(path.name for path in slurm.glob("sbatch-*.sh")) == ["sbatch-1000.sh", "sbatch-1001.sh"]
    assert sbatch_options((slurm / "sbatch-1001.sh").read_text())["array"] == "0-1%2"
    job_ids = {cell.method: json.loads((out / cell.folder / "job.json").read_text())["job_id"] for cell in cells}
    assert job_ids == {"kd": "1000_0", "kd+rank": "1001_0", "dkd": "1000_2", "dkd+rank": "1000_3", "dist": "1001_1"}
    table_runner.main([*command[:command.index("--")], "--progress", *TINY])  # sacct does not know 1001 yet
    progress = capsys.readouterr().out
    assert re.search(r"kd\+rank k=1 seed 0\s+queued\s+0/3\s+0:09\s+slurm job 1001_0 UNKNOWN", progress), progress
    assert re.search(r"dist seed 0\s+queued\s+0/3\s+0:09\s+slurm job 1001_1 UNKNOWN", progress), progress


@pytest.mark.parametrize("case", ["slurm options here", "parallel with slurm", "unknown parameter", "own option",
                                  "no srun", "time", "max jobs", "not key=value", "time here"])
def test_bad_launcher_settings_are_refused_before_anything_is_written(slurm, table_runner, tmp_path, capsys,
                                                                      monkeypatch, case):
    out = tmp_path / "grid"
    args, message = {
        "slurm options here": (["--launcher", "local", "--partition", "gpu", "--max-jobs", "4"],
                               "--partition, --max-jobs set SLURM jobs: give --launcher slurm (not local)"),
        "parallel with slurm": (["--launcher", "slurm", "--parallel", "2"], "--parallel applies to --launcher here and "
                                                                            "local"),
        "unknown parameter": (["--launcher", "slurm", "--slurm", "mem_gb=32"],
                              "--slurm: Unavailable parameter(s): ['mem_gb'] (parameters of submitit's "
                              "SlurmExecutor: account, "),
        "own option": (["--launcher", "slurm", "--slurm", "partition=gpu"], "--slurm partition=...: give --partition "
                                                                            "instead"),
        "no srun": (["--launcher", "slurm"], "--launcher slurm: no srun on PATH"),
        "time": (["--launcher", "local", "--time", "0"], "--time must be > 0 minutes, got 0"),
        "max jobs": (["--launcher", "slurm", "--max-jobs", "0"], "--max-jobs must be >= 1, got 0"),
        "not key=value": (["--launcher", "slurm", "--slurm", "qos"], "argument --slurm: expected KEY=VALUE, got 'qos'"),
        "time here": (["--time", "60"], "--time is the time limit of a job: give --launcher local or slurm"),
    }[case]
    if case == "no srun":
        monkeypatch.setenv("PATH", os.pathsep.join(part for part in os.environ["PATH"].split(os.pathsep)
                                                   if not (Path(part) / "srun").exists()))
    with pytest.raises(SystemExit) as stopped:
        table_runner.main([*GRID, "--methods", "kd", "--out", str(out), *args, *TINY])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1, error
    assert not out.exists() and not list(slurm.glob("sbatch-*"))
