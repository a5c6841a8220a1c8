"""DeiT's data-side pieces: RandAugment, random erasing and repeated augmentation in the loaders (its sharding:
test_sharding.py), and the mixup / cutmix / label-smoothing batch mixer."""
import numpy as np
import pytest
import torch
from PIL import Image
from test_data import CLASSES, _pixel_means, _write_tree

import rankkd.data as data
from conftest import DATA_BACKENDS, needs_dali
from rankkd.data.mixing import make_batch_mixer



@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def flat_tree(tmp_path_factory):
    """Single-colour images (JPEG keeps them exactly flat), so any pixel off the image's colour was erased."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(1)
    for split, per_class in (("train", 64), ("val", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                colour = rng.integers(30, 220, 3, dtype=np.uint8)
                Image.fromarray(np.broadcast_to(colour, (16, 16, 3)).copy()).save(root / split / name / f"{i}.jpg")
    return root


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


@needs_dali
def test_dali_rand_augment_runs_on_cpu_changes_images_and_is_deterministic(flat_tree):
    common = {"batch_size": 16, "image_size": 16, "backend": "dali", "num_threads": 1, "seed": 5}
    # Flat images stay flat through crops and resizing: the plain epoch reads the same files as flat colours.
    plain = torch.cat([images for images, _ in _epoch(
        data.make_loaders(flat_tree, augment=data.TrainAugmentation(hflip=False), **common).train, 0)])
    train = data.make_loaders(flat_tree, augment=data.TrainAugmentation(hflip=False, rand_augment_ops=2),
                              **common).train
    first, again = _epoch(train, 0), _epoch(train, 0)
    images = torch.cat([images for images, _ in first])
    assert images.shape == plain.shape == (192, 3, 16, 16)
    assert images.is_contiguous(memory_format=torch.channels_last)
    changed = ((images - plain).abs().flatten(1).amax(dim=1) > 0.05).float().mean()
    # Each of the 2 layers applies one of 15 operations with probability 0.5; on a flat image all but
    # auto-contrast and sharpness show, so (1 - 0.5 * 13 / 15) ** 2 = 32% of the images stay unchanged.
    assert 0.55 <= changed <= 0.8
    for (images, labels), (images_again, labels_again) in zip(first, again, strict=True):
        assert torch.equal(images, images_again) and torch.equal(labels, labels_again)


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_random_erasing_erases_a_quarter_of_the_images_with_unit_noise(flat_tree, backend):
    loaders = data.make_loaders(flat_tree, batch_size=64, image_size=16, backend=backend, num_threads=1,
                                augment=data.TrainAugmentation(random_erasing=0.25), seed=2)
    erased_count, erased_area, noise = 0, [], []
    images_seen = 0
    for epoch in range(3):
        for images, _ in _epoch(loaders.train, epoch):
            # A flat image's colour is its per-channel median; erased pixels are N(0, 1) draws far from it.
            colour = images.flatten(2).median(dim=2).values[:, :, None, None]
            off = ((images - colour).abs() > 1e-3).any(dim=1)
            erased = off.flatten(1).any(dim=1)
            erased_count += int(erased.sum())
            images_seen += len(images)
            for image, mask, is_erased in zip(images, off, erased):
                if is_erased:
                    erased_area.append(float(mask.float().mean()))
                    noise.append(image[:, mask].flatten())
    assert images_seen == 3 * 192
    assert 0.19 <= erased_count / images_seen <= 0.31
    # Rectangles of 2%..1/3 of the area (rounded to whole pixels, hence the slack; a noise pixel can land on the
    # colour itself, hence the lower bound's).
    assert 0.005 <= min(erased_area) and max(erased_area) <= 0.45
    noise = torch.cat(noise).double()
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


@pytest.mark.parametrize("backend", DATA_BACKENDS)
def test_loaders_with_repeats_read_copies_on_both_ranks(tree, backend):
    seen = {}
    for rank in range(2):
        loaders = data.make_loaders(tree, batch_size=4, image_size=24, backend=backend, num_threads=1, rank=rank,
                                    world_size=2, augment=data.TrainAugmentation(repeats=3), seed=1)
        assert len(loaders.train) == 2 and loaders.train.num_samples == 8
        images = torch.cat([images for images, _ in _epoch(loaders.train, 0)])
        seen[rank] = ((_pixel_means(images)[:, 1] - 10) / 12).round().long().tolist()
        assert loaders.val.num_samples in (7, 8)  # validation: unchanged, exact
    counts = np.bincount(seen[0] + seen[1])
    assert sorted(counts[counts > 0].tolist()) == [1, 3, 3, 3, 3, 3]  # 16 reads: 5 images x 3, 1 cut short
    for image in np.flatnonzero(counts == 3):
        assert image in seen[0] and image in seen[1]


def _distinct_batch(n, size=8, channels_last=True):
    images = torch.randn(n, 3, size, size, dtype=torch.float64).float()
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def _mode_and_lambda(images, mixed, targets, labels):
    """('mixup' | 'cutmix', lambda) recovered from the output, checking that one lambda explains the batch."""
    partner = images.roll(1, 0)
    own = targets[torch.arange(len(labels)), labels].double()
    lam = float(own[0])
    assert torch.allclose(own, torch.full_like(own, lam), atol=1e-6)  # one lambda for the whole batch
    pasted = mixed == partner
    if ((mixed == images) | pasted).all():
        box = pasted.all(dim=(0, 1))  # the same box in every image and channel
        assert torch.equal(pasted, box.expand_as(pasted))
        assert abs(lam - (1 - float(box.double().mean()))) < 1e-6  # labels weighted by the pasted area
        return "cutmix", lam
    expected = lam * images.double() + (1 - lam) * partner.double()
    assert torch.allclose(mixed.double(), expected, atol=1e-5)
    return "mixup", lam


def test_mixup_cutmix_per_batch_label_mass_and_switching():
    num_classes, n = 10, 7
    mixer = make_batch_mixer(num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, seed=3)
    modes, lambdas = [], []
    for _ in range(200):
        images = _distinct_batch(n)
        labels = torch.randperm(num_classes)[:n]
        mixed, targets = mixer(images, labels)
        assert mixed.shape == images.shape and mixed.is_contiguous(memory_format=torch.channels_last)
        assert targets.shape == (n, num_classes) and targets.dtype == torch.float32 and (targets >= 0).all()
        assert torch.allclose(targets.double().sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-6)
        # Each row holds its own label and its partner's, nothing else.
        expected_support = torch.zeros(n, num_classes, dtype=torch.bool)
        expected_support[torch.arange(n), labels] = True
        expected_support[torch.arange(n), labels.roll(1)] = True
        assert not (targets[~expected_support] > 0).any()
        mode, lam = _mode_and_lambda(images, mixed, targets, labels)
        modes.append(mode)
        lambdas.append(lam)
    cutmix_share = modes.count("cutmix") / len(modes)
    assert 0.38 <= cutmix_share <= 0.62
    mixup_lambdas = np.array([lam for lam, mode in zip(lambdas, modes) if mode == "mixup"])
    assert abs(mixup_lambdas.mean() - 0.5) < 0.08 and mixup_lambdas.std() > 0.25  # Beta(0.8, 0.8)


@pytest.mark.parametrize(("switch_prob", "mode"), [(0.0, "mixup"), (1.0, "cutmix")])
def test_switch_prob_picks_the_mode(switch_prob, mode):
    mixer = make_batch_mixer(5, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=switch_prob)
    for _ in range(20):
        images, labels = _distinct_batch(5, channels_last=False), torch.randperm(5)
        mixed, targets = mixer(images, labels)
        assert _mode_and_lambda(images, mixed, targets, labels)[0] == mode


def test_label_smoothing_with_mixing_and_without():
    num_classes, eps = 7, 0.1
    images, labels = _distinct_batch(5), torch.tensor([0, 6, 3, 3, 1])
    plain = make_batch_mixer(num_classes, label_smoothing=eps)
    same_images, targets = plain(images, labels)
    assert same_images is images
    expected = torch.full((5, num_classes), eps / num_classes, dtype=torch.float64)
    expected[torch.arange(5), labels] = 1 - eps + eps / num_classes
    assert torch.allclose(targets.double(), expected, atol=1e-7)

    mixed_targets = {}
    for smoothing in (0.0, eps):
        mixer = make_batch_mixer(num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=smoothing, seed=4)
        mixed_targets[smoothing] = mixer(images, labels)[1].double()
    # timm's Mixup mixes smoothed one-hot rows; the same rows.
    assert torch.allclose(mixed_targets[eps], (1 - eps) * mixed_targets[0.0] + eps / num_classes, atol=1e-6)


def test_mixer_is_determined_by_seed_epoch_and_rank_and_leaves_the_global_generator_alone():
    def run(seed=0, rank=0, epoch=0):
        mixer = make_batch_mixer(6, mixup_alpha=0.8, cutmix_alpha=1.0, seed=seed, rank=rank)
        mixer.set_epoch(epoch)
        generator = torch.Generator().manual_seed(11)
        batches = []
        for _ in range(4):
            images = torch.randn(4, 3, 6, 6, generator=generator)
            batches.append(mixer(images, torch.randint(6, (4,), generator=generator)))
        return torch.cat([torch.cat([images.flatten(), targets.flatten()]) for images, targets in batches])

    state = torch.get_rng_state()
    reference = run()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(run(), reference)
    for other in (run(seed=1), run(rank=1), run(epoch=1)):
        assert not torch.equal(other, reference)


def test_mixer_off_and_bad_arguments():
    assert make_batch_mixer(10) is None
    assert make_batch_mixer(10, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0) is None
    for name, value in (("mixup_alpha", -0.1), ("switch_prob", 1.5), ("label_smoothing", 1.0), ("num_classes", 1)):
        args = {"num_classes": 10, name: value}
        with pytest.raises(ValueError, match=name):
            make_batch_mixer(**args)
    with pytest.raises(ValueError, match="labels"):
        make_batch_mixer(4, mixup_alpha=1.0)(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4))


@pytest.mark.parametrize(("name", "value"), [("rand_augment_ops", -1), ("rand_augment_magnitude", 11),
                                             ("random_erasing", 1.5), ("repeats", 0)])
def test_augmentation_options_are_checked(name, value):
    with pytest.raises(ValueError, match=name):
        data.TrainAugmentation(**{name: value})

