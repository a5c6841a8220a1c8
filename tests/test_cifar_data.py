"""rankkd.data.cifar: reading the CIFAR-100 pickles, and the device-resident loaders (run here on CPU
tensors), checked against a slow per-sample reference of mdistiller's transform."""
import dataclasses
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy._core.multiarray import _reconstruct

from rankkd.data import cifar
from rankkd.data.cifar import CifarDataError, ImageArrays, load_cifar100, make_device_loaders

NUM_TRAIN, NUM_VAL = 300, 100
FINE_NAMES = [f"class_{label:02d}" for label in range(100)]


class _Python2StylePickler(pickle.Pickler):
    """Writes arrays as Python 2 did: numpy 1's module path, the pixel buffer as a (latin-1) string."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
            return _reconstruct, (np.ndarray, (0,), b"b"), state
        return NotImplemented


def _pickle_split(data: np.ndarray, labels, *, py2_style: bool) -> bytes:
    """The official layout. py2_style: bytes keys, numpy 1's module path and a string pixel buffer, as Python 2
    wrote them (and as some converted files have the keys)."""
    content = {"filenames": [f"{i}.png" for i in range(len(data))], "batch_label": "generated",
               "fine_labels": list(labels), "coarse_labels": [label // 5 for label in labels], "data": data}
    if not py2_style:
        return pickle.dumps(content, protocol=2)
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump({key.encode(): value for key, value in content.items()})
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def _write_folder(parent, *, seed=0, train_labels=None, train_data=None, meta=True):
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    data = {"train": rng.integers(0, 256, (NUM_TRAIN, 3072), dtype=np.uint8) if train_data is None else train_data,
            "test": rng.integers(0, 256, (NUM_VAL, 3072), dtype=np.uint8)}
    labels = {"train": rng.integers(0, 100, len(data["train"])).tolist() if train_labels is None else train_labels,
              "test": [0, 99] + rng.integers(0, 100, NUM_VAL - 2).tolist()}
    (folder / "train").write_bytes(_pickle_split(data["train"], labels["train"], py2_style=False))
    (folder / "test").write_bytes(_pickle_split(data["test"], labels["test"], py2_style=True))
    if meta:
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": FINE_NAMES,
                                                    "coarse_label_names": [str(i) for i in range(20)]}, protocol=2))
    return folder, data, labels


def _archive(folder, target):
    with tarfile.open(target, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    return target


def _assert_arrays_equal(a: ImageArrays, b: ImageArrays):
    for name in ("train_images", "train_labels", "val_images", "val_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.classes, a.mean, a.std) == (b.classes, b.mean, b.std)


# -- reading ----------------------------------------------------------------------------------------------------------

def test_folder_parent_and_archive_load_the_same_arrays(tmp_path):
    folder, data, labels = _write_folder(tmp_path / "data")
    arrays = load_cifar100(folder)
    for split, images, split_labels in (("train", arrays.train_images, arrays.train_labels),
                                        ("test", arrays.val_images, arrays.val_labels)):
        assert images.dtype == torch.uint8 and images.shape == (len(data[split]), 3, 32, 32)
        # Row layout is channel-major: the first 1024 bytes are the red plane, row after row.
        assert torch.equal(images[:, 0].reshape(len(images), -1), torch.from_numpy(data[split][:, :1024]))
        assert torch.equal(images.reshape(len(images), -1), torch.from_numpy(data[split]))
        assert split_labels.dtype == torch.int64 and split_labels.tolist() == labels[split]
    assert arrays.num_classes == 100 and arrays.classes == FINE_NAMES
    assert (arrays.mean, arrays.std) == (cifar.CIFAR100_MEAN, cifar.CIFAR100_STD)

    archive = _archive(folder, tmp_path / "cifar-100-python.tar.gz")
    archive_only = tmp_path / "only_archive"
    archive_only.mkdir()
    archive.rename(archive_only / archive.name)
    for source in (tmp_path / "data", archive_only / archive.name, archive_only):
        _assert_arrays_equal(load_cifar100(source), arrays)


def test_without_meta_classes_are_numbers(tmp_path):
    folder, _, _ = _write_folder(tmp_path, meta=False)
    assert load_cifar100(folder).classes == [str(label) for label in range(100)]


class _RunsCode:
    """Unpickling this would call os.system; the loader must refuse before that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _damage(folder, how):
    """Damages the folder; returns the path and the message fragment the error must contain."""
    train, test = folder / "train", folder / "test"
    rng = np.random.default_rng(1)
    if how == "missing test":
        test.unlink()
        return test, "missing file"
    if how == "garbage":
        train.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
        return train, "not a readable CIFAR pickle"
    if how == "truncated":
        test.write_bytes(test.read_bytes()[:1000])
        return test, "not a readable CIFAR pickle"
    if how == "not a dict":
        train.write_bytes(pickle.dumps([1, 2, 3]))
        return train, "expected a pickled dict"
    if how == "missing key":
        train.write_bytes(pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "coarse_labels": [0, 0, 0]}))
        return train, "missing key 'fine_labels'"
    if how == "wrong shape":
        train.write_bytes(_pickle_split(np.zeros((4, 3000), np.uint8), [0] * 4, py2_style=False))
        return train, "(N, 3072)"
    if how == "wrong dtype":
        train.write_bytes(_pickle_split(np.zeros((4, 3072), np.float32), [0] * 4, py2_style=False))
        return train, "uint8"
    if how == "label count":
        train.write_bytes(_pickle_split(np.zeros((4, 3072), np.uint8), [0] * 5, py2_style=False))
        return train, "5 fine_labels for 4 rows"
    if how == "label out of range":
        test.write_bytes(_pickle_split(np.zeros((4, 3072), np.uint8), [3, 100, 0, 1], py2_style=True))
        return test, "fine_labels must lie in [0, 100)"
    if how == "negative label":
        train.write_bytes(_pickle_split(np.zeros((4, 3072), np.uint8), [3, -1, 0, 1], py2_style=False))
        return train, "fine_labels must lie in [0, 100)"
    if how == "bad meta":
        (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": ["a", "b"]}))
        return folder / "meta", "fine_label_names"
    raise AssertionError(how)


DAMAGES = ["missing test", "garbage", "truncated", "not a dict", "missing key", "wrong shape", "wrong dtype",
           "label count", "label out of range", "negative label", "bad meta"]


@pytest.mark.parametrize("how", DAMAGES)
def test_bad_files_are_refused_by_name(tmp_path, how):
    folder, _, _ = _write_folder(tmp_path / "data")
    path, fragment = _damage(folder, how)
    for source in (folder, tmp_path / "data"):
        with pytest.raises(CifarDataError) as error:
            load_cifar100(source)
        assert str(path) in str(error.value) and fragment in str(error.value), str(error.value)
        assert isinstance(error.value, ValueError)
    archive = _archive(folder, tmp_path / "cifar-100-python.tar.gz")
    member = f"cifar-100-python/{path.name}"
    with pytest.raises(CifarDataError) as error:
        load_cifar100(archive)
    assert str(archive) in str(error.value) and member in str(error.value), str(error.value)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    folder, _, _ = _write_folder(tmp_path / "data")
    marker = tmp_path / "ran"
    (folder / "train").write_bytes(pickle.dumps({"data": _RunsCode(marker), "fine_labels": []}))
    with pytest.raises(CifarDataError, match="refusing to load the global"):
        load_cifar100(folder)
    assert not marker.exists()


def test_missing_path_and_non_archive_file(tmp_path):
    with pytest.raises(CifarDataError, match="no such file or folder"):
        load_cifar100(tmp_path / "nowhere")
    with pytest.raises(CifarDataError, match="holds neither"):
        load_cifar100(tmp_path)
    not_tar = tmp_path / "cifar-100-python.tar.gz"
    not_tar.write_bytes(b"this is not an archive" * 10)
    with pytest.raises(CifarDataError, match="not a readable tar archive") as error:
        load_cifar100(not_tar)
    assert str(not_tar) in str(error.value)
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(CifarDataError, match="missing member cifar-100-python/train"):
        load_cifar100(empty)


# -- the loaders ------------------------------------------------------------------------------------------------------

def _random_arrays(num_train, num_val, *, height=32, width=32, num_classes=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return ImageArrays(torch.randint(256, (num_train, 3, height, width), generator=generator, dtype=torch.uint8),
                       torch.randint(num_classes, (num_train,), generator=generator),
                       torch.randint(256, (num_val, 3, height, width), generator=generator, dtype=torch.uint8),
                       torch.randint(num_classes, (num_val,), generator=generator),
                       [f"c{i}" for i in range(num_classes)], (0.3, 0.5, 0.6), (0.2, 0.25, 0.3))


def _reference_normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    return (pixels.double() / 255 - mean) / std


def _reference_train_sample(image, top, left, flip, mean, std):
    """mdistiller's RandomCrop(padding=4) + RandomHorizontalFlip + Normalize, one image at a time, in float64."""
    height, width = image.shape[1:]
    padded = F.pad(image.double(), (4, 4, 4, 4))
    crop = padded[:, top:top + height, left:left + width]
    if flip:
        crop = crop.flip(-1)
    return _reference_normalize(crop, mean, std)


@pytest.mark.parametrize("height,width", [(32, 32), (13, 21)])
def test_train_batches_match_per_sample_reference(height, width):
    arrays = _random_arrays(61, 5, height=height, width=width)
    mean, std = (0.45, 0.5, 0.55), (0.2, 0.3, 0.25)
    train = make_device_loaders(arrays, batch_size=7, device="cpu", seed=3, mean=mean, std=std).train
    train.set_epoch(2)
    plan = train.plan
    batches = list(train)
    assert len(batches) == len(train) == 61 // 7 and train.num_samples == len(plan.indices) == 56
    for b, (images, labels) in enumerate(batches):
        assert images.dtype == torch.float32 and images.shape == (7, 3, height, width)
        assert labels.dtype == torch.int64
        for j in range(7):
            i = b * 7 + j
            index = int(plan.indices[i])
            expected = _reference_train_sample(arrays.train_images[index], int(plan.top[i]), int(plan.left[i]),
                                               bool(plan.flip[i]), mean, std)
            torch.testing.assert_close(images[j].double(), expected, rtol=0, atol=2e-6)
            assert labels[j] == arrays.train_labels[index]


def test_augmentation_draws_every_offset_and_both_flips():
    train = make_device_loaders(_random_arrays(2000, 4), batch_size=50, device="cpu").train
    for epoch in (0, 5):
        train.set_epoch(epoch)
        plan = train.plan
        for offsets in (plan.top, plan.left):
            assert offsets.dtype == torch.int64
            counts = torch.bincount(offsets, minlength=9)
            assert len(counts) == 9 and bool((counts > 100).all()), counts  # ~222 each; 2 * padding + 1 values
        assert plan.flip.dtype == torch.bool and 800 < int(plan.flip.sum()) < 1200
    # The offsets really move the image: with a constant image, the padded border shows up as zeros (in pixel
    # value) exactly where the crop reaches past the image.
    arrays = _random_arrays(64, 4)
    constant = dataclasses.replace(arrays, train_images=torch.full_like(arrays.train_images, 200))
    train = make_device_loaders(constant, batch_size=64, device="cpu", mean=(0, 0, 0), std=(1, 1, 1)).train
    images, _ = next(iter(train))
    plan = train.plan
    border_rows = (images[:, 0, :, 0] == 0)  # column 0 of the output; a flip moves the right edge there
    for j in range(64):
        top, left, flip = int(plan.top[j]), int(plan.left[j]), bool(plan.flip[j])
        first_column = left + 31 if flip else left
        column_in_image = 4 <= first_column < 36
        rows_in_image = torch.tensor([4 <= top + r < 36 for r in range(32)])
        assert torch.equal(~border_rows[j], rows_in_image & column_in_image)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_permutation_is_shared_and_split_across_ranks(world_size):
    arrays = _random_arrays(101, 4)
    batch_size = 8
    loaders = [make_device_loaders(arrays, batch_size=batch_size, device="cpu", rank=rank, world_size=world_size,
                                   seed=11).train for rank in range(world_size)]
    per_epoch = []
    for epoch in range(3):
        seen = []
        for loader in loaders:
            loader.set_epoch(epoch)
            assert len(loader) == 101 // (batch_size * world_size)
            labels = torch.cat([labels for _, labels in loader])
            assert torch.equal(labels, arrays.train_labels[loader.plan.indices])
            seen.append(loader.plan.indices)
        seen = torch.cat(seen)
        assert len(seen) == len(loaders[0]) * batch_size * world_size
        assert len(set(seen.tolist())) == len(seen) and 0 <= int(seen.min()) and int(seen.max()) < 101
        per_epoch.append(seen)
    assert not torch.equal(per_epoch[0], per_epoch[1]) and not torch.equal(per_epoch[1], per_epoch[2])
    other_seed = make_device_loaders(arrays, batch_size=batch_size, device="cpu", world_size=world_size, seed=12)
    assert not torch.equal(other_seed.train.plan.indices, per_epoch[0][:len(other_seed.train.plan.indices)])
    if world_size > 1:  # each rank crops and flips its own way
        assert not torch.equal(loaders[0].plan.top, loaders[1].plan.top)


def test_same_seed_epoch_rank_gives_bit_identical_batches():
    arrays = _random_arrays(90, 10)
    make = lambda: make_device_loaders(arrays, batch_size=9, device="cpu", rank=1, world_size=2, seed=5).train
    uninterrupted, resumed = make(), make()
    for epoch in range(3):
        uninterrupted.set_epoch(epoch)
        first_pass = list(uninterrupted)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first_pass, uninterrupted))
    resumed.set_epoch(2)  # a run resumed at epoch 2 reads what the uninterrupted run read
    for (a, a_labels), (b, b_labels) in zip(first_pass, resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(a_labels, b_labels)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_val", [100, 7])
def test_val_covers_every_image_once(world_size, num_val):
    arrays = _random_arrays(40, num_val)
    images, labels, sizes = [], [], []
    for rank in range(world_size):
        val = make_device_loaders(arrays, batch_size=3, val_batch_size=16, device="cpu", rank=rank,
                                  world_size=world_size).val
        batches = list(val)
        assert len(batches) == len(val) == -(-val.num_samples // 16)
        assert all(len(batch[0]) == 16 for batch in batches[:-1])
        val.set_epoch(4)  # no effect
        assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, val))
        images += [batch[0] for batch in batches]
        labels += [batch[1] for batch in batches]
        sizes.append(val.num_samples)
    assert sum(sizes) == num_val and max(sizes) - min(sizes) <= 1
    torch.testing.assert_close(torch.cat(images).double(),
                               _reference_normalize(arrays.val_images, arrays.mean, arrays.std), rtol=0, atol=2e-6)
    assert torch.equal(torch.cat(labels), arrays.val_labels)


def test_channels_last_output_and_same_values_either_way():
    arrays = _random_arrays(50, 20)
    outputs = {}
    for channels_last in (True, False):
        loaders = make_device_loaders(arrays, batch_size=10, device="cpu", seed=1, channels_last=channels_last)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        outputs[channels_last] = [images for loader in (loaders.train, loaders.val) for images, _ in loader]
        assert all(images.is_contiguous(memory_format=memory_format) for images in outputs[channels_last])
        assert loaders.backend == "device" and loaders.num_classes == 7 and loaders.classes == arrays.classes
    assert all(torch.equal(a, b) for a, b in zip(outputs[True], outputs[False], strict=True))


def test_arguments_are_checked():
    arrays = _random_arrays(20, 4)
    bad = [({"batch_size": 0}, "batch_size must be an integer >= 1"),
           ({"batch_size": 2.0}, "batch_size must be an integer"),
           ({"val_batch_size": 0}, "val_batch_size"),
           ({"world_size": 0}, "world_size"),
           ({"rank": 2, "world_size": 2}, r"rank must be in \[0, world_size=2\)"),
           ({"rank": -1}, "rank must be an integer >= 0"),
           ({"seed": -3}, "seed"),
           ({"batch_size": 7, "world_size": 3}, "20 train images are fewer than batch_size \\* world_size"),
           ({"std": (0.2, 0, 0.2)}, "std values must be > 0"),
           ({"mean": (0.5, 0.5)}, "one value per RGB channel"),
           ({"device": "meta"}, "CPU or CUDA device")]
    for overrides, message in bad:
        kwargs = {"batch_size": 4, "device": "cpu", **overrides}
        with pytest.raises(ValueError, match=message):
            make_device_loaders(arrays, **kwargs)
    with pytest.raises(ValueError, match="set_epoch: epoch must be >= 0"):
        make_device_loaders(arrays, batch_size=4, device="cpu").train.set_epoch(-1)


def test_image_arrays_are_checked():
    good = vars(_random_arrays(6, 3))
    bad = [({"train_labels": torch.tensor([0, 1, 2, 3, 4, 7])}, r"train_labels span \[0, 7\], outside \[0, 7\)"),
           ({"val_labels": torch.tensor([0, 1])}, r"val_labels must be int64 of shape \(3,\)"),
           ({"train_images": good["train_images"].float()}, "train_images must be a non-empty uint8"),
           ({"val_images": good["val_images"][:, :, :8]}, "train images are"),
           ({"classes": []}, "classes is empty")]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            ImageArrays(**{**good, **overrides})


def test_synthetic_arrays():
    arrays = cifar.synthetic_arrays(num_train=64, num_val=10, num_classes=5, seed=2)
    assert arrays.train_images.shape == (64, 3, 32, 32) and arrays.val_images.shape == (10, 3, 32, 32)
    assert arrays.train_images.dtype == torch.uint8 and arrays.num_classes == 5
    assert int(arrays.train_labels.max()) < 5 and int(arrays.train_images.max()) > 200
    _assert_arrays_equal(arrays, cifar.synthetic_arrays(num_train=64, num_val=10, num_classes=5, seed=2))
    with pytest.raises(ValueError, match="num_val must be an integer >= 1"):
        cifar.synthetic_arrays(num_val=0)


def test_demo_arrays_are_the_demo_tree(tmp_path):
    from PIL import Image

    from rankkd.data import prepare_demo
    from rankkd.data.folder import list_image_folder

    arrays = cifar.demo_arrays(tmp_path)
    assert arrays.train_images.shape == (1437, 3, 32, 32) and arrays.val_images.shape == (360, 3, 32, 32)
    assert arrays.train_images.dtype == torch.uint8 and arrays.classes == [str(d) for d in range(10)]
    listing = list_image_folder(prepare_demo(tmp_path))
    assert arrays.val_labels.tolist() == listing.val.labels
    assert torch.bincount(arrays.train_labels).tolist() == np.bincount(listing.train.labels).tolist()
    for split, images in ((listing.train, arrays.train_images), (listing.val, arrays.val_images)):
        for i in (0, len(split) - 1):
            with Image.open(split.files[i]) as image:
                assert torch.equal(images[i].permute(1, 2, 0), torch.from_numpy(np.array(image.convert("RGB"))))
    # Its own statistics: the normalized train set has mean ~0 and std ~1 per channel.
    train_as_val = dataclasses.replace(arrays, val_images=arrays.train_images, val_labels=arrays.train_labels)
    train_as_val = make_device_loaders(train_as_val, batch_size=64, val_batch_size=1437, device="cpu").val
    normalized, _ = next(iter(train_as_val))
    torch.testing.assert_close(normalized.double().mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(normalized.double().std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64),
                               atol=1e-4, rtol=0)
