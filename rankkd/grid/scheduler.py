"""Running a grid's cells: where they go (this process's GPUs, or the CPU, and how many at once), each in its own
process with its own environment, claimed through a lock file so that the processes of a torchrun launch (or two
runners on one folder) never run a cell twice, and marked done.json or failed.json when its run ends. A runner that
stops, however it stops, takes its runs with it; the same command later continues them from their checkpoints."""
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rankkd.grid.cells import read_json, read_metrics, write_json
from rankkd.training.run_folder import read_metrics as read_metrics_file
from rankkd.training.progress import format_duration
from rankkd.training.run_folder import FolderInUseError, RunLock

CELLS_PER_GPU = 4  # --parallel's default on a GPU: one batch-64 run of these small models leaves most of it idle
POLL_S = 1.0  # how often the runner looks at its runs
STATUS_EVERY_S = 300.0  # a status line with every running cell's epoch and the ETA
# torchrun's variables: a run must not take itself for one process of the runner's launch.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                      "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------------------------------
# Where the runs go.


@dataclass
class Placement:
    """Where this runner process puts its runs."""
    rank: int  # among the processes of a torchrun launch (0 for plain python)
    world_size: int
    slots: list  # one entry per cell this process may run at once: a GPU id for CUDA_VISIBLE_DEVICES, or None (CPU)
    threads: int  # CPU threads per run (OpenMP, Inductor's compile workers): the machine's cores shared by its runs

    def describe(self):
        gpus = sorted(set(self.slots), key=self.slots.index)
        if gpus == [None]:
            return f"the CPU, {len(self.slots)} cell(s) at once"
        return f"GPU {','.join(gpus)}, {len(self.slots) // len(gpus)} cell(s) each"


def find_slots(device, parallel):
    """This process's slots for `device` ("auto", "cuda" or "cpu"), `parallel` cells at a time on each GPU (None:
    CELLS_PER_GPU on a GPU, 1 on the CPU); under torchrun one GPU per process, as for the trainer."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank, local_world_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpu_count = torch.cuda.device_count() if device != "cpu" else 0
    if device == "cuda" and gpu_count == 0:
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    if gpu_count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        # A run sees its GPU through CUDA_VISIBLE_DEVICES, so a slot holds the real id, not the index among ours.
        ids = visible.split(",")[:gpu_count] if visible else [str(index) for index in range(gpu_count)]
        if world_size > 1:
            if local_rank >= len(ids):
                raise ValueError(f"process {rank} (local rank {local_rank}) has no GPU: {len(ids)} visible")
            ids = [ids[local_rank]]
        slots = [gpu for gpu in ids for _ in range(parallel or CELLS_PER_GPU)]
    else:
        slots = [None] * (parallel or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Placement(rank, world_size, slots, max(1, cores // (len(slots) * local_world_size)))


def run_environment(slot, placement):
    """The environment of a run in `slot`: the runner's, without torchrun's variables, on its GPU, with its share
    of the CPU (torchrun's own OMP_NUM_THREADS=1 replaced)."""
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCHER_VARIABLES and not key.startswith("TORCHELASTIC_")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(placement.threads),
               TORCHINDUCTOR_COMPILE_THREADS=str(placement.threads))
    if slot is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot
    return env


def die_with_runner(runner_pid, ignored=()):
    """What a run's process does before it starts: die with the runner, even a SIGKILLed one, instead of running on
    unwatched and holding the cell's folder (Linux: PR_SET_PDEATHSIG, checked against a runner already gone); and
    ignore the signals `ignored` (those meant for the runner alone)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arrange():
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)
        if os.getppid() != runner_pid:
            os._exit(1)
    return arrange


def start_process(argv, log_path, env, ignored=()):
    """`argv` as a process writing to the log at `log_path` (appended to: the log of every attempt at a cell),
    ignoring the signals `ignored`."""
    with open(log_path, "a") as log:  # the process holds its own descriptor
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n")
        log.flush()
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=die_with_runner(os.getpid(), ignored) if sys.platform == "linux" else None)


# ----------------------------------------------------------------------------------------------------------------------
# A cell's state on disk: cell.json (what it runs), the claim (.claim, held while a runner runs it), done.json
# (finished), failed.json (its last run failed), and the trainer's own files (train.log, metrics.jsonl, last.pt, ...).


def claim_cell(folder):
    """The claim on a cell (held until released or until this process ends), or None when another process has it."""
    try:
        return RunLock(folder, what="grid cell", name=".claim").acquire()
    except FolderInUseError:
        return None


def is_done(folder, epochs):
    done = read_json(Path(folder) / "done.json")
    return done is not None and done["epochs"] >= epochs


def failed_since(folder, start):
    """The failure record of the cell's run when one failed after `start` (this launch): not retried until the
    runner is started again."""
    failed = read_json(Path(folder) / "failed.json")
    return failed if failed is not None and failed["time"] >= start else None


def mark_done(folder, epochs):
    write_json(folder / "done.json", {"epochs": epochs, "time": time.time()})
    (folder / "failed.json").unlink(missing_ok=True)


def mark_failed(folder, exit_code, reason=None):
    """Record the failure with `reason`, by default the log's last line (the trainer's one-line error); returns it."""
    reason = reason or last_log_line(folder / "train.log")
    write_json(folder / "failed.json", {"exit": exit_code, "time": time.time(), "reason": reason})
    return reason


def last_log_line(path):
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(empty log)"


def record_end(folder, epochs, code):
    """Mark the cell in `folder` done or failed once its run ended with exit status `code`: done when it exited 0
    after `epochs` epochs. Returns its epoch records and, when it failed, the reason (None when done)."""
    reason = None
    try:
        records, _ = read_metrics_file(Path(folder) / "metrics.jsonl")
    except (OSError, ValueError) as error:  # one cell's damaged files fail that cell, never the grid
        records, reason = [], f"its files can't be read: {error}"
    if code == 0 and (not records or records[-1]["epoch"] < epochs):
        code = "0, short of its epochs"  # cannot happen with train/cifar100.py as it is; never call it done
    if code != 0:
        return records, f"exit {code}: {mark_failed(Path(folder), code, reason)}"
    mark_done(Path(folder), records[-1]["epoch"])
    return records, None


def done_line(cell, records, seconds):
    """The line that announces a finished cell: its last and best top-1, τ and the time its run took."""
    last = records[-1]
    tau = f", tau {last['val_tau']:.3f}" if last.get("val_tau") is not None else ""
    return (f"done {cell}: top-1 {last['val_top1']:.2f} (best {max(record['val_top1'] for record in records):.2f})"
            f"{tau}, {format_duration(seconds)}")


def progress_line(out, epochs):
    """How many of the cells `epochs` (cell -> its epochs) are finished."""
    done = sum(is_done(Path(out) / cell.folder, cell_epochs) for cell, cell_epochs in epochs.items())
    return f"{done} of the {len(epochs)} cells of this grid finished"


def mean_epoch_time(records):
    return statistics.fmean(record["epoch_time_s"] for record in records) if records else None


def time_left(out, epochs, left):
    """Seconds of training each cell of `left` still needs, from the epoch times seen so far: its epochs to go at its
    own pace, else its pair's, else the mean over the grid `epochs` (cell -> its epochs); None before any epoch."""
    seen = {cell: read_metrics(Path(out) / cell.folder) for cell in epochs}
    paces = {cell: mean_epoch_time(records) for cell, records in seen.items()}
    pair_paces = {}
    for cell, pace in paces.items():
        if pace is not None:
            pair_paces.setdefault(cell.pair, []).append(pace)
    if not pair_paces:
        return {cell: None for cell in left}
    overall = statistics.fmean(pace for pair in pair_paces.values() for pace in pair)
    return {cell: (epochs[cell] - len(seen[cell]))
            * (paces[cell] or statistics.fmean(pair_paces.get(cell.pair, [overall]))) for cell in left}


def eta(out, epochs, left, slots):
    """", ETA ..." for the cells `left` of the grid `epochs` run `slots` at a time: their work shared out over the
    slots, but never less than the longest cell."""
    if not left:
        return ""
    seconds = list(time_left(out, epochs, left).values())
    if None in seconds:
        return ", ETA: after the first epoch"
    return f", ETA {format_duration(max(sum(seconds) / slots, max(seconds)))}"


# ----------------------------------------------------------------------------------------------------------------------
# The runner.


@dataclass
class RunningCell:
    cell: object
    process: subprocess.Popen
    claim: RunLock
    started: float  # time.monotonic()


def run_until_stopped(run_all, stop, say):
    """run_all(); stopped on the way (Ctrl-C, or SIGTERM as torchrun and SLURM stop processes), stop() ends the work
    in flight (each run keeping its last checkpoint) and the process exits saying how to continue."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run_all()
    except (KeyboardInterrupt, SystemExit) as stopped:
        stop()
        say("stopped: the same command continues the grid (finished cells are skipped)")
        raise SystemExit(130 if isinstance(stopped, KeyboardInterrupt) else stopped.code) from None


class Runner:
    """Runs the cells of the grid that no other process has claimed, len(placement.slots) at a time: cell c as the
    process commands[c], in out / c.folder, done after epochs[c] epochs. on_cell_done(progress) follows every cell
    this process finishes (the table is rewritten there)."""

    def __init__(self, out, commands, epochs, placement, on_cell_done):
        self.out, self.commands, self.epochs, self.placement = Path(out), commands, epochs, placement
        self.on_cell_done = on_cell_done
        self.cells = list(commands)
        self.start = time.time()
        self.running = {}  # slot index -> RunningCell
        self.last_status = time.monotonic()
        self.prefix = f"[process {placement.rank}] " if placement.world_size > 1 else ""

    def say(self, text):
        print(f"{self.prefix}{text}", flush=True)

    def folder(self, cell):
        return self.out / cell.folder

    def done(self, cell):
        return is_done(self.folder(cell), self.epochs[cell])

    def failed(self, cell):
        return failed_since(self.folder(cell), self.start)

    def progress(self):
        return progress_line(self.out, self.epochs)

    def run(self):
        """Run cells until none is left; returns those that failed. Stopped (Ctrl-C, or SIGTERM as torchrun stops its
        processes), it ends its runs, each keeping its last checkpoint, and exits."""
        run_until_stopped(self.run_all, self.stop, self.say)
        return [cell for cell in self.cells if self.failed(cell)]

    def run_all(self):
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
                    return
                if not waiting_said:  # every cell left is claimed by another process of the launch
                    self.say(f"waiting for {len(left)} cell(s) that other processes run")
                    waiting_said = True
            if time.monotonic() - self.last_status >= STATUS_EVERY_S:
                self.status()
            time.sleep(POLL_S)

    def fill_slots(self):
        for slot_index, slot in enumerate(self.placement.slots):
            if slot_index in self.running:
                continue
            claimed = self.claim_next()
            if claimed is None:
                return
            self.start_cell(slot_index, slot, *claimed)

    def claim_next(self):
        busy = {running.cell for running in self.running.values()}
        for cell in self.cells:
            if cell in busy or self.done(cell) or self.failed(cell):
                continue
            claim = claim_cell(self.folder(cell))
            if claim is None:
                continue
            if self.done(cell) or self.failed(cell):  # it finished while we looked
                claim.release()
                continue
            return cell, claim
        return None

    def start_cell(self, slot_index, slot, cell, claim):
        folder = self.folder(cell)
        argv = self.commands[cell]
        write_json(folder / "cell.json", {"cell": asdict(cell), "command": argv})
        process = start_process(argv, folder / "train.log", run_environment(slot, self.placement))
        self.running[slot_index] = RunningCell(cell, process, claim, time.monotonic())
        where = f"GPU {slot}" if slot is not None else "CPU"
        epochs_done = len(read_metrics(folder))
        resumed = f", from epoch {epochs_done}" if epochs_done else ""
        self.say(f"start {cell} on {where}{resumed} (log: {folder / 'train.log'})")

    def reap(self):
        for slot_index, running in list(self.running.items()):
            code = running.process.poll()
            if code is not None:
                del self.running[slot_index]
                self.finish(running, code)

    def finish(self, running, code):
        """Mark an ended run's cell done or failed and release it."""
        cell, folder = running.cell, self.folder(running.cell)
        records, failure = record_end(folder, self.epochs[cell], code)
        running.claim.release()
        if failure is not None:
            self.say(f"FAILED {cell}, {failure} (log: {folder / 'train.log'})")
            return
        self.say(f"{done_line(cell, records, time.monotonic() - running.started)} | {self.progress()}{self.eta()}")
        self.on_cell_done(self.progress())

    def eta(self):
        """", ETA ..." of the cells left, over every process's slots."""
        left = [cell for cell in self.cells if not self.done(cell) and not self.failed(cell)]
        return eta(self.out, self.epochs, left, len(self.placement.slots) * self.placement.world_size)

    def status(self):
        self.last_status = time.monotonic()
        running = [f"{running.cell} epoch {len(read_metrics(self.folder(running.cell)))}/{self.epochs[running.cell]}"
                   for running in self.running.values()]
        self.say(f"status: {'; '.join(running) or 'no cell running here'} | {self.progress()}{self.eta()}")

    def stop(self):
        """End the runs of this process (each keeps its last checkpoint), release their claims."""
        for running in self.running.values():
            running.process.terminate()
        for running in self.running.values():
            try:
                running.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                running.process.kill()
                running.process.wait()
            running.claim.release()
            self.say(f"stopped {running.cell}: {len(read_metrics(self.folder(running.cell)))} epoch(s) kept")
        self.running.clear()
