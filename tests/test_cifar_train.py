"""The CIFAR-100 trainer, train/cifar100.py, run as users run it on a generated CIFAR-format folder: plain python and
torchrun (2 gloo processes), killed and resumed, fed corrupt data; and its pair recipes against mdistiller's
configs. Tiny settings (256 train images, resnet8 against an untrained teacher) keep each run to seconds."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_cifar100

from rankkd.training.config import flat_settings

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train" / "cifar100.py"


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    return write_cifar100(tmp_path_factory.mktemp("data"))


TINY_TEACHER = ["--teacher", "resnet8", "--teacher-weights", "random", "--batch-size", "32", "--log-every", "4",
                "--seed", "5"]
TINY = [*TINY_TEACHER, "--student", "resnet8"]


def train(folder, *args, cache=None, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"RANKKD_CACHE": str(cache)} if cache else {})}
    return subprocess.run([sys.executable, str(TRAINER), "--data", str(folder), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_cifar_folder_trains_and_evaluates(cifar_folder, tmp_path):
    out = tmp_path / "run"
    result = train(cifar_folder, *TINY, "--epochs", "2", "--method", "dkd+rank", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    records = metrics(out)
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        assert record["loss_total"] == pytest.approx(record["loss_ce"] + record["loss_dkd"] + record["loss_rank"])
        assert 0 <= record["val_top1"] <= record["val_top5"] <= 100 and -1 <= record["val_tau"] <= 1
    config = flat_settings(json.loads((out / "config.json").read_text()))
    # The pair's recipe (res32x4_res8x4, mdistiller's dkd config), with the models the command line chose.
    expected = {"pair": "res32x4_res8x4", "student": "resnet8", "method": "dkd", "ce_weight": 1.0, "dkd_alpha": 1.0,
                "dkd_beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0, "rank_weight": 1.0, "lr": 0.05,
                "batch_size": 32, "milestones": [150, 180, 210], "weight_decay": 5e-4, "epochs": 2}
    assert {key: config[key] for key in expected} == expected
    assert "validation results" in result.stdout and "student (dkd + rank)" in result.stdout


def test_small_lr_students_and_per_pair_dkd_beta(cifar_folder, tmp_path):
    # mdistiller: lr 0.01 for ShuffleNet / MobileNetV2 students; DKD beta 2 for res56_res20, 6 for vgg13_mv2. The lr
    # follows the student that actually trains.
    cases = (("res56_res20", [], 0.05, 2.0), ("vgg13_mv2", [], 0.01, 6.0), ("res32x4_shuv2", [], 0.01, 8.0),
             ("res32x4_res8x4", ["--student", "ShuffleV1"], 0.01, 8.0),
             ("vgg13_mv2", ["--student", "resnet8"], 0.05, 6.0))
    for pair, student, lr, beta in cases:
        out = tmp_path / f"{pair}{len(student)}"
        result = train(cifar_folder, *TINY_TEACHER, *student, "--pair", pair, "--method", "dkd", "--epochs", "1",
                       "--out", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        config = flat_settings(json.loads((out / "config.json").read_text()))
        assert (config["lr"], config["dkd_beta"]) == (lr, beta), (pair, student)


def test_synthetic_data_runs_the_pair_models(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(TRAINER), "--data", "synthetic", "--pair", "res56_res20",
                             "--steps-per-epoch", "3", "--batch-size", "16", "--log-every", "3", "--epochs", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = metrics(out)
    assert record["train_img_s"] > 0 and record["loss_rank"] > 0
    config = flat_settings(json.loads((out / "config.json").read_text()))
    assert (config["teacher"], config["student"], config["teacher_weights"]) == ("resnet56", "resnet20", "random")


def test_killed_run_resumes_to_the_same_weights(cifar_folder, tmp_path):
    args = [*TINY, "--epochs", "3", "--deterministic"]
    uninterrupted = tmp_path / "uninterrupted"
    assert train(cifar_folder, *args, "--out", str(uninterrupted)).returncode == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(TRAINER), "--data", str(cifar_folder), *args, "--out",
                                str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint(killed / "last.pt")["epoch"] < 3

    result = train(cifar_folder, *args, "--out", str(killed), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    expected, resumed = checkpoint(uninterrupted / "last.pt"), checkpoint(killed / "last.pt")
    assert resumed["epoch"] == expected["epoch"] == 3
    for key, value in expected["student"].items():
        assert torch.equal(resumed["student"][key], value), key
    assert [r["val_top1"] for r in metrics(killed)] == [r["val_top1"] for r in metrics(uninterrupted)]


def test_two_process_torchrun(cifar_folder, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAINER),
               "--data", str(cifar_folder), *TINY, "--epochs", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) on cpu, batch 32 per process = 64 global" in result.stdout
    assert result.stdout.count("validation results") == 1
    assert [record["epoch"] for record in metrics(out)] == [1]


@pytest.mark.parametrize("case", ["missing test", "garbage", "labels", "no folder", "teacher classes"])
def test_bad_input_is_refused_by_name(tmp_path, case):
    folder = write_cifar100(tmp_path / "data", num_train=64, num_test=32)
    args = list(TINY)
    if case == "missing test":
        (folder / "test").unlink()
        message = "test"
    elif case == "garbage":
        (folder / "train").write_bytes(b"\x00 not a pickle")
        message = "train"
    elif case == "labels":
        content = pickle.loads((folder / "test").read_bytes())
        content[b"fine_labels"][0] = 100
        (folder / "test").write_bytes(pickle.dumps(content, protocol=2))
        message = "fine_labels must lie in [0, 100)"
    elif case == "no folder":
        folder = tmp_path / "nowhere"
        message = "no such file or folder"
    else:  # a 10-class teacher checkpoint against 100-class data
        from rankkd.models import cifar

        weights = tmp_path / "teacher.pth"
        torch.save({"model": cifar.build_model("resnet8", num_classes=10).state_dict()}, weights)
        args[args.index("random")] = str(weights)
        message = str(weights)
    out = tmp_path / "run"
    result = train(folder, *args, "--epochs", "1", "--out", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cifar100.py: error:" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """`python train/cifar100.py`: the demo teacher (resnet14) trained and cached, then a KD + rank resnet8."""
    out = tmp_path / "demo"
    result = train("demo", "--out", str(out), cache=tmp_path / "cache", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training the teacher resnet14 first" in result.stdout
    last = metrics(out)[-1]
    assert last["teacher_top1"] >= 90 and last["val_top1"] >= 85, last
