"""Checkpoints: written atomically, holding everything needed to continue as if never stopped (weights, optimizer,
settings and every process's random streams), and checked when read."""
import os
import random
from pathlib import Path

import numpy as np
import torch

from rankkd._torchfile import load_torch_file
from rankkd.distributed import all_gather_objects

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


def previous_checkpoint(path):
    """Where save_checkpoint(..., keep_previous=True) keeps the checkpoint that `path` held before: previous.pt
    beside last.pt."""
    path = Path(path)
    return path.with_name(f"previous{path.suffix}")


def save_checkpoint(state, path, *, keep_previous=False):
    """torch.save `state` to `path` atomically. keep_previous: the checkpoint it replaces becomes
    previous_checkpoint(path) first (a rename: atomic, no copy), the one to continue from should `path` be found
    damaged. A kill between the rename and the write leaves previous.pt alone, which resuming reads as well."""
    path = Path(path)
    if keep_previous and path.exists():
        os.replace(path, previous_checkpoint(path))
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


def gather_rng_states():
    """Every process's RNG state, in rank order (a collective: all ranks call it)."""
    return all_gather_objects(rng_state())


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
