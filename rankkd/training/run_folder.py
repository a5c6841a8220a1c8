"""A run's folder: proven writable before any work starts, written by one run at a time (RunLock), and its
metrics.jsonl."""
import contextlib
import errno
import fcntl
import importlib.util
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

from rankkd.training.checkpoint import copy_atomically, load_checkpoint, previous_checkpoint, write_atomically
from rankkd.training.config import changed_settings, flat_settings, record
from rankkd.distributed import all_reduce_sum, barrier

def _not_writable(what, folder, error):
    """A ValueError naming `folder` (as `what`, say "--out") and why `error` (an OSError) stopped a write there."""
    folder = Path(folder)
    in_the_way = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if in_the_way is not None and not in_the_way.is_dir():
        reason = f"{in_the_way} is a file, not a folder"
    else:
        reason = error.strerror or str(error)
    return ValueError(f"{what} {folder} is not writable: {reason}")


def check_writable(folder, what="folder"):
    """Create `folder` (and its parents) when missing, and prove that files can be made in it by creating and
    removing one; returns it as a Path. A ValueError "{what} {folder} is not writable: {reason}" otherwise, so that
    a run finds out before it spends any time, not when it writes its first checkpoint."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise _not_writable(what, folder, error) from None
    return folder


class FolderInUseError(ValueError):
    """Another process holds the lock of the folder a run was going to write into."""


class RunLock:
    """An exclusive lock on a folder, for as long as one run writes into it: flock on FOLDER/.lock, which the kernel
    drops when the holding process ends, however it ends, so a crash leaves no stale lock behind. The holder writes
    its PID, host and start time into the lock file for others' messages.

    Take it (`with RunLock(folder): ...`, or acquire()/release()) before writing anything into the folder; it creates
    the folder when missing. When another process holds the lock, wait=False raises a FolderInUseError at once,
    naming the folder and that process; wait=True (a cache that runs share) says once whom it waits for, then blocks
    until that process is done. A forked child (a loader
    worker) closes its copies of the descriptors at once, so the lock goes with the process that took it, even when a
    worker outlives it for a while. `what` names the folder in messages ("--out", "cache"); `name` is the lock file's
    name, for a second lock on one folder (the grid runner's claim on a cell beside its run's lock; a demo teacher's
    cache entry beside the lock of the run that trains it there)."""

    _held = {}  # lock file's real path -> file descriptor, for this process
    file_name = ".lock"

    def __init__(self, folder, *, wait=False, what="folder", name=file_name):
        self.folder, self.wait, self.what, self.file_name = Path(folder), wait, what, name
        self._key = None

    def acquire(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._key = os.path.realpath(self.folder / self.file_name)
            descriptor = os.open(self._key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _not_writable(self.what, self.folder, error) from None
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                if not self.wait:
                    raise FolderInUseError(f"{self.what} {self.folder} is in use by {holder}: wait for that run to "
                                           "finish, or use another folder") from None
                print(f"{self.what} {self.folder} is in use by {holder}: waiting for it to finish", file=sys.stderr,
                      flush=True)
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        except BaseException:  # the refusal, an interrupted wait: the descriptor must not outlive them
            os.close(descriptor)
            raise
        RunLock._held[self._key] = descriptor
        return self

    def release(self):
        descriptor = RunLock._held.pop(self._key)
        os.ftruncate(descriptor, 0)  # no claim left behind for the next process to misread as its holder's
        os.close(descriptor)  # closing the last descriptor drops the flock

    @staticmethod
    def _forget_in_forked_child():
        for descriptor in RunLock._held.values():
            os.close(descriptor)  # the parent's descriptor, and with it the lock, stays open
        RunLock._held.clear()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()

    def _holder(self):
        """The holder as "process PID on HOST (since TIME)". It writes that just after it takes the lock, so an
        empty file is a holder about to write: read again for a moment before settling for "another process"."""
        for _ in range(20):
            try:
                holder = json.loads(Path(self._key).read_text() or "null")
            except (OSError, ValueError):
                holder = None
            if isinstance(holder, dict) and holder:
                return f"process {holder['pid']} on {holder['host']} (since {holder['since']})"
            time.sleep(0.05)
        return "another process"


os.register_at_fork(after_in_child=RunLock._forget_in_forked_child)


def read_metrics(path):
    """The records of a metrics.jsonl (none if it does not exist) and whether its last line was cut short (a run
    stopped while writing it, or the file lost its end). Any other unreadable line is a ValueError naming the file
    and line."""
    path = Path(path)
    if not path.exists():
        return [], False
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError("no epoch")
        except ValueError:
            if number == len(lines):
                return records, True
            raise ValueError(f"{path} line {number} is not an epoch record: {line[:60]!r}") from None
        records.append(record)
    return records, False


class MetricsLog:
    """Appends one JSON object per epoch to DIR/metrics.jsonl (and TensorBoard events when tensorboard is
    installed). Opened for a run resumed after `resumed_epochs` epochs, whose checkpoint holds `resumed_record` (that
    epoch's record), it first drops lines of later epochs, which a run killed between logging and checkpointing
    leaves behind, and writes the checkpoint's record back when the file lacks it (its line was cut short): the
    file then holds every epoch the checkpoint does."""

    def __init__(self, out_dir, resumed_epochs=0, resumed_record=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        records, cut_short = read_metrics(self.path)
        kept = [record for record in records if record["epoch"] <= resumed_epochs]
        rebuilt = bool(resumed_record) and resumed_record["epoch"] == resumed_epochs and (
            not kept or kept[-1]["epoch"] < resumed_epochs)
        if rebuilt:
            kept.append(resumed_record)
        if cut_short:
            print(f"{self.path}: its last line was cut short (a run stopped while writing it); "
                  + (f"rebuilt epoch {resumed_epochs}'s record from the checkpoint" if rebuilt else "dropped it"),
                  file=sys.stderr)
        elif rebuilt:
            print(f"{self.path} lacked epoch {resumed_epochs}: rebuilt its record from the checkpoint", file=sys.stderr)
        lines = "".join(json.dumps(record) + "\n" for record in kept)
        write_atomically(self.path, lambda file: file.write(lines.encode()))
        self.tensorboard = None
        if importlib.util.find_spec("tensorboard") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:  # an incomplete install: metrics.jsonl still has everything
                print(f"TensorBoard events off: {error}", file=sys.stderr)
            else:
                self.tensorboard = SummaryWriter(out_dir, purge_step=resumed_epochs + 1)

    def write(self, record):
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
            file.flush()
            os.fsync(file.fileno())
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["epoch"])
            self.tensorboard.flush()

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()


class DiskFullError(RuntimeError):
    """The disk filled up while a run wrote into its folder."""


def checkpoint_to_continue_from(out):
    """The checkpoint that a run in folder `out` continues from, as (path, state, note); None when it holds none.
    That is last.pt, or previous.pt (the one before it) when last.pt is missing (a run stopped while replacing it)
    or cannot be read (damaged, cut short): the note then says why, and which epoch the run continues from. A
    ValueError of one line names the file and the problem when neither can be read."""
    last = Path(out) / "last.pt"
    previous = previous_checkpoint(last)
    if not (last.exists() or previous.exists()):
        return None
    if last.exists():
        try:
            return last, load_checkpoint(last), None
        except ValueError as error:
            problem = str(error)
    else:
        problem = f"{last} is missing (a run stopped while replacing it)"
    if not previous.exists():
        raise ValueError(f"{problem}; there is no previous.pt to fall back to")
    try:
        state = load_checkpoint(previous)
    except ValueError as error:
        raise ValueError(f"{problem}; and {error}") from None
    return previous, state, f"{problem}: continuing from {previous}, which holds epoch {state['epoch']}"


def saved_progress(out):
    """What a run that stops now leaves behind, in one sentence."""
    try:
        found = checkpoint_to_continue_from(out)
    except ValueError as error:
        return f"nothing to continue from: {error}."
    if found is None:
        return "no checkpoint had been written yet."
    path, state, _ = found
    return f"{path} holds epoch {state['epoch']}{', the last completed one' if path.name == 'last.pt' else ''}."


@contextlib.contextmanager
def stop_on_full_disk(out):
    """Turn a full disk (or quota) while writing into the run's folder into a DiskFullError saying what was kept.
    Every file is written atomically, so what was there before stays whole."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(f"no space left on the device while writing into {out}: {saved_progress(out)} Free some "
                            "space, then continue with --resume auto.") from None


def write_on_main(env, out, write):
    """write() on rank 0, inside the run's folder `out`; returns what it returns there (None elsewhere). A collective:
    every rank calls it, and a full disk on rank 0 raises DiskFullError on every rank, which would otherwise train on
    until their next collective waits for rank 0 forever."""
    result, error = None, None
    if env.is_main:
        try:
            with stop_on_full_disk(out):
                result = write()
        except DiskFullError as caught:
            error = caught
    if all_reduce_sum(torch.tensor([float(error is not None)], device=env.device)).item():
        raise error or DiskFullError(f"rank 0 ran out of disk space while writing into {out}; stopped with it.")
    return result


def open_run_folder(task, cfg, env):
    """The run's folder, its lock (rank 0; None elsewhere), the checkpoint to continue from (None: a fresh start) and
    the experiment settings that differ from the checkpoint's (allowed by --allow-changed-settings only). Never
    overwrites a run silently, and never shares its folder: a second run on it stops at once."""
    out = Path(cfg.job.out)
    lock = RunLock(out, what="--out").acquire() if env.is_main else None  # before anything is written there
    try:
        state, changed = _checkpoint_to_continue(task, cfg, env, out)
    except BaseException:  # refused: the folder is free again at once, for this process too
        if lock is not None:
            lock.release()
        raise
    return out, lock, state, changed


def _checkpoint_to_continue(task, cfg, env, out):
    last = out / "last.pt"
    if not (last.exists() or previous_checkpoint(last).exists()):
        return None, []
    if not cfg.job.resume:
        raise ValueError(f"{out} already holds a run (last.pt): continue it with --resume auto, or pick another --out")
    path, state, note = checkpoint_to_continue_from(out)
    changed = changed_settings(task, flat_settings(state["config"]), flat_settings(record(cfg)))
    if changed and not cfg.job.allow_changed_settings:
        raise ValueError(f"{out} holds a run with other settings ({'; '.join(changed)}): pick another --out, or "
                         "continue it anyway with --allow-changed-settings")
    if note is not None:
        _fall_back(path, state, note, env)
    if changed and env.is_main:
        print(f"resuming with changed settings: {'; '.join(changed)}")
    return state, changed


def _fall_back(previous, state, note, env):
    """Continuing from previous.pt: last.pt becomes a copy of it (a damaged one kept for a look as
    last.pt.damaged), so that the folder reads as if the run had stopped after that epoch: the next checkpoint turns
    it into previous.pt, not the damaged file. A best.pt of a later epoch goes too: that epoch is trained again.
    Once every rank has read its checkpoint."""
    barrier()
    if not env.is_main:
        return
    last, best = previous.with_name("last.pt"), previous.with_name("best.pt")
    if last.exists():
        os.replace(last, last.with_name(f"{last.name}.damaged"))
        note += f" (the damaged file is kept as {last.name}.damaged)"
    copy_atomically(previous, last)
    if best.exists() and _epoch_of(best) > state["epoch"]:
        best.unlink()
        note += "; best.pt, of an epoch after it, is dropped"
    print(note, file=sys.stderr, flush=True)


def _epoch_of(path):
    try:
        return load_checkpoint(path)["epoch"]
    except ValueError:
        return math.inf  # an unreadable best.pt is no best either
