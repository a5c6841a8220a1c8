"""Multi-node training the torchrun way, on this machine: two "nodes" (two torchrun agents of one process each that
meet through c10d rendezvous; gloo on the CPU), one of whose workers is killed mid-run so that the elastic agents
restart them (--max-restarts 1), train as one node of two processes does: every epoch once, from the last checkpoint
on, to the same numbers and weights. The CIFAR-100 trainer on tiny synthetic data (resnet8, 3 steps an epoch)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train" / "cifar100.py"
EPOCHS = 4
# --resume auto from the start: a restarted worker group continues the run instead of refusing its folder.
ARGS = ["--data", "synthetic", "--steps-per-epoch", "3", "--batch-size", "8", "--teacher", "resnet8", "--student",
        "resnet8", "--teacher-weights", "random", "--device", "cpu", "--deterministic", "--log-every", "3",
        "--epochs", str(EPOCHS), "--resume", "auto"]
TIMING = ("epoch_time_s", "train_img_s")


def environment():
    # One thread per process in every layout (torchrun sets it only for several processes per node): CPU kernels
    # then sum in the same order. The rendezvous store not shared with the workers, as the README says for restarts.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *map(str, args)]


def metrics(out):
    return [{key: value for key, value in json.loads(line).items() if key not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out, expected):
    """Every epoch once, with the numbers and final weights of the run in `expected`."""
    assert [record["epoch"] for record in metrics(out)] == list(range(1, EPOCHS + 1))
    assert metrics(out) == metrics(expected)
    weights, expected_weights = (torch.load(folder / "last.pt", weights_only=True)["student"]
                                 for folder in (out, expected))
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[name], expected_weights[name]) for name in expected_weights)


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The run on one node of two processes."""
    out = tmp_path_factory.mktemp("one-node") / "run"
    result = subprocess.run(torchrun("--standalone", "--nproc_per_node", 2, TRAINER, *ARGS, "--out", out),
                            env=environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_two_nodes_with_a_worker_killed_train_as_one_node_of_two_processes(one_node, tmp_path):
    """Two agents of one process each meet through c10d rendezvous; after epoch 1 the worker of rank 0 is killed, both
    agents restart their workers (--max-restarts 1), which meet again and continue from the last checkpoint. The run
    ends with every epoch once and the numbers and weights of the uninterrupted run on one node."""
    out = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(torchrun("--nnodes", 2, "--nproc_per_node", 1, "--rdzv-backend", "c10d",
                                       "--rdzv-endpoint", endpoint, "--rdzv-id", "multinode-test", "--max-restarts", 1,
                                       TRAINER, *ARGS, "--out", out),
                              env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists():  # written whole (renamed into place): epoch 1 is saved
            assert all(node.poll() is None for node in nodes) and time.monotonic() < deadline, "epoch 1 never ended"
            time.sleep(0.02)
        os.kill(json.loads((out / ".lock").read_text())["pid"], signal.SIGKILL)  # rank 0 holds the run's folder
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "2 process(es) on cpu, batch 8 per process = 16 global" in "".join(outputs)
    resumed = [line for output in outputs for line in output.splitlines() if line.startswith("resuming ")]
    assert len(resumed) == 1 and resumed[0].endswith(tuple(f"after epoch {epoch}" for epoch in range(1, EPOCHS))), \
        resumed
    assert_same_run(out, one_node)
