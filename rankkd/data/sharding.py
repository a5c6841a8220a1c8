"""Which files each rank reads, and the seeds of its augmentation: pure functions of (seed, epoch, rank).

Training: one permutation of the whole train listing per epoch (the same on every rank, from (seed, epoch) only),
cut into world_size equal contiguous slices of full batches; the remainder (fewer than world_size * batch_size
files) is dropped, a different remainder every epoch. Every rank therefore runs the same number of steps, and an
epoch's batches do not depend on anything that happened in earlier epochs, which is what makes resuming exact.

Repeated augmentation (repeats > 1, DeiT's RASampler): each index of the permutation is written `repeats` times in
a row and the result is dealt round-robin to the ranks, so the copies of an image go to different ranks (when
world_size >= repeats) and are augmented differently there. The epoch keeps the length it has without repeats, so
an epoch reads about num_files / repeats distinct images, each `repeats` times.

Validation: the val listing in its sorted order, cut into world_size contiguous blocks whose sizes differ by at
most one. Every file is read by exactly one rank, with no padding and nothing dropped.
"""
from __future__ import annotations

import numpy as np


def train_batches_per_rank(num_files: int, batch_size: int, world_size: int) -> int:
    return num_files // (world_size * batch_size)


def train_epoch_indices(num_files: int, *, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                        repeats: int = 1) -> np.ndarray:
    """Indices into the train listing for this rank's epoch, in reading order (a multiple of batch_size long)."""
    per_rank = train_batches_per_rank(num_files, batch_size, world_size) * batch_size
    permutation = np.random.default_rng([seed, epoch]).permutation(num_files)
    if repeats == 1:
        return permutation[rank * per_rank:(rank + 1) * per_rank]
    # All ranks together read the first world_size * per_rank entries of the repeated permutation; DeiT's sampler
    # pads the repeated list to a multiple of world_size first, padding that this cut never reaches.
    total = world_size * per_rank
    repeated = np.repeat(permutation[:-(-total // repeats)], repeats)
    return repeated[rank:total:world_size]


def val_shard_indices(num_files: int, *, rank: int, world_size: int) -> np.ndarray:
    """Indices into the val listing read by this rank; the ranks' blocks partition range(num_files)."""
    return np.arange(rank * num_files // world_size, (rank + 1) * num_files // world_size)


def augmentation_seed(seed: int, epoch: int, rank: int) -> int:
    """A 31-bit seed for one rank's augmentation in one epoch (DALI pipeline seeds must fit in an int32)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0] & 0x7FFFFFFF)


class TrainShard:
    """What every train loader shares: this rank's slice of each epoch's permutation, and the epoch counter."""

    def __init__(self, num_files: int, *, batch_size: int, seed: int, rank: int, world_size: int, repeats: int = 1):
        self._num_files = num_files
        self._repeats = repeats
        self._batch_size = batch_size
        self._seed = seed
        self._rank = rank
        self._world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return train_batches_per_rank(self._num_files, self._batch_size, self._world_size)

    @property
    def num_samples(self) -> int:
        """Images this rank reads per epoch."""
        return len(self) * self._batch_size

    def epoch_indices(self) -> np.ndarray:
        return train_epoch_indices(self._num_files, batch_size=self._batch_size, seed=self._seed, epoch=self.epoch,
                                   rank=self._rank, world_size=self._world_size, repeats=self._repeats)

    def epoch_augmentation_seed(self) -> int:
        return augmentation_seed(self._seed, self.epoch, self._rank)


class ValShard:
    """What every val loader shares: this rank's block of the validation set (val_shard_indices), the same every
    epoch, served in batches of batch_size of which the last may be partial."""

    def __init__(self, num_files: int, *, batch_size: int, rank: int, world_size: int):
        self.indices = val_shard_indices(num_files, rank=rank, world_size=world_size)
        self._batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        """Validation is the same every epoch; accepted so that train and val loaders share one protocol."""

    def __len__(self) -> int:
        return -(-len(self.indices) // self._batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.indices)
