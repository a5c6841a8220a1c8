"""Shared test setup and helpers (import them with `from conftest import logits, rel_err`)."""
import fcntl
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter, which must be switched on before
# triton is first imported (rankkd imports it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def logits(*shape, scale=3.0, dtype=torch.float64, device="cpu", requires_grad=False):
    """Fresh random logits at a realistic scale (ImageNet-trained logits have a spread of a few units), drawn in
    float64 and then rounded to dtype."""
    x = (scale * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def lock_is_free(folder):
    """Whether a new flock on the folder's RunLock file succeeds (a second open file conflicts even in this
    process)."""
    from rankkd.training.run_folder import RunLock

    with open(folder / RunLock.file_name, "rb") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(file, fcntl.LOCK_UN)
        return True


def write_cifar100(root, num_train=256, num_test=96, seed=0):
    """A cifar-100-python folder in the official format (Python-2-style pickles with bytes keys) under `root`."""
    generator = torch.Generator().manual_seed(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count in (("train", num_train), ("test", num_test)):
        content = {b"data": torch.randint(256, (count, 3072), generator=generator, dtype=torch.uint8).numpy(),
                   b"fine_labels": torch.randint(100, (count,), generator=generator).tolist()}
        (folder / name).write_bytes(pickle.dumps(content, protocol=2))
    return folder


def _dali_installed():
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        return False


# DALI is optional for users (the torchvision loader stands in), so its tests skip without it; CI installs it and sets
# RANKKD_EXPECT_DALI=1, which turns a DALI that went missing into failures instead of skips.
needs_dali = pytest.mark.skipif(not _dali_installed() and os.environ.get("RANKKD_EXPECT_DALI") != "1",
                                reason="needs nvidia-dali (pip install nvidia-dali-cuda130)")
# The input-pipeline backends, for tests parametrized over them.
DATA_BACKENDS = [pytest.param("dali", marks=needs_dali), "torchvision"]


def write_coco(root, *, train=None, val=None, categories=({"id": 2, "name": "a"}, {"id": 5, "name": "b"})):
    """A COCO-layout root; each split is a list of (image id, width, height, [annotation dicts]). Every image is
    black (PNG) with a white rectangle where its first annotation's box is."""
    from PIL import Image

    default = [(1, 40, 30, [{"bbox": [4, 5, 10, 8], "category_id": 2}])]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, images in (("train2017", train or default), ("val2017", val or default)):
        (root / split).mkdir(exist_ok=True)
        content = {"images": [], "annotations": [], "categories": list(categories)}
        for image_id, width, height, annotations in images:
            pixels = np.zeros((height, width, 3), np.uint8)
            if annotations:
                x, y, w, h = (int(v) for v in annotations[0]["bbox"])
                pixels[y:y + h, x:x + w] = 255
            Image.fromarray(pixels).save(root / split / f"{image_id}.png")
            content["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": width,
                                      "height": height})
            for annotation in annotations:
                content["annotations"].append({"id": len(content["annotations"]) + 1, "image_id": image_id,
                                               "iscrowd": 0, "area": 1.0} | annotation)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(content))
    return root


@pytest.fixture(scope="session")
def demo_coco_root(tmp_path_factory):
    """The COCO demo set (rankkd.data.coco_demo: JPEGs of coloured shapes), generated once per session."""
    from rankkd.data.coco_demo import prepare_demo_coco

    return prepare_demo_coco(tmp_path_factory.mktemp("demo-coco"))
