"""Images/s of the input pipelines: the DALI loader and the torchvision fallback, in one run.

    python bench/loader_bench.py [--task imagenet|coco] [--data DIR] [--device cpu|gpu] [--size 224] [--batch N]

--task imagenet (default): --data is an ImageFolder root (DIR/train/<class>/*, DIR/val/<class>/*); without it, a
JPEG tree of ImageNet-like photos (500x375, textured) is generated into a temporary folder: --images train files
(hard links to 256 distinct images, so generating it stays quick) and a quarter as many val files. Batches of 256,
random-resized crops of --size.
--task coco: the COCO task's loaders (detectron2's multi-scale 640-800 / 1333 training sizes, flips, test 800);
--data is a COCO 2017 root, or one is generated like the tree above, with COCO-sized photos (640x480 / 480x640) and
1-8 random boxes each. Batches of 8.

Each loader runs one untimed warm-up epoch (worker start-up, first pipeline build), then --epochs timed train
epochs and one timed val pass. A timed train epoch includes what each epoch costs in real training: the DALI
loader builds a fresh pipeline per epoch. Images/s counts images delivered as device tensors (synchronized).
Results go to a table, to bench/results/loader_<device>.json (or --out), and the last line names the best.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankkd.data import make_loaders  # noqa: E402
from rankkd.data.dali import dali_available  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GENERATED_CLASSES = 8
DISTINCT_IMAGES = 256


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth shapes plus fine texture: compresses like a photo (tens of KB), unlike pure noise or flat colour."""
    coarse = rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    texture = rng.normal(0, 12, (height, width, 1))
    return Image.fromarray(np.clip(image + texture, 0, 255).astype(np.uint8))


def generate_tree(root: Path, num_train: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    distinct = []
    for index in range(DISTINCT_IMAGES):
        # ImageNet's typical shapes: mostly 500x375 landscape, some portrait.
        width, height = (500, 375) if index % 4 else (375, 500)
        path = root / f"distinct-{index:03d}.jpg"
        _photo_like(rng, width, height).save(path, quality=90)
        distinct.append(path)
    for split, count in (("train", num_train), ("val", max(num_train // 4, GENERATED_CLASSES))):
        for index in range(count):
            class_dir = root / split / f"class{index % GENERATED_CLASSES}"
            class_dir.mkdir(parents=True, exist_ok=True)
            os.link(distinct[index % DISTINCT_IMAGES], class_dir / f"{index:06d}.jpg")
    return root


def generate_coco(root: Path, num_train: int, seed: int = 0) -> Path:
    """A COCO-layout root (train2017/, val2017/, annotations/) of COCO-sized photo-like JPEGs, hard links to
    DISTINCT_IMAGES distinct ones, each with 1-8 random boxes of three categories."""
    rng = np.random.default_rng(seed)
    distinct = []
    for index in range(DISTINCT_IMAGES):
        width, height = (640, 480) if index % 4 else (480, 640)
        path = root / f"distinct-{index:03d}.jpg"
        _photo_like(rng, width, height).save(path, quality=90)
        distinct.append((path, width, height))
    categories = [{"id": category, "name": f"category{category}"} for category in (1, 2, 3)]
    (root / "annotations").mkdir()
    for split, count in (("train2017", num_train), ("val2017", max(num_train // 4, 8))):
        (root / split).mkdir()
        images, annotations = [], []
        for image_id in range(1, count + 1):
            path, width, height = distinct[image_id % DISTINCT_IMAGES]
            os.link(path, root / split / f"{image_id:012d}.jpg")
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
            for _ in range(rng.integers(1, 9)):
                w, h = rng.uniform(16, width / 2), rng.uniform(16, height / 2)
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "area": w * h,
                                    "bbox": [x, y, w, h], "category_id": int(rng.integers(1, 4))})
        content = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


def make_bench_loaders(root: Path, backend: str, args, device: torch.device):
    """(train, val) loaders of the task over `root`."""
    if args.task == "coco":
        from rankkd.data.coco import check_coco
        from rankkd.data.coco_loaders import make_coco_loaders

        return make_coco_loaders(check_coco(root), batch_size=args.batch, val_batch_size=args.batch, rank=0,
                                 world_size=1, device=device, seed=0, num_workers=args.threads, backend=backend)
    loaders = make_loaders(root, batch_size=args.batch, image_size=args.size, device=device, backend=backend,
                           num_threads=args.threads, decode_device=args.device if backend == "dali" else "auto")
    return loaders.train, loaders.val


def _timed_pass(loader, epoch: int, device: torch.device) -> tuple[int, float]:
    loader.set_epoch(epoch)
    start = time.perf_counter()
    images = 0
    for batch, _ in loader:
        images += len(batch)  # a batch tensor, or the detection loaders' list of images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def bench_loader(root: Path, backend: str, args, device: torch.device) -> list[dict]:
    train, val = make_bench_loaders(root, backend, args, device)
    name = f"{backend} ({'gpu' if args.device == 'gpu' and backend == 'dali' else 'cpu'} decode)"
    _timed_pass(train, 0, device)
    train_images = train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        images, seconds = _timed_pass(train, epoch, device)
        train_images += images
        train_seconds += seconds
    val_images, val_seconds = _timed_pass(val, 0, device)
    return [{"loader": name, "split": split, "images": int(images), "seconds": round(seconds, 3),
             "images_per_s": round(images / seconds, 1)}
            for split, images, seconds in (("train", train_images, train_seconds), ("val", val_images, val_seconds))]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict:
    import PIL
    import torchvision

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    if dali_available():
        import nvidia.dali

        versions["nvidia-dali"] = nvidia.dali.__version__
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["imagenet", "coco"], default="imagenet",
                        help="whose loaders: the classification ones (ImageFolder) or the COCO task's")
    parser.add_argument("--data", type=Path, help="ImageFolder root (imagenet) or COCO 2017 root (coco); default: "
                                                  "a generated one")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu",
                        help="where DALI decodes and where batches are delivered")
    parser.add_argument("--size", type=int, default=224, help="training image size (px; imagenet)")
    parser.add_argument("--batch", type=int, help="images per batch (default: 256 imagenet, 8 coco)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="DALI CPU threads / torchvision DataLoader workers (default: all cores)")
    parser.add_argument("--images", type=int, help="train images in the generated tree "
                        "(default 512 with --device cpu; 32768 with --device gpu, so that the "
                        "per-epoch pipeline build weighs as little as in an ImageNet epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="timed train epochs after the warm-up epoch")
    parser.add_argument("--loaders", nargs="+", choices=["dali", "torchvision"], default=["dali", "torchvision"])
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/loader_<device>.json)")
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.task == "coco" else 256)
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    # Other processes competing for the cores skew every figure below; the load at the start is kept beside them.
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    num_train = args.images or {("imagenet", "cpu"): 512, ("imagenet", "gpu"): 32768, ("coco", "cpu"): 64,
                                ("coco", "gpu"): 4096}[args.task, args.device]

    with tempfile.TemporaryDirectory(prefix="rankkd-loader-bench-") as scratch:
        if args.data is None and args.task == "coco":
            root = generate_coco(Path(scratch), num_train)
            data = f"generated COCO layout: {num_train} train + {max(num_train // 4, 8)} val JPEGs, 640x480 / " \
                   "480x640, quality 90, 1-8 boxes each"
        elif args.data is None:
            root = generate_tree(Path(scratch), num_train)
            data = f"generated: {num_train} train + {max(num_train // 4, GENERATED_CLASSES)} val JPEGs, " \
                   f"{GENERATED_CLASSES} classes, 500x375 / 375x500, quality 90"
        else:
            root, data = args.data, str(args.data)
        results = []
        # The torchvision loader forks its workers, so it runs before DALI has started any threads.
        for backend in sorted(args.loaders, key=lambda name: name != "torchvision"):
            if backend == "dali" and not dali_available():
                print("DALI is not importable here: skipping the DALI loader", file=sys.stderr)
                continue
            results += bench_loader(root, backend, args, device)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()
    print(f"{device_name}, {os.cpu_count()} cores, load average at start {load_at_start}")
    print(f"{'loader':<26} {'split':<6} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for row in results:
        print(f"{row['loader']:<26} {row['split']:<6} {row['images']:>7} {row['seconds']:>8.2f} "
              f"{row['images_per_s']:>9.0f}")
    best = max((row for row in results if row["split"] == "train"), key=lambda row: row["images_per_s"])
    record = {"date": datetime.date.today().isoformat(), "device": device_name, "cpu_cores": os.cpu_count(),
              "load_average_at_start": load_at_start,
              "versions": _versions(), "command": " ".join(["python bench/loader_bench.py"] + sys.argv[1:]), "data": data,
              "task": args.task, "image_size": args.size if args.task == "imagenet" else "640-800 / 1333 (test 800)",
              "batch_size": args.batch, "threads": args.threads,
              "timed_train_epochs": args.epochs, "results": results,
              "best": {"loader": best["loader"], "split": "train", "images_per_s": best["images_per_s"]}}
    out = args.out or RESULTS_DIR / f"loader_{'coco_' if args.task == 'coco' else ''}{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"results written to {out}")
    print(f"best: {best['images_per_s']:.0f} images/s ({best['loader']}, train, {record['image_size']} px, batch "
          f"{args.batch})")


if __name__ == "__main__":
    main()
