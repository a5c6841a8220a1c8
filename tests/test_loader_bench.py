"""bench/loader_bench.py runs end to end for both tasks at tiny sizes and reports every image it was given (counts,
not speed: speed is the benchmark's business)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_dali

REPO = Path(__file__).resolve().parents[1]


@needs_dali
@pytest.mark.parametrize("task,images,batch,train_images,val_images", [
    ("imagenet", 48, 16, 2 * 48, 12),  # two timed epochs of 48, val 48 // 4
    ("coco", 24, 8, 2 * 24, 8),        # val max(24 // 4, 8)
])
def test_loader_bench_reports_every_image(tmp_path, task, images, batch, train_images, val_images):
    out = tmp_path / "loader.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "loader_bench.py"), "--task", task, "--device", "cpu",
                    "--images", str(images), "--batch", str(batch), "--threads", "1", "--size", "32", "--out",
                    str(out)], check=True, capture_output=True, timeout=600)
    record = json.loads(out.read_text())
    assert record["task"] == task and record["batch_size"] == batch
    rows = {(row["loader"], row["split"]): row for row in record["results"]}
    assert set(rows) == {(loader, split) for loader in ("dali (cpu decode)", "torchvision (cpu decode)")
                         for split in ("train", "val")}
    for (loader, split), row in rows.items():
        assert row["images"] == (train_images if split == "train" else val_images), (loader, split)
        assert row["images_per_s"] > 0
