"""The grid's cells as submitit jobs (train/cifar100_table.py --launcher local or slurm). The cell folders stay the one
record of the grid's state, so that these launchers and the runner's own processes (--launcher here) can take a grid
over from one another:

    CellJob       what a job runs: claims its cell, runs the cell's trainer command (--resume auto) to its end, marks
                  the cell done or failed and rewrites the table. Preempted or timed out, submitit's checkpoint hook
                  stops the run (its last checkpoint stays) and requeues the job, which continues from there.
    cell_states   each cell's state from its folder, its claim and its last job: done, running, queued, failed, lost
                  or waiting
    LocalRunner   the cells as local jobs, a slot's worth at a time, waited for
    submit_slurm  the cells that need a job as one SLURM job array; nothing of the runner stays alive

A cell's folder records its last job in job.json (launcher, id, host, submission time, log); the jobs' own files
(pickles, batch scripts, logs) are in OUT/.submitit.
"""
import contextlib
import dataclasses
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import rankkd
from rankkd.grid.cells import Cell, read_json, read_metrics, write_json
from rankkd.grid.report import markdown_table, table_rows, write_table
from rankkd.grid.scheduler import (POLL_S, STATUS_EVERY_S, Placement, claim_cell, done_line, eta,
                                            failed_since, is_done, mark_failed, progress_line, record_end,
                                            run_environment, run_until_stopped, start_process, time_left)
from rankkd.training.progress import format_duration

JOB_RECORD = "job.json"
JOBS_FOLDER = ".submitit"
# A progress report sees whether a cell is claimed by taking the claim for an instant; a job that meets it then
# tries again for this long before it leaves the cell to whoever holds it.
CLAIM_PATIENCE_S = 2.0
# sacct may not list a job for a while after sbatch: a job that it does not know counts as queued that long, then as
# lost.
UNKNOWN_JOB_GRACE_S = 600
# SLURM states of a job that will still run its cell (sacct's words), as submitit counts them plus the passing ones.
SLURM_WAITING_STATES = {"READY", "PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "COMPLETING",
                        "CONFIGURING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}
CELL_STATES = ("done", "running", "queued", "failed", "lost", "waiting")
RESUBMITTED_STATES = ("failed", "lost", "waiting")


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise ImportError("--launcher local and slurm need submitit: pip install submitit (or rankkd's cluster "
                          "extra)") from None
    return submitit


@contextlib.contextmanager
def rankkd_importable_by_jobs():
    """A job is a fresh interpreter that unpickles its CellJob, with the environment of the process that submitted it
    (a local job's controller copies it, sbatch exports it): from a source checkout that is not installed, it finds
    rankkd through PYTHONPATH, set for the submission."""
    root = Path(rankkd.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():  # an installed rankkd: every interpreter of this Python finds it
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), before] if before else [str(root)])
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


# ----------------------------------------------------------------------------------------------------------------------
# What a job runs.


def claim_patiently(folder):
    """The claim on the cell in `folder`, or None when another process holds it for CLAIM_PATIENCE_S."""
    deadline = time.monotonic() + CLAIM_PATIENCE_S
    while (claim := claim_cell(folder)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return claim


def preemption_signal():
    """The signal by which SLURM (and submitit's local controller) tells a job that its time is up or that it is
    preempted: USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise."""
    return getattr(signal, "SIG" + import_submitit().JobEnvironment.USR_SIG)


@dataclass
class CellJob:
    """One cell as a submitit job: the cell's trainer `command` (with --resume auto) in out / cell.folder, done after
    `epochs` epochs; then the table of the grid (`grid`: its grid.json; `grid_epochs`: every cell's epochs) is
    rewritten. `slot` is a local job's GPU (None: the devices the job was given, SLURM's or the CPU) and `threads`
    the run's CPU threads (None: the cores the job may use). Returns what became of the cell: "done", "failed",
    "stopped" (by a signal from outside: left for the next job) or "elsewhere" (another process runs it)."""
    out: Path
    cell: Cell
    command: list
    epochs: int
    grid: dict
    grid_epochs: dict
    slot: str | None = None
    threads: int | None = None

    def __post_init__(self):
        self._process = None  # the cell's run while this job waits for it
        self._stopped_by = None  # the signal that stopped the job from outside

    def __call__(self):
        folder = self.out / self.cell.folder
        # SIGTERM is how SLURM and the local controller stop a job (scancel, preemption, a stopped runner): the run is
        # stopped, and its cell left without a failure mark for the next job.
        signal.signal(signal.SIGTERM, self._stop_from_outside)
        claim = claim_patiently(folder)
        if claim is None:
            print(f"{self.cell}: another process runs it", flush=True)
            return "elsewhere"
        try:
            if self._stopped_by is not None:
                return "stopped"
            if is_done(folder, self.epochs):
                return "done"
            started = time.monotonic()
            code = self._run(folder)
            if self._stopped_by is not None:
                print(f"{self.cell}: stopped by {self._stopped_by}; its run continues from its last checkpoint in "
                      "the next job", flush=True)
                return "stopped"
            records, failure = record_end(folder, self.epochs, code)
        finally:
            claim.release()
        if failure is not None:
            print(f"FAILED {self.cell}, {failure} (log: {folder / 'train.log'})", flush=True)
            return "failed"
        write_table(self.out, self.grid, progress_line(self.out, self.grid_epochs))
        print(done_line(self.cell, records, time.monotonic() - started), flush=True)
        return "done"

    def _run(self, folder):
        """Run the cell's trainer to its end; returns its exit status."""
        write_json(folder / "cell.json", {"cell": asdict(self.cell), "command": self.command})
        threads = self.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        env = run_environment(self.slot, Placement(rank=0, world_size=1, slots=[self.slot], threads=threads))
        # The run ignores the preemption signal, which SLURM sends to every process of the job: this job's hook stops
        # it instead, before the job requeues.
        self._process = start_process(self.command, folder / "train.log", env, ignored=(preemption_signal(),))
        try:
            return self._process.wait()
        except BaseException:  # requeued by the hook (SystemExit) or interrupted: the run ends before the claim
            self._process.terminate()
            self._process.wait()
            raise

    def checkpoint(self):
        """submitit's hook when the job is preempted or times out, called in the job's signal handler: stop the run
        (its last checkpoint stays) and requeue this job, which then continues the run from that checkpoint with
        the same command (--resume auto). Nothing here waits: the job waits for the run as it exits."""
        if self._process is not None:
            self._process.terminate()
        return import_submitit().helpers.DelayedSubmission(dataclasses.replace(self))

    def _stop_from_outside(self, signum, frame):
        self._stopped_by = signal.Signals(signum).name
        if self._process is not None:
            self._process.terminate()


# ----------------------------------------------------------------------------------------------------------------------
# A cell's state, from its folder and its last job.


@dataclass(frozen=True)
class CellState:
    name: str  # one of CELL_STATES
    epochs_done: int
    detail: str  # who runs it, its job and the scheduler's word on it, or why it failed


def write_job_record(folder, launcher, job, submitted):
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / JOB_RECORD, {"launcher": launcher, "job_id": job.job_id, "host": socket.gethostname(),
                                     "submitted": submitted, "log": str(job.paths.stdout)})


def claim_holder(folder):
    """Who holds the cell's claim ("process PID on HOST"), None when nobody does: seen by taking it for an instant
    (a job meeting that instant tries again, see claim_patiently)."""
    if not (folder / ".claim").exists():
        return None  # never claimed; and a look creates no folder
    claim = claim_cell(folder)
    if claim is not None:
        claim.release()
        return None
    holder = read_json(folder / ".claim")
    return f"process {holder['pid']} on {holder['host']}" if isinstance(holder, dict) and holder else "a process"


def local_job_alive(record):
    """Whether a local job's controller still lives: on this host, a live process of that id running submitit's
    controller (a dead one's id may have been reused)."""
    if record["host"] != socket.gethostname():
        return False
    try:
        return b"submitit.local._local" in Path(f"/proc/{record['job_id']}/cmdline").read_bytes()
    except OSError:
        return False


def slurm_job_states(out, job_ids):
    """sacct's state of each SLURM job (one call for them all, through submitit)."""
    submitit = import_submitit()
    jobs = [submitit.SlurmJob(out / JOBS_FOLDER, job_id) for job_id in job_ids]  # registering them first: one call
    return {job.job_id: job.state for job in jobs}


def job_status(out, records):
    """For each job record: (whether the job will still run its cell, what its scheduler says of it)."""
    slurm_ids = {record["job_id"] for record in records if record["launcher"] == "slurm"}
    slurm = slurm_job_states(out, slurm_ids) if slurm_ids else {}
    status = []
    for record in records:
        if record["launcher"] == "local":
            alive = local_job_alive(record)
            status.append((alive, "running" if alive else "ended"))
            continue
        state = slurm.get(record["job_id"], "UNKNOWN").split()[0]  # "CANCELLED by 1234"
        recent = time.time() - record["submitted"] < UNKNOWN_JOB_GRACE_S
        status.append((state in SLURM_WAITING_STATES or (state == "UNKNOWN" and recent), state))
    return status


def cell_states(out, epochs):
    """The state of every cell of `epochs` (cell -> its epochs), in that order: done; running (its claim is held);
    queued (its job will still run it); failed (its last run failed, after its last job was submitted); lost (its
    job ended without finishing it: killed, cancelled, timed out too often); waiting (no job: never started, or
    stopped with a runner of --launcher here)."""
    out = Path(out)
    records = {cell: read_json(out / cell.folder / JOB_RECORD) for cell in epochs}
    with_jobs = [cell for cell in epochs if records[cell] is not None]
    status = dict(zip(with_jobs, job_status(out, [records[cell] for cell in with_jobs])))
    states = {}
    for cell, cell_epochs in epochs.items():
        folder, record = out / cell.folder, records[cell]
        epoch_records = read_metrics(folder)
        job = f"{record['launcher']} job {record['job_id']} {status[cell][1]}" if record is not None else ""
        failed = read_json(folder / "failed.json")
        if is_done(folder, cell_epochs):
            name, detail = "done", f"top-1 {epoch_records[-1]['val_top1']:.2f}" if epoch_records else ""
        elif (holder := claim_holder(folder)) is not None:
            name, detail = "running", f"by {holder}"
        elif record is not None and status[cell][0]:
            name, detail = "queued", job
        elif failed is not None and (record is None or failed["time"] >= record["submitted"]):
            name, detail = "failed", f"exit {failed['exit']}: {failed['reason']}"
        elif record is not None:
            name, detail = "lost", f"{job} (log: {record['log']})"
        else:
            name, detail = "waiting", ""
        states[cell] = CellState(name, len(epoch_records), detail)
    return states


def progress_report(out, epochs, states):
    """The cells' states as a table of lines: state, epochs, the training time each still needs, detail; then a
    summary."""
    left = [cell for cell in epochs if states[cell].name != "done"]
    seconds = time_left(out, epochs, left)
    rows = [("cell", "state", "epochs", "time left", "")]
    for cell, state in states.items():
        needed = seconds.get(cell)
        rows.append((str(cell), state.name, f"{state.epochs_done}/{epochs[cell]}",
                     "" if needed is None else format_duration(needed), state.detail))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = ["  " + "  ".join(text.ljust(width) for text, width in zip(row, widths)) + "  " + row[4] for row in rows]
    counts = [f"{count} {name}" for name in CELL_STATES
              if (count := sum(state.name == name for state in states.values()))]
    work = sum(value for value in seconds.values() if value is not None)
    lines.append(f"{progress_line(out, epochs)} ({', '.join(counts)})"
                 + (f"; about {format_duration(work)} of training left in all" if work else ""))
    return "\n".join(line.rstrip() for line in lines)


def print_progress(out, epochs, grid):
    """Each cell's state, epochs and the time it still needs, then the table so far (nothing is written). Returns the
    table's rows."""
    print(progress_report(out, epochs, cell_states(out, epochs)), flush=True)
    rows = table_rows(out, grid["published_baselines"])
    print(f"\n{markdown_table(rows, grid, progress_line(out, epochs))}", flush=True)
    return rows


def report_if_started(out, epochs, states, say):
    """The progress report, when some cell of the grid was started before (rerunning a command shows where it is)."""
    if any(state.name != "waiting" or state.epochs_done for state in states.values()):
        say("the grid so far:\n" + progress_report(out, epochs, states))


# ----------------------------------------------------------------------------------------------------------------------
# Local jobs.


@dataclass
class LocalCellJob:
    cell: Cell
    job: object  # submitit's LocalJob
    started: float  # time.monotonic()


class LocalRunner:
    """Runs the grid's cells (commands[c], done after epochs[c] epochs) as submitit local jobs, one per slot of
    `placement` at a time, each stopped and requeued after `time_min` minutes (submitit's checkpoint hook): the
    same path as SLURM's jobs, on this machine. Cells that another process runs (a runner, a job of an earlier
    launch) are waited for."""

    def __init__(self, out, commands, epochs, grid, placement, time_min):
        submitit = import_submitit()
        self.out, self.commands, self.epochs, self.grid, self.placement = Path(out), commands, epochs, grid, placement
        self.cells = list(commands)
        self.executor = submitit.LocalExecutor(self.out / JOBS_FOLDER)
        self.executor.update_parameters(timeout_min=time_min)
        self.start = time.time()
        self.jobs = {}  # slot index -> LocalCellJob
        self.last_status = time.monotonic()

    @staticmethod
    def say(text):
        print(text, flush=True)

    def folder(self, cell):
        return self.out / cell.folder

    def settled(self, cell):
        """Done, or failed in this launch (retried by the next one)."""
        return is_done(self.folder(cell), self.epochs[cell]) or failed_since(self.folder(cell), self.start)

    def run(self):
        """Run cells until every one is done or failed; returns those that failed. Stopped (Ctrl-C, SIGTERM), it
        cancels its jobs, each run keeping its last checkpoint, and exits."""
        report_if_started(self.out, self.epochs, cell_states(self.out, self.epochs), self.say)
        run_until_stopped(self.run_all, self.stop, self.say)
        return [cell for cell in self.cells if failed_since(self.folder(cell), self.start)]

    def run_all(self):
        waiting_said = False
        while True:
            self.reap()
            self.fill_slots()
            if not self.jobs:
                left = [cell for cell in self.cells if not self.settled(cell)]
                if not left:
                    return
                if not waiting_said:
                    self.say(f"waiting for {len(left)} cell(s) that other processes run")
                    waiting_said = True
            if time.monotonic() - self.last_status >= STATUS_EVERY_S:
                self.status()
            time.sleep(POLL_S)

    def fill_slots(self):
        free = [index for index in range(len(self.placement.slots)) if index not in self.jobs]
        if not free:
            return
        busy = {running.cell for running in self.jobs.values()}
        candidates = {cell: self.epochs[cell] for cell in self.cells if cell not in busy and not self.settled(cell)}
        for cell, state in cell_states(self.out, candidates).items():
            if state.name in RESUBMITTED_STATES and free:
                self.submit(free.pop(0), cell, state)

    def submit(self, slot_index, cell, state):
        slot = self.placement.slots[slot_index]
        job = CellJob(self.out.resolve(), cell, self.commands[cell], self.epochs[cell], self.grid, self.epochs, slot,
                      self.placement.threads)
        submitted = time.time()
        with rankkd_importable_by_jobs():
            local_job = self.executor.submit(job)
        write_job_record(self.folder(cell), "local", local_job, submitted)
        self.jobs[slot_index] = LocalCellJob(cell, local_job, time.monotonic())
        where = f"GPU {slot}" if slot is not None else "CPU"
        resumed = f", from epoch {state.epochs_done}" if state.epochs_done else ""
        self.say(f"start {cell} as local job {local_job.job_id} on {where}{resumed} "
                 f"(log: {self.folder(cell) / 'train.log'})")

    def reap(self):
        for slot_index, running in list(self.jobs.items()):
            if running.job.done():
                del self.jobs[slot_index]
                self.finish(running)

    def finish(self, running):
        """Report an ended job's cell; one that the job left unfinished without a mark (the job was killed, or
        stopped from outside) is marked failed, so that this launch does not retry it."""
        cell, folder, job = running.cell, self.folder(running.cell), running.job
        try:  # no result: killed (submitit would wait for one); an error: the job itself crashed, as its log says
            outcome = job.result() if job.paths.result_pickle.exists() else None
        except Exception:
            outcome = None
        if outcome == "elsewhere":
            return  # another process took the cell first: waited for
        if is_done(folder, self.epochs[cell]):
            self.say(f"{done_line(cell, read_metrics(folder), time.monotonic() - running.started)} | "
                     f"{progress_line(self.out, self.epochs)}{self.eta()}")
            return
        failed = failed_since(folder, self.start)
        if failed is None:
            reason = f"its job ended without a result (killed?), the job's log: {job.paths.stderr}"
            failed = {"exit": "none", "reason": mark_failed(folder, "none", reason)}
        self.say(f"FAILED {cell}, exit {failed['exit']}: {failed['reason']} (log: {folder / 'train.log'})")

    def eta(self):
        left = [cell for cell in self.cells if not self.settled(cell)]
        return eta(self.out, self.epochs, left, len(self.placement.slots))

    def status(self):
        self.last_status = time.monotonic()
        running = [f"{running.cell} epoch {len(read_metrics(self.folder(running.cell)))}/{self.epochs[running.cell]}"
                   for running in self.jobs.values()]
        self.say(f"status: {'; '.join(running) or 'no job of this launch running'} | "
                 f"{progress_line(self.out, self.epochs)}{self.eta()}")

    def stop(self):
        """Cancel this launch's jobs (each run keeps its last checkpoint) and wait for them."""
        for running in self.jobs.values():
            running.job.cancel()
        for running in self.jobs.values():
            deadline = time.monotonic() + 60
            while not running.job.done() and time.monotonic() < deadline:
                time.sleep(0.1)
            self.say(f"stopped {running.cell}: {len(read_metrics(self.folder(running.cell)))} epoch(s) kept")
        self.jobs.clear()


# ----------------------------------------------------------------------------------------------------------------------
# SLURM.


def slurm_executor(out, parameters):
    """submitit's SlurmExecutor for the grid's jobs, with `parameters` (its update_parameters names), checked before
    anything is submitted."""
    submitit = import_submitit()
    try:
        executor = submitit.SlurmExecutor(folder=Path(out).resolve() / JOBS_FOLDER)
    except RuntimeError:  # submitit looks for srun
        raise ValueError("--launcher slurm: no srun on PATH; submit from a machine of the SLURM cluster (a login "
                         "node)") from None
    try:
        executor.update_parameters(**parameters)
    except ValueError as error:  # submitit's message lists every parameter on lines of their own
        raise ValueError(f"--slurm: {str(error).splitlines()[0]} (parameters of submitit's SlurmExecutor: "
                         f"{', '.join(sorted(executor._valid_parameters()))})") from None
    return executor


def submit_slurm(executor, out, commands, epochs, grid):
    """Report the grid's progress, then submit its cells that need a job (failed, lost or waiting) as one job array.
    Returns the cells submitted."""
    out = Path(out)
    states = cell_states(out, epochs)
    report_if_started(out, epochs, states, print)
    cells = [cell for cell, state in states.items() if state.name in RESUBMITTED_STATES]
    if not cells:
        return []
    jobs = [CellJob(out.resolve(), cell, commands[cell], epochs[cell], grid, epochs) for cell in cells]
    submitted = time.time()
    with rankkd_importable_by_jobs(), executor.batch():
        slurm_jobs = [executor.submit(job) for job in jobs]
    for cell, slurm_job in zip(cells, slurm_jobs):
        write_job_record(out / cell.folder, "slurm", slurm_job, submitted)
    array = slurm_jobs[0].job_id.split("_")[0]
    cap = executor.parameters.get("array_parallelism")
    print(f"submitted {len(cells)} cell(s) as SLURM job {array}"
          + (f" (an array, at most {min(cap, len(cells))} at once)" if len(cells) > 1 and cap else "")
          + f": {', '.join(str(cell) for cell in cells[:3])}{' ...' if len(cells) > 3 else ''}", flush=True)
    return cells


def parse_parameter(text):
    """KEY=VALUE of --slurm: VALUE as JSON when it reads as JSON (numbers, lists, objects), else as a string."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise ValueError
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
