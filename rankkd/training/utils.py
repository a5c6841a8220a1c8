"""The plumbing of a training script, kept out of it so that train/imagenet.py reads top to bottom: distributed
set-up, run folders (writable, one run at a time), checkpoints that survive a kill and are checked when read,
learning-rate schedules, metrics files and a rank-0 progress display."""
import datetime
import fcntl
import importlib.util
import json
import math
import os
import random
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rankkd._torchfile import load_torch_file

# ---------------------------------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and the rendezvous address); plain `python` is one process.


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device="auto"):
    """Join the torchrun process group when there is one (NCCL for CUDA devices, gloo for the CPU) and pick this
    process's device: cuda:LOCAL_RANK, or the CPU. `device` is "auto", "cuda" or "cpu"."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, local_rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum `tensor` over all processes in place (a no-op for one process); returns it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(obj):
    """Rank 0's `obj` on every process."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def average_buffers(model):
    """Average the floating-point buffers (BatchNorm running statistics) over processes, so that every rank holds
    the same model and the statistics come from all ranks' data. DDP keeps the parameters in step itself."""
    if not dist.is_initialized():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer.div_(dist.get_world_size())


# ---------------------------------------------------------------------------------------------------------------------
# Folders: proven writable before any work starts, and written by one run at a time.


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
    until that process is done. Within one process the lock nests: taking it again while held is a no-op (the demo
    teacher is trained under its cache folder's lock by a run that locks the same folder). A forked child (a loader
    worker) closes its copies of the descriptors at once, so the lock goes with the process that took it, even when a
    worker outlives it for a while. `what` names the folder in messages ("--out", "cache"); `name` is the lock file's
    name, for a second lock on one folder (the grid runner's claim on a cell, beside the trainer's own lock)."""

    _held = {}  # lock file's real path -> [file descriptor, nesting depth], for this process
    file_name = ".lock"

    def __init__(self, folder, *, wait=False, what="folder", name=file_name):
        self.folder, self.wait, self.what, self.file_name = Path(folder), wait, what, name
        self._key = None

    def acquire(self):
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._key = os.path.realpath(self.folder / self.file_name)
            if self._key in RunLock._held:
                RunLock._held[self._key][1] += 1
                return self
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
        RunLock._held[self._key] = [descriptor, 1]
        return self

    def release(self):
        held = RunLock._held[self._key]
        held[1] -= 1
        if held[1] == 0:
            del RunLock._held[self._key]
            os.ftruncate(held[0], 0)  # no claim left behind for the next process to misread as its holder's
            os.close(held[0])  # closing the last descriptor drops the flock

    @staticmethod
    def _forget_in_forked_child():
        for descriptor, _depth in RunLock._held.values():
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


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: written atomically, holding everything needed to continue as if never stopped.


def write_atomically(path, write):
    """Call write(file) on a temporary file in path's folder, flush it to disk, then rename it over `path`: a kill at
    any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically."""
    write_atomically(path, lambda file: torch.save(state, file))


def copy_atomically(source, destination):
    """Copy a file so that `destination` is never seen half-written."""
    write_atomically(destination, lambda file: file.write(Path(source).read_bytes()))


# What every checkpoint of the trainers in train/ holds (with "scaler", "best" and "last_record" beside them).
CHECKPOINT_KEYS = ("student", "optimizer", "epoch", "config", "rng")


def load_checkpoint(path, required_keys=CHECKPOINT_KEYS):
    """A checkpoint written by save_checkpoint, read safely (tensors and plain values only). A one-line ValueError
    names the file and says what is wrong: missing, empty, truncated, not a torch.save file, or not a checkpoint of
    these trainers (not a dict holding `required_keys`)."""
    state = load_torch_file(path, "checkpoint")
    missing = [key for key in required_keys if key not in state] if isinstance(state, dict) else list(required_keys)
    if missing:
        if not isinstance(state, dict):
            held = f"it holds a {type(state).__name__}; "
        elif state and all(isinstance(value, torch.Tensor) for value in state.values()):
            held = "it holds model weights only; "
        else:
            held = ""
        raise ValueError(f"checkpoint {str(path)!r} is not a rankkd training checkpoint ({held}missing keys "
                         f"{', '.join(missing)})")
    return state


def rng_state():
    """This process's random number generator states as plain Python values: they pass through all_gather_object
    and torch.load(weights_only=True) alike."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, cached_gaussian),
            "torch": torch.get_rng_state().tolist(),
            "cuda": [state.tolist() for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(cuda_state, dtype=torch.uint8) for cuda_state in state["cuda"]])


def all_gather_objects(obj):
    """Every process's `obj`, in rank order (a collective: all ranks call it)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rng_states():
    """Every process's RNG state, in rank order (a collective: all ranks call it)."""
    return all_gather_objects(rng_state())


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedules, as functions of the (fractional) epoch so that resuming needs only the step count.


def learning_rate(epoch, *, schedule, lr, epochs, warmup_epochs=0.0, warmup_lr=0.0, milestones=(), decay=0.1,
                  min_lr=0.0):
    """The learning rate at fractional `epoch` (step / steps per epoch).

    A linear warm-up from `warmup_lr` to `lr` over the first `warmup_epochs`, then
      "step":   lr * decay ** (number of milestones passed)              (the ImageNet recipe: x0.1 at 30, 60, 90)
      "cosine": min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2     (DeiT: to min_lr at the last epoch)"""
    if epoch < warmup_epochs:
        return warmup_lr + (lr - warmup_lr) * epoch / warmup_epochs
    if schedule == "step":
        return lr * decay ** sum(epoch >= milestone for milestone in milestones)
    if schedule == "cosine":
        progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Metrics: one JSON line per epoch in metrics.jsonl, and TensorBoard scalars when tensorboard is installed.


class MetricsLog:
    """Appends one JSON object per epoch to DIR/metrics.jsonl (and TensorBoard events when tensorboard is
    installed). Opened for a run resumed after `resumed_epochs` epochs, it first drops lines of later epochs,
    which a run killed between logging and checkpointing leaves behind."""

    def __init__(self, out_dir, resumed_epochs=0):
        self.path = Path(out_dir) / "metrics.jsonl"
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["epoch"] <= resumed_epochs]
        write_atomically(self.path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))
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


# ---------------------------------------------------------------------------------------------------------------------
# Progress: tqdm's bar on a terminal when tqdm is installed, else one printed line per update; only on rank 0.


def format_duration(seconds):
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress through `total` steps: `update(done, text)` shows the text (loss, img/s) and the time left."""

    def __init__(self, total, description, enabled=True):
        self.total, self.description, self.enabled = total, description, enabled
        self.start = time.perf_counter()
        self.bar = None
        # A bar redraws with carriage returns: in a log file (a grid cell's train.log, a cluster job) plain lines read
        # better.
        if enabled and sys.stdout.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, dynamic_ncols=True, leave=False, file=sys.stdout)

    def update(self, done, text):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (self.total - done) if done else 0.0
        print(f"{self.description} [{done:>{len(str(self.total))}}/{self.total}] {text}  "
              f"ETA {format_duration(left)}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
