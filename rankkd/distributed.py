"""Distributed set-up: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and the rendezvous address); plain `python` is
one process. The collectives here are no-ops for one process, so the loop calls them unconditionally."""
import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

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
    """Leave the process group once the objects that hold it (DDP's reducer, kept by reference cycles) are gone: a
    process group freed later, at interpreter exit, can take gloo's threads down with it ("terminate called without
    an active exception", SIGABRT)."""
    if dist.is_initialized():
        gc.collect()
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


def all_gather_objects(obj):
    """Every process's `obj`, in rank order (a collective: all ranks call it)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
