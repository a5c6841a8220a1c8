"""rankkd.data on real DALI CPU pipelines (and the torchvision fallback) over small generated JPEG trees.

Every generated image carries its identity in its colour: red encodes the class, green a per-split file id, blue is
noise (texture, so that augmentation shows). Red and green survive JPEG, crops and resizing as the image mean, so a
batch can be traced back to the files it came from.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rankkd.data as data
from conftest import DATA_BACKENDS, needs_dali
from rankkd.data import demo
from rankkd.data.normalization import IMAGENET_MEAN, IMAGENET_STD

CLASSES = ["cat", "dog", "eel"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 5
SIZE = 24


def _red(label):
    return 40 + 80 * label


def _green(file_id):
    return 10 + 12 * file_id


def _write_tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        file_id = 0
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for _ in range(per_class):
                pixels = np.empty((30, 40, 3), np.uint8)
                pixels[..., 0] = _red(label)
                pixels[..., 1] = _green(file_id)
                pixels[..., 2] = rng.integers(0, 256, (30, 40))
                Image.fromarray(pixels).save(root / split / name / f"{file_id:02d}.jpg", quality=95)
                file_id += 1
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture
def fresh_tree(tmp_path):
    """A tree a test may damage."""
    return _write_tree(tmp_path / "tree")


def _loaders(root, backend, **overrides):
    # num_threads=1: one DALI thread or one DataLoader worker; the machine running the tests is small and shared.
    args = {"batch_size": 4, "image_size": SIZE, "backend": backend, "num_threads": 1} | overrides
    return data.make_loaders(root, **args)


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def _pixel_means(images):
    """Per-image mean RGB in 0..255, undoing the normalization."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).mean(dim=(2, 3))


def _file_ids(images):
    return ((_pixel_means(images)[:, 1] - _green(0)) / 12).round().long().tolist()


@pytest.mark.parametrize("backend", DATA_BACKENDS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_batches_have_shape_dtype_layout_and_range(tree, backend, channels_last):
    loaders = _loaders(tree, backend, channels_last=channels_last)
    assert loaders.backend == backend and loaders.classes == CLASSES and loaders.num_classes == 3
    train = _epoch(loaders.train, 0)
    val = _epoch(loaders.val, 0)
    assert len(train) == len(loaders.train) == 18 // 4
    assert len(val) == len(loaders.val) == 4 and [len(labels) for _, labels in val] == [4, 4, 4, 3]
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    lowest = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    highest = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(1, 3, 1, 1)
    for images, labels in train + val:
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=memory_format)
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert images.device.type == "cpu" and labels.device.type == "cpu"
        assert (images >= lowest - 1e-4).all() and (images <= highest + 1e-4).all()
        assert images[:, 2].std() > 0.3  # the blue noise is there: real pixels, not a constant


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_labels_match_class_folders(tree, backend):
    loaders = _loaders(tree, backend)
    for images, labels in _epoch(loaders.train, 0) + _epoch(loaders.val, 0):
        classes_from_pixels = ((_pixel_means(images)[:, 0] - _red(0)) / 80).round().long()
        assert torch.equal(classes_from_pixels, labels)


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_two_shard_validation_reads_every_file_once(tree, backend):
    seen = []
    for rank in range(2):
        val = _loaders(tree, backend, rank=rank, world_size=2).val
        batches = _epoch(val, 0)
        assert len(batches) == len(val)
        ids = [i for images, _ in batches for i in _file_ids(images)]
        assert len(ids) == val.num_samples
        seen += ids
    assert sorted(seen) == list(range(len(CLASSES) * VAL_PER_CLASS))


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_train_shards_are_disjoint_equal_and_reshuffled(tree, backend):
    per_rank = {}
    for rank in range(2):
        train = _loaders(tree, backend, rank=rank, world_size=2).train
        assert len(train) == 2  # 18 files / 2 ranks = 9 each: 2 full batches of 4, remainder dropped
        per_rank[rank] = [[i for images, _ in _epoch(train, epoch) for i in _file_ids(images)] for epoch in (0, 1)]
    for epoch in (0, 1):
        first, second = per_rank[0][epoch], per_rank[1][epoch]
        assert len(first) == len(second) == 8 and not set(first) & set(second)
        assert set(first) | set(second) <= set(range(len(CLASSES) * TRAIN_PER_CLASS))
    assert per_rank[0][0] != per_rank[0][1]


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_seed_and_epoch_determine_the_batches(tree, backend):
    uninterrupted = _loaders(tree, backend, seed=3).train
    first_epoch, second_epoch = _epoch(uninterrupted, 0), _epoch(uninterrupted, 1)
    same_seed = _loaders(tree, backend, seed=3, num_threads=2).train  # nor on the number of threads or workers
    images, labels = next(iter(_epoch(same_seed, 0)))
    assert torch.equal(images, first_epoch[0][0]) and torch.equal(labels, first_epoch[0][1])
    resumed = _epoch(_loaders(tree, backend, seed=3).train, 1)  # a run resumed at epoch 1
    for (images, labels), (expected_images, expected_labels) in zip(resumed, second_epoch, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    other_seed = _epoch(_loaders(tree, backend, seed=4).train, 0)
    assert not torch.equal(other_seed[0][0], first_epoch[0][0])


@needs_dali
def test_demo_dataset_builds_from_sklearn_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKKD_CACHE", str(tmp_path))
    root = data.prepare_demo()
    assert root.parent == tmp_path
    train_files = sorted((root / "train").glob("*/*.jpg"))
    val_files = sorted((root / "val").glob("*/*.jpg"))
    assert (len(train_files), len(val_files)) == (1437, 360)
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(data.DEMO_NUM_CLASSES)]
    with Image.open(train_files[0]) as image:
        assert image.size == (data.DEMO_IMAGE_SIZE, data.DEMO_IMAGE_SIZE) and image.mode == "RGB"

    def must_not_rebuild(target):
        raise AssertionError("prepare_demo rebuilt a cached tree")

    monkeypatch.setattr(demo, "_write_tree", must_not_rebuild)
    assert data.prepare_demo() == root
    loaders = data.make_loaders(root, batch_size=64, image_size=32, backend="dali",
                               augment=data.TrainAugmentation(min_scale=0.35, hflip=False))
    assert loaders.num_classes == data.DEMO_NUM_CLASSES and len(loaders.train) == 1437 // 64
    images, labels = next(iter(_epoch(loaders.train, 0)))
    assert images.shape == (64, 3, 32, 32) and labels.max() < 10


def test_interrupted_demo_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash_halfway(target):
        (target / "train" / "0").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_tree", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_demo(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_build_in_cache_writes_once_and_yields_to_a_builder_that_finished_first(tmp_path):
    calls = []

    def write(folder):
        calls.append(folder)
        (folder / "part").write_text("mine")

    root = demo.build_in_cache("set-v1", write, tmp_path)
    assert root == tmp_path / "set-v1" and (root / "part").read_text() == "mine"
    assert demo.build_in_cache("set-v1", write, tmp_path) == root and len(calls) == 1  # found, not rebuilt
    assert not calls[0].exists()  # the staging folder was renamed into place

    def lose_the_race(folder):  # another rank renames its complete set into place while this one builds
        (folder / "part").write_text("late")
        (tmp_path / "other-v1").mkdir()
        (tmp_path / "other-v1" / "part").write_text("first")

    assert (demo.build_in_cache("other-v1", lose_the_race, tmp_path) / "part").read_text() == "first"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other-v1", "set-v1"]  # no staging folder left


@pytest.mark.parametrize("missing", ["train", "val"])
def test_missing_split_folder_is_named(fresh_tree, missing):
    import shutil

    shutil.rmtree(fresh_tree / missing)
    with pytest.raises(FileNotFoundError, match=str(fresh_tree / missing)):
        _loaders(fresh_tree, "auto")


def test_empty_class_folder_is_named(fresh_tree):
    for image in (fresh_tree / "val" / "dog").iterdir():
        image.unlink()
    with pytest.raises(data.ImageFolderError, match=str(fresh_tree / "val" / "dog")):
        _loaders(fresh_tree, "auto")


def test_class_folders_differing_between_splits_are_named(fresh_tree):
    (fresh_tree / "val" / "eel").rename(fresh_tree / "val" / "elk")
    with pytest.raises(data.ImageFolderError, match=r"only in train: \['eel'\], only in val: \['elk'\]"):
        _loaders(fresh_tree, "auto")


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_undecodable_file_is_named(fresh_tree, backend):
    bad = fresh_tree / "val" / "dog" / "07.jpg"
    bad.write_bytes(b"this is not a JPEG" * 20)
    loaders = _loaders(fresh_tree, backend)
    with pytest.raises(data.BadImageError, match=str(bad)):
        _epoch(loaders.val, 0)


def test_synthetic_loader_reuses_device_resident_batches():
    loader = data.synthetic_loader(batch_size=8, image_size=16, num_classes=5, steps=3, device="cpu")
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    images, labels = batches[0]
    assert images.shape == (8, 3, 16, 16) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 5
    assert all(b[0] is images and b[1] is labels for b in batches)


def test_bad_arguments_are_named(tree):
    with pytest.raises(ValueError, match="rank"):
        _loaders(tree, "auto", rank=2, world_size=2)
    with pytest.raises(ValueError, match="backend"):
        _loaders(tree, "opencv")
    with pytest.raises(ValueError, match="batch_size"):
        _loaders(tree, "auto", batch_size=10, world_size=2)
    with pytest.raises(ValueError, match="decode_device"):
        _loaders(tree, "torchvision", decode_device="gpu")


def test_auto_backend_falls_back_to_torchvision_without_dali(tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    assert _loaders(tree, "auto").backend == "torchvision"
    with pytest.raises(ImportError, match="DALI"):
        _loaders(tree, "dali")


def test_importing_rankkd_data_does_not_import_dali():
    check = "import sys, rankkd.data; assert 'nvidia.dali' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_dali
def test_dali_gpu_pipeline_matches_cpu_layout(tree):
    gpu = _loaders(tree, "dali", device="cuda")
    for images, labels in _epoch(gpu.train, 0) + _epoch(gpu.val, 0):
        assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last)
    classes_from_pixels = ((_pixel_means(images.cpu())[:, 0] - _red(0)) / 80).round().long()
    assert torch.equal(classes_from_pixels, labels.cpu())
