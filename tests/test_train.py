"""The trainer, train/imagenet.py, run as users run it: plain python and torchrun (2 gloo processes on the CPU), killed
and resumed, fed bad arguments and a diverging learning rate. Tiny settings (16 px demo images, 11 steps an epoch,
an untrained teacher) keep the whole file to a couple of minutes on 2 cores."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rankkd import models
from rankkd.data import prepare_demo
from rankkd.distill import DistillConfig, Distiller
from rankkd.data import synthetic_loader
from rankkd.training.checkpoint import save_checkpoint
from rankkd.training.config import flat_settings, make_parser, resolve_config
from rankkd.distributed import DistEnv
from rankkd.training.loop import Run, TrainingState, no_best, train_epoch
from rankkd.training.optim import learning_rate
from rankkd.training.trainer import main
from rankkd.tasks.imagenet import TASK
from rankkd.training.task import TaskData
from rankkd.training.teacher_cache import teacher_cache_folder

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "train" / "imagenet.py"
# The demo set at 16 px, 128 images a step (11 steps an epoch), against an untrained teacher: seconds per run.
TINY = ["--data", "demo", "--teacher-weights", "random", "--image-size", "16", "--batch-size", "128",
        "--log-every", "5", "--seed", "3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private RANKKD_CACHE holding the demo set, for this module's runs."""
    folder = tmp_path_factory.mktemp("rankkd-cache")
    prepare_demo(folder)
    return folder


def run_env(cache):
    return {**os.environ, "RANKKD_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def train(cache, *args, timeout=240):
    """Run the trainer in a fresh process; returns the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run([sys.executable, str(TRAINER), *args], env=run_env(cache), capture_output=True, text=True,
                          timeout=timeout)


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_process_torchrun_keeps_ranks_identical(cache, tmp_path):
    # Each rank runs the trainer's main() and saves the weights it ends with; both must be bit-identical.
    wrapper = tmp_path / "save_each_rank.py"
    wrapper.write_text(
        "import os, sys, torch\n"
        "from rankkd.training.trainer import main\n"
        "from rankkd.tasks.imagenet import TASK\n"
        "summary = main(TASK, sys.argv[3:])\n"
        "torch.save(summary['student'].state_dict(), os.path.join(sys.argv[2], f\"rank{os.environ['RANK']}.pt\"))\n")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
               "unused", str(tmp_path), *TINY, "--batch-size", "64", "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, env=run_env(cache), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) on cpu, batch 64 per process = 128 global" in result.stdout
    assert result.stdout.count("validation results") == 1  # rank 0 alone prints
    assert result.stdout.count("epoch 2/2: loss") == 1  # the epoch summary, rank 0 only
    rank0, rank1 = checkpoint(tmp_path / "rank0.pt"), checkpoint(tmp_path / "rank1.pt")
    assert_same_tensors(rank0, rank1)
    assert_same_tensors(rank0, checkpoint(out / "last.pt")["student"])
    assert [record["epoch"] for record in metrics(out)] == [1, 2]


def test_killed_run_resumes_to_the_same_weights(cache, tmp_path):
    args = [*TINY, "--epochs", "3", "--deterministic"]
    uninterrupted = tmp_path / "uninterrupted"
    result = train(cache, *args, "--out", str(uninterrupted))
    assert result.returncode == 0, result.stdout + result.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(TRAINER), *args, "--out", str(killed)], env=run_env(cache),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the whole session: the trainer and any loader workers
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint(killed / "last.pt")["epoch"] < 3

    result = train(cache, *args, "--out", str(killed), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stdout
    expected, resumed = checkpoint(uninterrupted / "last.pt"), checkpoint(killed / "last.pt")
    assert resumed["epoch"] == expected["epoch"] == 3
    assert_same_tensors(resumed["student"], expected["student"])
    for expected_state, resumed_state in zip(expected["optimizer"]["state"].values(),
                                             resumed["optimizer"]["state"].values()):
        assert_same_tensors(expected_state, resumed_state)
    assert [record["epoch"] for record in metrics(killed)] == [1, 2, 3]
    assert [r["val_top1"] for r in metrics(killed)] == [r["val_top1"] for r in metrics(uninterrupted)]


def test_metrics_checkpoints_and_config_are_written(cache, tmp_path):
    out = tmp_path / "run"
    result = train(cache, *TINY, "--epochs", "2", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    records = metrics(out)
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        for key in ("lr", "loss_ce", "loss_kd", "loss_rank", "loss_total", "train_img_s", "val_top1", "val_top5",
                    "val_tau", "teacher_top1"):
            assert isinstance(record[key], float), key
        assert record["loss_total"] == pytest.approx(record["loss_ce"] + record["loss_kd"] + record["loss_rank"])
        assert 0 <= record["val_top1"] <= record["val_top5"] <= 100 and -1 <= record["val_tau"] <= 1
    for name in ("last.pt", "best.pt"):
        saved = checkpoint(out / name)
        assert isinstance(saved["student"], dict) and saved["epoch"] >= 1
    assert checkpoint(out / "last.pt")["epoch"] == 2
    config = flat_settings(json.loads((out / "config.json").read_text()))
    assert config["method"] == "kd" and config["rank_weight"] == 1.0 and config["global_batch_size"] == 128
    assert "validation results" in result.stdout and "student (kd + rank)" in result.stdout
    assert not list(out.glob(".*.tmp"))  # no temporary file of the atomic writes left behind


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(cache, tmp_path):
    out = tmp_path / "run"
    assert train(cache, *TINY, "--epochs", "1", "--out", str(out)).returncode == 0
    good = (out / "last.pt").read_bytes()
    # A huge learning rate blows the weights up in the second epoch's first update (another experiment: allowed).
    result = train(cache, *TINY, "--epochs", "2", "--out", str(out), "--resume", "auto", "--lr", "1e30",
                   "--allow-changed-settings")
    assert result.returncode == 1
    assert "non-finite loss at step" in result.stderr and "(epoch 2, step" in result.stderr, result.stderr
    assert (out / "last.pt").read_bytes() == good
    assert [record["epoch"] for record in metrics(out)] == [1]


def test_synthetic_data_times_the_step(cache, tmp_path):
    out = tmp_path / "run"
    result = train(cache, "--data", "synthetic", "--teacher", "demo_cnn_large", "--student", "demo_cnn_small",
                   "--image-size", "16", "--num-classes", "10", "--batch-size", "16", "--steps-per-epoch", "4",
                   "--log-every", "2", "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    (record,) = metrics(out)
    assert record["train_img_s"] > 0 and record["loss_rank"] > 0
    assert "data synthetic" in result.stdout


def test_resnet50_to_mobilenet_v1_recipe_runs_on_synthetic_data(cache, tmp_path):
    out = tmp_path / "run"
    result = train(cache, "--recipe", "imagenet-r50-mv1", "--data", "synthetic", "--image-size", "32",
                   "--num-classes", "10", "--batch-size", "4", "--steps-per-epoch", "2", "--log-every", "1",
                   "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    config = flat_settings(json.loads((out / "config.json").read_text()))
    assert (config["teacher"], config["student"], config["loss_recipe"]) == ("resnet50", "mobilenet_v1",
                                                                             "imagenet-kd-rank")
    assert (config["lr"], config["milestones"], config["weight_decay"]) == (0.2, [30, 60, 90], 1e-4)


def test_deit_recipe_runs_on_the_demo_with_its_augmentation(cache, tmp_path):
    pytest.importorskip("timm", reason="DeiT students come from timm (pip install timm)")
    out = tmp_path / "run"
    result = train(cache, "--recipe", "deit", "--data", "demo", "--teacher-weights", "random", "--image-size", "16",
                   "--batch-size", "64", "--workers", "1", "--log-every", "5", "--epochs", "1", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    config = flat_settings(json.loads((out / "config.json").read_text()))
    deit = {"student": "deit_tiny_patch16_224", "optimizer": "adamw", "rand_augment_ops": 2, "random_erasing": 0.25,
            "repeated_aug": 3, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1, "drop_path": 0.1,
            "rank_weight": 0.5, "teacher": "demo_cnn_large", "image_size": 16}
    assert {key: config[key] for key in deit} == deit
    (record,) = metrics(out)
    assert record["loss_total"] == pytest.approx(record["loss_ce"] + record["loss_kd"] + record["loss_rank"])


@pytest.fixture
def trainer_main(cache, monkeypatch):
    """The ImageNet trainer's main(), called in this process (it sets torch's thread count: restored after)."""
    monkeypatch.setenv("RANKKD_CACHE", str(cache))
    threads = torch.get_num_threads()
    yield lambda argv: main(TASK, argv)
    torch.set_num_threads(threads)


def bad_teacher_checkpoints(folder):
    wrong_classes = folder / "imagenet_classes.pt"
    torch.save(models.build_model("demo_cnn_large", 1000).state_dict(), wrong_classes)
    garbage = folder / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    return wrong_classes, garbage


@pytest.mark.parametrize("case", ["arch", "method", "data", "classes", "teacher file", "resume file", "existing run",
                                  "topk", "backend", "workers", "lr", "out", "mixup", "temperature"])
def test_bad_arguments_fail_before_any_work(trainer_main, tmp_path, capsys, case):
    wrong_classes, garbage = bad_teacher_checkpoints(tmp_path)
    out = tmp_path / "run"
    args, message = {
        "arch": (["--student", "resnet81"], "unknown architecture 'resnet81'"),
        "method": (["--method", "kdd"], "invalid choice: 'kdd'"),
        "data": (["--data", str(tmp_path / "nowhere")], "no such directory"),
        "classes": (["--teacher-weights", str(wrong_classes)], "but the data has 10"),
        "teacher file": (["--teacher-weights", str(garbage)], "cannot read checkpoint"),
        "resume file": (["--resume", "auto"], "cannot read checkpoint"),
        "existing run": ([], "already holds a run"),
        "topk": (["--rank-topk", "11"], "--rank-topk 11 is more than the 10 classes"),
        "backend": (["--rank-backend", "cuda"], "--rank-backend cuda does not run on cpu tensors"),
        "workers": (["--workers", "0"], "--workers must be >= 1, got 0"),
        "lr": (["--lr", "inf"], "--lr must be a finite number, got inf"),
        "out": (["--out", str(garbage / "run")], f"--out {garbage / 'run'} is not writable"),
        "mixup": (["--mixup", "-1"], "--mixup must be >= 0, got -1.0"),
        "temperature": (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
    }[case]
    if case in ("resume file", "existing run"):
        out.mkdir()
        (out / "last.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit) as stopped:
        trainer_main(["--out", str(out), *args])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error, error
    assert not (out / "metrics.jsonl").exists()


def test_a_second_run_on_the_same_folder_stops_at_once(cache, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(TRAINER), *TINY, "--epochs", "50", "--out", str(out)],
                             env=run_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:  # the first run is under way
            time.sleep(0.05)
        second = train(cache, *TINY, "--epochs", "1", "--out", str(out), "--resume", "auto")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"--out {out} is in use by process {first.pid}" in second.stderr, second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead run's lock: the folder can be resumed at once.
    third = train(cache, *TINY, "--epochs", "1", "--out", str(out), "--resume", "auto")
    assert third.returncode == 0, third.stdout + third.stderr


def test_resuming_a_complete_run_says_so(cache, tmp_path):
    out = tmp_path / "run"
    assert train(cache, *TINY, "--epochs", "1", "--out", str(out)).returncode == 0
    result = train(cache, *TINY, "--epochs", "1", "--out", str(out), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already holds all 1 epochs of this run: nothing to train" in result.stdout
    assert [record["epoch"] for record in metrics(out)] == [1]


def test_teacher_cache_key_covers_every_training_setting():
    # A teacher trained by 2 processes (another global batch) must not be reused by a run on 1, nor one trained with
    # another seed or data backend.
    folders = set()
    for world_size, extra in ((1, []), (2, []), (1, ["--seed", "1"]), (1, ["--data-backend", "torchvision"])):
        args = make_parser(TASK).parse_args(["--student", "demo_cnn_large", "--out", "unused", *extra])
        cfg = resolve_config(TASK, args, DistEnv(0, 0, world_size, torch.device("cpu")), "demo-teacher")
        folders.add(teacher_cache_folder(cfg))
    assert len(folders) == 4


def test_teacher_checkpoint_formats(tmp_path):
    # This trainer's checkpoints, {'model': ...} dicts (timm, DeiT) and DDP / torch.compile key prefixes all load.
    trained = models.build_model("demo_cnn_large", 10)
    state = trained.state_dict()
    formats = {"ours": {"student": state, "epoch": 3}, "timm": {"model": state},
               "ddp": {f"module.{key}": value for key, value in state.items()},
               "compiled": {"state_dict": {f"_orig_mod.{key}": value for key, value in state.items()}}}
    for name, saved in formats.items():
        torch.save(saved, tmp_path / f"{name}.pt")
        teacher = models.load_teacher("demo_cnn_large", str(tmp_path / f"{name}.pt"), 10)
        assert_same_tensors(teacher.state_dict(), state)
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="have 1000 classes but the data has 10"):  # checked before any download
        models.load_teacher("resnet18", "IMAGENET1K_V1", 10)
    with pytest.raises(ValueError, match="no torchvision weights 'IMAGENET1K_V7'"):
        models.load_teacher("resnet18", "IMAGENET1K_V7", 1000)
    with pytest.raises(ValueError, match="does not fit architecture"):
        models.load_teacher("demo_cnn_small", str(tmp_path / "ours.pt"), 10)


def test_training_step_compiles_without_graph_breaks():
    # The ranking op sits inside the compiled graph of the distillation forward, for every method.
    student = models.build_model("demo_cnn_small", 10)
    teacher = models.build_model("demo_cnn_large", 10)
    images, labels, epoch = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)), torch.ones(())
    for method in ("kd", "dkd", "dist"):
        config = DistillConfig(method=method, rank_weight=1.0, warmup_epochs=1.0 if method == "dkd" else 0.0)
        explanation = torch._dynamo.explain(Distiller(student, teacher, config))(images, labels, epoch)
        assert explanation.graph_break_count == 0, (method, explanation.break_reasons)
        torch._dynamo.reset()


def test_learning_rate_schedules():
    step = dict(schedule="step", lr=0.2, epochs=100, milestones=(30, 60, 90), decay=0.1)
    assert [learning_rate(e, **step) for e in (0, 29.99, 30, 60.5, 99.9)] == pytest.approx([0.2, 0.2, 0.02, 0.002,
                                                                                              0.0002])
    cosine = dict(schedule="cosine", lr=5e-4, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=5e-6)
    assert learning_rate(0, **cosine) == pytest.approx(1e-6)
    assert learning_rate(2.5, **cosine) == pytest.approx((1e-6 + 5e-4) / 2)
    assert learning_rate(5, **cosine) == pytest.approx(5e-4)
    assert learning_rate(152.5, **cosine) == pytest.approx((5e-4 + 5e-6) / 2)
    assert learning_rate(300, **cosine) == pytest.approx(5e-6)


def test_save_checkpoint_replaces_atomically(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    assert checkpoint(path) == {"epoch": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The bar: `python train/imagenet.py` trains the demo teacher, then a KD + rank student to >= 90 % top-1."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(TRAINER), "--out", str(tmp_path / "demo")],
                            env=run_env(tmp_path / "cache"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "training the teacher demo_cnn_large first" in result.stdout
    last = metrics(tmp_path / "demo")[-1]
    assert last["val_top1"] >= 90 and last["teacher_top1"] >= 90, last
    print(f"demo: {time.monotonic() - start:.0f}s, teacher {last['teacher_top1']:.2f}, student {last['val_top1']:.2f}")


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_unreadable_image_stops_the_run_with_one_line(cache, tmp_path, split):
    from test_data import _write_tree

    root = _write_tree(tmp_path / "data")
    bad = root / split / "dog" / ("08.jpg" if split == "train" else "06.jpg")
    assert bad.exists()
    bad.write_bytes(b"not a JPEG at all" * 40)
    out = tmp_path / "run"
    result = train(cache, "--data", str(root), "--teacher", "demo_cnn_large", "--teacher-weights", "random",
                   "--student", "demo_cnn_small", "--image-size", "16", "--batch-size", "4", "--workers", "1",
                   "--epochs", "1", "--out", str(out))
    assert "Traceback" not in result.stderr, result.stderr
    assert str(bad) in result.stderr and "To exclude a file" in result.stderr, result.stderr
    if split == "val":  # found by the check before training
        assert result.returncode == 2 and not (out / "metrics.jsonl").exists()
    else:  # met mid-epoch
        assert result.returncode == 1 and "no checkpoint had been written yet" in result.stderr


def test_resume_continues_the_random_streams(cache, tmp_path):
    # mobilenet_v2's dropout draws from the global generator at every step: a run resumed after epoch 1 must draw what
    # the uninterrupted run drew in epoch 2. A step schedule keeps the learning rate independent of --epochs.
    args = [*TINY, "--student", "mobilenet_v2", "--deterministic", "--schedule", "step"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(cache, *args, "--epochs", "2", "--out", str(whole)).returncode == 0
    assert train(cache, *args, "--epochs", "1", "--out", str(resumed)).returncode == 0
    result = train(cache, *args, "--epochs", "2", "--out", str(resumed), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_tensors(checkpoint(whole / "last.pt")["student"], checkpoint(resumed / "last.pt")["student"])


def test_dkd_warm_up_sees_epochs_counted_from_one(tmp_path):
    # mdistiller's trainer counts epochs from 1, so its DKD warm-up gives epoch e the factor min(e / warm-up, 1).
    student = torch.nn.Linear(1, 1, bias=False)
    seen = []

    def forward(images, labels, epoch):
        seen.append(float(epoch))
        loss = student.weight.sum() * images.mean()
        return None, {"ce": loss, "total": loss}

    env = DistEnv(0, 0, 1, torch.device("cpu"))
    args = make_parser(TASK).parse_args(["--epochs", "3", "--log-every", "2", "--lr", "0.1", "--lr-reference-batch",
                                         "4", "--batch-size", "4", "--out", str(tmp_path)])
    cfg = resolve_config(TASK, args, env)
    data = TaskData(train=synthetic_loader(batch_size=4, image_size=8, num_classes=3, steps=2, device="cpu"), val=None,
                    num_classes=3, backend="synthetic")
    run = Run(task=TASK, cfg=cfg, out=tmp_path, lock=None, resume_state=None, data=data, student=student, teacher=None)
    training = TrainingState(student=student, train_forward=forward, eval_student=student, eval_teacher=None,
                             optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
                             scaler=torch.amp.GradScaler("cpu", enabled=False), autocast=contextlib.nullcontext,
                             epoch_tensor=torch.zeros(()), start_epoch=0, best=no_best(TASK), last_record={})
    for epoch in range(3):
        train_epoch(epoch, run, env, training)
    assert seen == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_two_runs_needing_one_demo_teacher_train_it_once(tmp_path):
    # Both start on an empty cache: one trains the teacher, the other waits for it and then uses it.
    cache = tmp_path / "cache"
    prepare_demo(cache)
    command = [sys.executable, str(TRAINER), "--image-size", "16", "--batch-size", "128", "--epochs", "1"]
    runs = [subprocess.Popen([*command, "--out", str(tmp_path / f"run{i}")], env=run_env(cache), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    # Exactly one trains it (without the cache lock both would, into one folder); the other normally says that it
    # waits, unless it started only after the teacher was done.
    trained = [out for out, _ in outputs if "training the teacher demo_cnn_large first" in out]
    assert len(trained) == 1, outputs
    assert len(list((cache / "teachers").iterdir())) == 1  # one cache entry, whose teacher both runs used
    teachers = [metrics(tmp_path / f"run{i}")[-1]["teacher_top1"] for i in range(2)]
    assert teachers[0] == teachers[1]
