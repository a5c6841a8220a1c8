"""Which samples each rank reads (rankkd.data.sharding): training passes, repeated augmentation, validation blocks
and the augmentation seeds, all functions of (seed, epoch, rank)."""
import math

import numpy as np
import pytest

from rankkd.data.sharding import (TrainShard, ValShard, augmentation_seed, train_batches_per_rank,
                                  train_epoch_indices)

# (num_files, batch_size, world_size): odd sizes, a remainder of almost a whole global batch, one process, and a
# listing smaller than one global batch.
TRAIN_CASES = [(1000, 8, 4), (517, 5, 3), (203, 4, 2), (97, 7, 5), (64, 8, 1), (47, 8, 6), (13, 4, 4)]


def _random_cases(count):
    """Fresh sizes every run, drawn at collection so that a failing test's id names them."""
    rng = np.random.default_rng()
    return [(int(rng.integers(1, 3000)), int(rng.integers(1, 17)), int(rng.integers(1, 9))) for _ in range(count)]


def _shards(num_files, batch_size, world_size, *, seed, epoch):
    shards = [TrainShard(num_files, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
              for rank in range(world_size)]
    for shard in shards:
        shard.set_epoch(epoch)
    return shards


@pytest.mark.parametrize(("num_files", "batch_size", "world_size"), TRAIN_CASES + _random_cases(4))
@pytest.mark.parametrize("seed", [int(np.random.default_rng().integers(2**32))])
def test_a_train_pass_reads_each_sample_at_most_once_in_equal_full_batches(num_files, batch_size, world_size, seed):
    epoch = 3
    shards = _shards(num_files, batch_size, world_size, seed=seed, epoch=epoch)
    steps = num_files // (world_size * batch_size)
    passes = [shard.epoch_indices() for shard in shards]
    for shard, indices in zip(shards, passes):
        assert len(shard) == steps and shard.num_samples == steps * batch_size == len(indices)
        assert indices.dtype.kind == "i"
    read = np.concatenate(passes)
    assert len(np.unique(read)) == len(read) and read.min(initial=0) >= 0 and read.max(initial=0) < num_files
    assert 0 <= num_files - len(read) < world_size * batch_size  # only the remainder is left out
    # The ranks' reads, in rank order, are the front of the epoch's permutation of the whole listing: each rank a
    # contiguous slice of it.
    permutation = np.random.default_rng([seed, epoch]).permutation(num_files)
    np.testing.assert_array_equal(read, permutation[:len(read)])


@pytest.mark.parametrize(("num_files", "batch_size", "world_size"), [(517, 5, 3), (203, 4, 2), (97, 7, 5)])
@pytest.mark.parametrize("seed", [int(np.random.default_rng().integers(2**32 - 1))])
def test_a_pass_is_a_function_of_seed_epoch_and_rank_alone(num_files, batch_size, world_size, seed):

    def reads(epoch, *, seed=seed):
        return [shard.epoch_indices() for shard in _shards(num_files, batch_size, world_size, seed=seed, epoch=epoch)]

    # The same pass from fresh objects, and from one that went through earlier epochs first (resuming is exact).
    walked = TrainShard(num_files, batch_size=batch_size, seed=seed, rank=world_size - 1, world_size=world_size)
    for epoch in range(4):
        walked.set_epoch(epoch)
        walked.epoch_indices()
    assert all(np.array_equal(a, b) for a, b in zip(reads(3), reads(3), strict=True))
    np.testing.assert_array_equal(walked.epoch_indices(), reads(3)[-1])
    # Another epoch or seed: another order, and another remainder left out, so that no file is always left out.
    assert not np.array_equal(reads(4)[0], reads(3)[0]) and not np.array_equal(reads(3, seed=seed + 1)[0],
                                                                                reads(3)[0])
    left_out = [set(range(num_files)) - set(np.concatenate(reads(epoch)).tolist()) for epoch in range(40)]
    assert len({frozenset(files) for files in left_out}) > 1 and not set.intersection(*left_out)


@pytest.mark.parametrize("base", [int(np.random.default_rng().integers(2**32 - 3))])
def test_augmentation_seeds_differ_by_seed_epoch_and_rank(base):
    grid = [(seed, epoch, rank) for seed in (base, base + 1, base + 2) for epoch in range(4) for rank in range(5)]
    seeds = [augmentation_seed(*key) for key in grid]
    assert all(type(s) is int and 0 <= s < 2**31 for s in seeds)  # DALI pipelines take int32 seeds
    assert len(set(seeds)) == len(grid) and seeds == [augmentation_seed(*key) for key in grid]
    shard = TrainShard(100, batch_size=4, seed=base, rank=3, world_size=5)
    shard.set_epoch(2)
    assert shard.epoch_augmentation_seed() == augmentation_seed(base, 2, 3)


def test_negative_epoch_is_refused():
    shard = TrainShard(10, batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"^set_epoch: epoch must be >= 0, got -1$"):
        shard.set_epoch(-1)
    assert shard.epoch == 0


# (num_files, batch_size, world_size): ImageNet's val on 8 GPUs, odd sizes, more ranks than files, no files.
VAL_CASES = [(50000, 64, 8), (5000, 48, 7), (7, 2, 3), (3, 4, 5), (1, 1, 2), (0, 3, 2)]


@pytest.mark.parametrize(("num_files", "batch_size", "world_size"), VAL_CASES + _random_cases(4))
def test_val_blocks_are_contiguous_balanced_and_cover_the_listing(num_files, batch_size, world_size):
    shards = [ValShard(num_files, batch_size=batch_size, rank=rank, world_size=world_size)
              for rank in range(world_size)]
    # Concatenated in rank order, the blocks are the listing itself: each contiguous, nothing twice, nothing left.
    np.testing.assert_array_equal(np.concatenate([shard.indices for shard in shards]), np.arange(num_files))
    sizes = sorted(len(shard.indices) for shard in shards)
    assert sizes == sorted(len(block) for block in np.array_split(np.arange(num_files), world_size))
    for shard in shards:
        assert shard.num_samples == len(shard.indices)
        assert len(shard) == math.ceil(len(shard.indices) / batch_size)  # the last batch may be partial
        before = shard.indices.copy()
        shard.set_epoch(7)
        np.testing.assert_array_equal(shard.indices, before)


# Repeated augmentation (DeiT's RASampler): the copies of an image dealt to different ranks.

def _deit_ra_indices(permutation, *, repeats, world_size, rank, num_selected):
    """DeiT's RASampler dealing (samplers.py), given the epoch's permutation."""
    indices = [int(i) for i in permutation for _ in range(repeats)]
    total = -(-len(indices) // world_size) * world_size
    indices += indices[:total - len(indices)]
    return np.array(indices[rank:total:world_size][:num_selected])


@pytest.mark.parametrize(("num_files", "batch_size", "world_size", "repeats"),
                         [(1000, 8, 4, 3), (517, 5, 3, 3), (203, 4, 2, 3), (96, 4, 1, 2)])
def test_repeated_augmentation_deals_copies_to_ranks(num_files, batch_size, world_size, repeats):
    def indices(rank, epoch=0, seed=7):
        return train_epoch_indices(num_files, batch_size=batch_size, seed=seed, epoch=epoch, rank=rank,
                                   world_size=world_size, repeats=repeats)

    per_rank = train_batches_per_rank(num_files, batch_size, world_size) * batch_size
    shards = [indices(rank) for rank in range(world_size)]
    assert all(len(shard) == per_rank for shard in shards)  # the epoch keeps its length
    counts = np.bincount(np.concatenate(shards), minlength=num_files)
    # Copies come in whole groups except the one the cut goes through.
    assert set(counts.tolist()) <= {0, 1, 2, 3} and (counts == repeats).sum() >= (world_size * per_rank) // repeats
    assert ((counts > 0) & (counts < repeats)).sum() <= 1
    if world_size >= repeats:
        for index in np.flatnonzero(counts):
            assert sum(index in shard for shard in shards) == counts[index]  # every copy on its own rank
    permutation = np.random.default_rng([7, 0]).permutation(num_files)
    for rank, shard in enumerate(shards):
        expected = _deit_ra_indices(permutation, repeats=repeats, world_size=world_size, rank=rank,
                                    num_selected=per_rank)
        assert np.array_equal(shard, expected)
        assert np.array_equal(shard, indices(rank))  # deterministic
    assert not np.array_equal(indices(0, epoch=1), shards[0]) and not np.array_equal(indices(0, seed=8), shards[0])


def test_train_shard_passes_repeats_on():
    shard = TrainShard(203, batch_size=4, seed=7, rank=1, world_size=2, repeats=3)
    shard.set_epoch(5)
    np.testing.assert_array_equal(shard.epoch_indices(), train_epoch_indices(203, batch_size=4, seed=7, epoch=5,
                                                                             rank=1, world_size=2, repeats=3))
    assert shard.num_samples == len(shard.epoch_indices()) == 100
