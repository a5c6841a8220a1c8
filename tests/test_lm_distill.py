"""The LM distillation forward (rankkd.lm.distill.LMDistiller) and the sequence loaders (rankkd.lm.loaders): online
and offline teachers give the same loss and gradients, the loss equals an unfused float64 computation, and the
loaders shard the sequences like every other dataset."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from rankkd.fused_linear import FusedLinearDistillLoss  # noqa: E402
from rankkd.lm.distill import LMDistiller  # noqa: E402
from rankkd.lm.loaders import SequenceTrainLoader, SequenceValLoader  # noqa: E402
from rankkd.lm.models import load_causal_lm, weights_digest  # noqa: E402
from rankkd.lm.topk_store import TopKManifest, TopKStore, TopKWriter, dump_teacher_topk  # noqa: E402
from rankkd.reference import row_losses  # noqa: E402

VOCAB, SEQ_LEN, TOP_K = 97, 11, 7
CPU = torch.device("cpu")


class Sequences(torch.utils.data.Dataset):
    """Random token sequences, with a document boundary (an ignored label) in some of them."""

    def __init__(self, count, seed):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (count, SEQ_LEN + 1), generator=generator)
        self.boundaries = torch.randint(0, SEQ_LEN, (count,), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        labels = self.tokens[index, 1:].clone()
        if index % 2:
            labels[self.boundaries[index]] = -100
        return {"input_ids": self.tokens[index, :-1], "labels": labels}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = load_causal_lm("llama-tiny", vocab_size=VOCAB, context=32).eval()
    student = load_causal_lm("gpt-demo-student", vocab_size=VOCAB, context=32)
    return student, teacher


def _dump(tmp_path, teacher, sequences):
    manifest = TopKManifest(teacher="llama-tiny", teacher_digest=weights_digest(teacher), tokenizer_digest="t",
                            data_digest="d", k=TOP_K, seq_len=SEQ_LEN, num_sequences=len(sequences),
                            logits_dtype="float32", shard_size=3)
    batches = ((torch.arange(i, min(i + 2, len(sequences))),
                torch.stack([sequences[j]["input_ids"] for j in range(i, min(i + 2, len(sequences)))]))
               for i in range(0, len(sequences), 2))
    with TopKWriter(tmp_path / "dump", manifest) as writer:
        dump_teacher_topk(teacher, batches, writer)
    return TopKStore(tmp_path / "dump", manifest)


def _reference_loss(student, teacher, input_ids, labels, weights, temperature, k):
    """CE over the vocabulary + T^2 KL over the teacher's top-K + the ranking loss over it, in float64 from the full
    logits of both models, averaged over the counted positions."""
    logits = student.double()(input_ids).logits.reshape(-1, VOCAB)
    teacher_logits = teacher.double()(input_ids).logits.reshape(-1, VOCAB)
    student.float(), teacher.float()
    counted = labels.reshape(-1) != -100
    logits, teacher_logits, target = logits[counted], teacher_logits[counted], labels.reshape(-1)[counted]
    top_logits, top_ids = teacher_logits.topk(TOP_K, dim=-1)
    ce = torch.nn.functional.cross_entropy(logits, target)
    log_q = torch.log_softmax(logits / temperature, -1).gather(1, top_ids)
    p = torch.softmax(top_logits / temperature, -1)
    kd = temperature**2 * (p * (p.log() - log_q)).sum(-1).mean()
    rank = row_losses(logits.gather(1, top_ids), top_logits, k, "tanh").mean()
    return weights[0] * ce + weights[1] * kd + weights[2] * rank


def test_online_and_offline_teachers_give_the_reference_loss_and_one_gradient(pair, tmp_path):
    student, teacher = pair
    sequences = Sequences(5, seed=1)
    store = _dump(tmp_path, teacher, sequences)
    loss = FusedLinearDistillLoss(ce_weight=1.0, kd_weight=0.5, rank_weight=2.0, temperature=2.0, k=3.0)
    online = LMDistiller(student, teacher, loss, top_k=TOP_K, chunk_size=8)
    offline = LMDistiller(student, None, loss, top_k=TOP_K, chunk_size=8)
    (inputs, labels), = list(SequenceValLoader(sequences, batch_size=5, rank=0, world_size=1, device=CPU))
    (offline_inputs, _), = list(SequenceValLoader(sequences, batch_size=5, rank=0, world_size=1, device=CPU,
                                                  topk=store))
    assert (labels == -100).any()
    grads = []
    for distiller, batch in ((online, inputs), (offline, offline_inputs)):
        student.zero_grad()
        _, terms = distiller(batch, labels)
        terms["total"].backward()
        grads.append([p.grad.clone() for p in student.parameters()])
        expected = _reference_loss(student, teacher, inputs["input_ids"], labels, (1.0, 0.5, 2.0), 2.0, 3.0)
        assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    assert all(p.grad is None for p in teacher.parameters())
    assert not loss.validate  # checked on the first batch only


def test_method_ce_is_the_cross_entropy_alone(pair):
    student, _ = pair
    sequences = Sequences(4, seed=2)
    (inputs, labels), = list(SequenceValLoader(sequences, batch_size=4, rank=0, world_size=1, device=CPU))
    distiller = LMDistiller(student, None, FusedLinearDistillLoss(ce_weight=1.0, kd_weight=0.0, rank_weight=0.0),
                            top_k=TOP_K)
    _, terms = distiller(inputs, labels)
    logits = student.double()(inputs["input_ids"]).logits
    student.float()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("count, batch_size, world_size", [(13, 2, 2), (7, 3, 1), (10, 1, 3)])
def test_loaders_shard_every_sequence_as_the_other_datasets(tmp_path, count, batch_size, world_size):
    sequences = Sequences(count, seed=count)
    seen_val = []
    for rank in range(world_size):
        train = SequenceTrainLoader(sequences, batch_size=batch_size, seed=5, rank=rank, world_size=world_size,
                                    device=CPU)
        train.set_epoch(1)
        batches = list(train)
        assert len(batches) == len(train) and all(len(labels) == batch_size for _, labels in batches)
        taken = np.concatenate([[int(np.flatnonzero((sequences.tokens[:, :-1] == row).all(1))[0])
                                 for row in inputs["input_ids"]] for inputs, _ in batches])
        np.testing.assert_array_equal(taken, train.epoch_indices())
        for inputs, labels in SequenceValLoader(sequences, batch_size=batch_size, rank=rank, world_size=world_size,
                                                device=CPU):
            seen_val += [bytes(row.numpy()) for row in inputs["input_ids"]]
    assert sorted(seen_val) == sorted(bytes(row.numpy()) for row in sequences.tokens[:, :-1])


def test_a_dump_of_another_length_is_refused(pair, tmp_path):
    _, teacher = pair
    store = _dump(tmp_path, teacher, Sequences(4, seed=3))
    with pytest.raises(ValueError, match="top-K dump of the train split holds 4 sequences, the data 5"):
        SequenceTrainLoader(Sequences(5, seed=3), batch_size=2, seed=0, rank=0, world_size=1, device=CPU, topk=store)
