"""Loaders of packed token sequences (rankkd.lm.text.PackedSequences) for the run skeleton's loader protocol
(set_epoch, len = batches this rank yields per pass, num_samples, backend), sharded across ranks as every other
dataset is (rankkd.data.sharding: the order is a function of (seed, epoch, rank) alone).

A batch is (inputs, labels) on the rank's device: inputs {"input_ids": (batch, seq_len) int64} and, when a dump of
the teacher's top-K is given (rankkd.lm.topk_store.TopKStore, indexed by sequence like the dataset), its
"teacher_ids" (batch, seq_len, K) int64 and "teacher_logits" float32; labels (batch, seq_len) int64, the next
token or IGNORE_INDEX."""
import numpy as np
import torch

from rankkd.data.sharding import TrainShard, ValShard


def _batch(sequences, topk, indices, device):
    items = [sequences[int(i)] for i in indices]
    inputs = {"input_ids": torch.stack([item["input_ids"] for item in items])}
    if topk is not None:
        inputs["teacher_ids"], inputs["teacher_logits"] = topk.batch(torch.as_tensor(np.asarray(indices)))
    labels = torch.stack([item["labels"] for item in items])
    return {name: value.to(device, non_blocking=True) for name, value in inputs.items()}, labels.to(device)


def _check_store(sequences, topk, split):
    if topk is not None and len(topk) != len(sequences):
        raise ValueError(f"the teacher's top-K dump of the {split} split holds {len(topk)} sequences, the data "
                         f"{len(sequences)}")


class SequenceTrainLoader(TrainShard):
    """This rank's full batches of training sequences in the epoch's shuffled order."""
    backend = "tokens"

    def __init__(self, sequences, *, batch_size, seed, rank, world_size, device, topk=None):
        _check_store(sequences, topk, "train")
        super().__init__(len(sequences), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self.sequences, self.topk, self.device, self.batch_size = sequences, topk, device, batch_size

    def __iter__(self):
        indices = self.epoch_indices()
        for start in range(0, len(indices), self.batch_size):
            yield _batch(self.sequences, self.topk, indices[start:start + self.batch_size], self.device)


class SequenceValLoader(ValShard):
    """This rank's block of the validation sequences, in order; the last batch may be partial."""
    backend = "tokens"

    def __init__(self, sequences, *, batch_size, rank, world_size, device, topk=None):
        _check_store(sequences, topk, "validation")
        super().__init__(len(sequences), batch_size=batch_size, rank=rank, world_size=world_size)
        self.sequences, self.topk, self.device, self.batch_size = sequences, topk, device, batch_size

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield _batch(self.sequences, self.topk, self.indices[start:start + self.batch_size], self.device)
