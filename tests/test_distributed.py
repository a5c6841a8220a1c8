"""rankkd.distributed: one process (collectives are no-ops that hand their inputs back), two processes on gloo (the
collectives as torchrun's ranks see them), and init_distributed's checks."""
import os
import re
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rankkd.distributed import (DistEnv, all_gather_objects, all_reduce_sum, average_buffers, barrier,
                                broadcast_object, cleanup_distributed, init_distributed)

WORLD_SIZE = 2


def test_one_process_collectives_hand_back_their_inputs():
    assert not dist.is_initialized()
    tensor = torch.randn(5, 3, dtype=torch.float64)
    expected = tensor.clone()
    assert all_reduce_sum(tensor) is tensor and torch.equal(tensor, expected)
    payload = {"metrics": [1.5, 2.5], "rank": 0}
    assert broadcast_object(payload) is payload
    gathered = all_gather_objects(payload)
    assert gathered == [payload] and gathered[0] is payload
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.normal_()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    average_buffers(model)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    barrier()
    cleanup_distributed()
    assert not dist.is_initialized()


def test_init_distributed_alone_is_one_process_on_the_cpu(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed("cpu")
    assert env == DistEnv(0, 0, 1, torch.device("cpu")) and env.is_main and not dist.is_initialized()
    if not torch.cuda.is_available():
        assert init_distributed("auto").device == torch.device("cpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:0", "CPU", None])
def test_init_distributed_refuses_an_unknown_device(device):
    with pytest.raises(ValueError, match=f"^{re.escape(f'--device must be auto, cuda or cpu, got {device!r}')}$"):
        init_distributed(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible CUDA device")
def test_init_distributed_refuses_cuda_without_a_device():
    with pytest.raises(ValueError, match="^--device cuda: no CUDA device is visible to this process$"):
        init_distributed("cuda")


def _rank_tensor(rank):
    return torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + rank))


def _rank_statistics(rank):
    generator = torch.Generator().manual_seed(2000 + rank)
    return torch.randn(6, generator=generator), torch.rand(6, generator=generator) + 0.5


def _worker(rank, port, marker):
    """One rank of a torchrun-style job: the environment torchrun sets, then every collective checked against what
    the ranks' inputs (known to all ranks from their seeds) say it must give."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE))
    env = init_distributed("cpu")
    try:
        assert env == DistEnv(rank, rank, WORLD_SIZE, torch.device("cpu")) and env.is_main == (rank == 0)
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == WORLD_SIZE

        tensor = _rank_tensor(rank)
        assert all_reduce_sum(tensor) is tensor  # in place
        torch.testing.assert_close(tensor, sum(_rank_tensor(r) for r in range(WORLD_SIZE)), rtol=1e-15, atol=0)

        assert broadcast_object({"from": rank, "items": list(range(rank + 3))}) == {"from": 0, "items": [0, 1, 2]}
        assert all_gather_objects(("rank", rank, [rank] * rank)) == [("rank", r, [r] * r) for r in range(WORLD_SIZE)]

        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))
        torch.manual_seed(rank)  # the parameters differ between ranks; DDP would keep them in step, not this
        model[0].reset_parameters()
        weight = model[0].weight.detach().clone()
        norm = model[1]
        norm.running_mean.copy_(_rank_statistics(rank)[0])
        norm.running_var.copy_(_rank_statistics(rank)[1])
        norm.num_batches_tracked.fill_(10 + rank)
        average_buffers(model)
        means, variances = zip(*(_rank_statistics(r) for r in range(WORLD_SIZE)))
        torch.testing.assert_close(norm.running_mean, sum(means) / WORLD_SIZE, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(norm.running_var, sum(variances) / WORLD_SIZE, rtol=1e-6, atol=1e-7)
        assert norm.num_batches_tracked.item() == 10 + rank  # an integer buffer: left alone
        assert torch.equal(model[0].weight, weight)  # parameters: left alone

        # Rank 1 reaches the barrier late, after writing the marker; rank 0 finds it written once the barrier lets
        # it through.
        if rank == 1:
            time.sleep(0.5)
            with open(marker, "w") as file:
                file.write("written before the barrier")
        barrier()
        assert os.path.exists(marker)
    finally:
        cleanup_distributed()
    assert not dist.is_initialized()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_collectives_across_two_gloo_processes(tmp_path):
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp_path / "marker")), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    # A hang guard, not a timing check: a collective that never completes fails the test instead of blocking CI.
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):  # raises ProcessRaisedException with the rank's traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 180 s")
