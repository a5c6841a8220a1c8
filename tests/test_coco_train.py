"""The COCO task (train/coco.py) run as users run it, on the generated demo set at tiny settings: distillation through
the run skeleton, iteration-based epochs that resume bit-exactly, two gloo processes, and bad input refused before
anything is written."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_BACKENDS

pytest.importorskip("pycocotools", reason="the COCO task evaluates with pycocotools (pip install pycocotools)")

from rankkd.data.coco_demo import prepare_demo_coco  # noqa: E402
from rankkd.training.config import flat_settings  # noqa: E402
from rankkd.training.trainer import main  # noqa: E402
from rankkd.tasks.coco import TASK, IterationLoader  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Untrained demo detectors, 4 images a step, 3 steps an epoch: seconds per run.
TINY = ["--teacher-weights", "random", "--batch-size", "4", "--iters-per-epoch", "3", "--log-every", "3",
        "--train-sizes", "96,128", "--workers", "0", "--seed", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rankkd-cache")
    prepare_demo_coco(folder)
    return folder


@pytest.fixture
def coco(cache, monkeypatch):
    monkeypatch.setenv("RANKKD_CACHE", str(cache))
    threads = torch.get_num_threads()
    yield lambda *argv: main(TASK, list(argv))
    torch.set_num_threads(threads)


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_distillation_runs_and_records_box_ap_and_roi_tau(coco, tmp_path):
    out = tmp_path / "run"
    summary = coco(*TINY, "--epochs", "2", "--method", "kd+rank", "--out", str(out))
    (first, second) = records(out)
    for record in (first, second):
        terms = ("box_reg", "objectness", "rpn_box_reg", "ce", "kd", "rank")
        assert record["loss_total"] == pytest.approx(sum(record[f"loss_{term}"] for term in terms))
        assert 0 <= record["box_ap"] <= 100 and -1 <= record["val_tau"] <= 1
    assert second["teacher_box_ap"] == first["teacher_box_ap"]  # frozen: scored once, reported every epoch
    settings = flat_settings(json.loads((out / "config.json").read_text()))
    assert (settings["student"], settings["teacher"], settings["method"], settings["rank_weight"]) == (
        "demo_tiny", "demo_small", "kd", 1.0)
    assert summary["best"]["epoch"] in (1, 2) and (out / "best.pt").exists()


def test_iteration_epochs_cross_passes_and_resume_exactly(tmp_path):
    # Epochs of 5 iterations over passes of 3 batches: epoch 1 is the rest of pass 1 and the start of pass 2, the
    # same batches whether or not the epochs before it ran in this process.
    class Passes:
        backend = "test"

        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return 3

        def set_epoch(self, epoch):
            self.epoch = epoch

        def batches_from(self, step):
            return iter([(self.epoch, step) for step in range(step, 3)])

    loader = IterationLoader(Passes(), 5)
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen.append(list(loader))
    assert seen[1] == [(1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]
    fresh = IterationLoader(Passes(), 5)
    fresh.set_epoch(2)
    assert list(fresh) == seen[2] and len(fresh) == 5


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_killed_run_resumes_bit_exactly(coco, tmp_path, backend):
    """Resumed mid-pass (epoch 1 starts at iteration 3 of a 120-batch pass), on either loader."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    tiny = [*TINY, "--deterministic", "--data-backend", backend]
    coco(*tiny, "--epochs", "2", "--out", str(whole))
    coco(*tiny, "--epochs", "1", "--out", str(resumed))  # stops after epoch 1, as a kill would
    coco(*tiny, "--epochs", "2", "--out", str(resumed), "--resume", "auto")
    assert json.loads((whole / "config.json").read_text())["data"]["data_backend"] == backend
    expected = torch.load(whole / "last.pt", weights_only=True)["student"]
    got = torch.load(resumed / "last.pt", weights_only=True)["student"]
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert [record["box_ap"] for record in records(whole)] == [record["box_ap"] for record in records(resumed)]


def test_plain_detection_trains_a_teacher_the_distilled_run_loads(coco, tmp_path):
    teacher = tmp_path / "teacher"
    coco(*TINY, "--epochs", "1", "--student", "demo_small", "--teacher", "none", "--method", "none",
         "--out", str(teacher))
    assert "loss_kd" not in records(teacher)[0] and "loss_rank" not in records(teacher)[0]
    student = tmp_path / "student"
    args = list(TINY)
    args[args.index("--teacher-weights") + 1] = str(teacher / "best.pt")
    coco(*args, "--epochs", "1", "--method", "dkd+rank", "--out", str(student))
    assert {"loss_dkd", "loss_rank"} <= set(records(student)[0])


def test_two_gloo_processes(cache, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train" / "coco.py"), *TINY, "--batch-size", "2", "--epochs", "1", "--out", str(out)]
    result = subprocess.run(command, env={**os.environ, "RANKKD_CACHE": str(cache), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) on cpu, batch 2 per process = 4 global" in result.stdout
    assert result.stdout.count("validation results") == 1
    assert [record["epoch"] for record in records(out)] == [1]


def _coco_root(tmp_path, cache, damage):
    root = tmp_path / "coco"
    shutil.copytree(prepare_demo_coco(cache), root)
    annotations = root / "annotations" / "instances_train2017.json"
    content = json.loads(annotations.read_text())
    if damage == "missing annotations":
        annotations.unlink()
    elif damage == "missing image folder":
        shutil.rmtree(root / "val2017")
    elif damage == "missing image":
        (root / "train2017" / content["images"][0]["file_name"]).unlink()
    elif damage == "unknown category":
        content["annotations"][0]["category_id"] = 999
    elif damage == "empty box":
        content["annotations"][0]["bbox"][2] = 0
    if annotations.exists():
        annotations.write_text(json.dumps(content))
    return root


@pytest.mark.parametrize(("damage", "message"), [
    ("missing annotations", "instances_train2017.json' is missing"),
    ("missing image folder", "val2017' is missing"),
    ("missing image", "train2017"),
    ("unknown category", "999"),
    ("empty box", "bbox"),
    ("teacher of another architecture", "are not those of a"),
])
def test_bad_input_is_refused_before_anything_is_written(coco, cache, tmp_path, capsys, damage, message):
    root = _coco_root(tmp_path, cache, None if damage.startswith("teacher") else damage)
    args = ["--data", str(root), "--pair", "demo", "--student-weights", "none", *TINY[2:]]
    if damage.startswith("teacher"):
        other = tmp_path / "other.pt"
        from rankkd.detection import zoo

        torch.save({"student": zoo.build_model("demo_tiny", 4).state_dict()}, other)
        args += ["--teacher-weights", str(other)]
    else:
        args += ["--teacher-weights", "random"]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        coco(*args, "--out", str(out))
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and message in error and "Traceback" not in error, error
    assert len(error.strip().splitlines()) == 1 and not out.exists()


def test_backbone_weights_are_resolved_before_anything_is_written(coco, cache, tmp_path, monkeypatch, capsys):
    """--student-weights imagenet (the coco recipe's default) on a machine without network access: one line naming
    the weights, where torch's cache wants them and how to pass them, before the run folder exists."""
    import urllib.error

    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    fetched = []

    def offline(url, destination, *args, **kwargs):
        fetched.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    root = _coco_root(tmp_path, cache, None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        coco("--data", str(root), "--teacher-weights", "random", *TINY[2:], "--out", str(out))
    error = capsys.readouterr().err.strip()
    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    file_name = entry.url.rsplit("/", 1)[1]
    assert stopped.value.code == 2 and len(error.splitlines()) == 1, error
    assert f"cannot download torchvision weights {entry} from {entry.url}" in error
    assert f"--student-weights /path/to/{file_name}" in error
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / file_name) in error
    assert fetched == [entry.url] and not out.exists()
