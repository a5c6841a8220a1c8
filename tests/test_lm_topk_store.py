"""rankkd.lm.topk_store: a teacher's top-K dumped to memory-mapped shards and read back, against the top-K of the
teacher's full logits; resuming an interrupted dump; the refusals (another manifest, an unfinished dump, cut files)."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the LM task's models are Hugging Face models (pip install transformers)")
from rankkd.lm import models  # noqa: E402
from rankkd.lm.topk_store import TopKManifest, TopKStore, TopKWriter, dump_teacher_topk  # noqa: E402

VOCAB, SEQ_LEN, K = 263, 13, 7


def manifest(**changes):
    fields = dict(teacher="llama-tiny", teacher_digest="t" * 64, tokenizer_digest="tok", data_digest="data", k=K,
                  seq_len=SEQ_LEN, num_sequences=10, logits_dtype="float32", shard_size=3)
    return TopKManifest(**{**fields, **changes})


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return models.load_causal_lm("llama-tiny", vocab_size=VOCAB, context=SEQ_LEN).eval()


def data(num_sequences, seed=1):
    return torch.randint(VOCAB, (num_sequences, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def batches(input_ids, batch_size):
    """(indices, input_ids) batches in order, as a data loader hands them out."""
    for start in range(0, len(input_ids), batch_size):
        yield torch.arange(start, min(start + batch_size, len(input_ids))), input_ids[start:start + batch_size]


def dump(folder, teacher, input_ids, batch_size=2, **changes):
    m = manifest(num_sequences=len(input_ids), **changes)
    with TopKWriter(folder, m) as writer:
        dump_teacher_topk(teacher, batches(input_ids, batch_size), writer, chunk_size=10)
    return m


def random_topk(num_sequences, seed=2):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (num_sequences, SEQ_LEN, K), generator=generator)
    return ids, 4 * torch.randn(num_sequences, SEQ_LEN, K, generator=generator)


@pytest.mark.parametrize("logits_dtype", ["float32", "float16"])
def test_dump_reads_back_the_top_k_of_the_teachers_logits(teacher, tmp_path, logits_dtype):
    input_ids = data(7)  # shards of 3, 3 and 1 sequences, filled by batches of 2
    m = dump(tmp_path / "dump", teacher, input_ids, logits_dtype=logits_dtype)
    store = TopKStore(tmp_path / "dump", m)
    with torch.no_grad():
        full = teacher(input_ids=input_ids).logits.double()
    reference = torch.topk(full, K, dim=-1)
    assert len(store) == 7
    tolerance = dict(rtol=2**-11, atol=1e-7) if logits_dtype == "float16" else dict(rtol=1e-6, atol=1e-7)
    for i in range(7):
        ids, logits = store[i]
        assert ids.dtype == torch.int64 and logits.dtype == torch.float32 and ids.shape == logits.shape == (SEQ_LEN, K)
        assert torch.equal(ids.sort(-1).values, reference.indices[i].sort(-1).values)  # the same K tokens per position
        torch.testing.assert_close(logits.double(), full[i].gather(-1, ids), **tolerance)  # each token's own logit
        assert (logits[:, :-1] >= logits[:, 1:]).all()  # largest first
    order = [6, 0, 4, 4]
    ids, logits = store.batch(torch.tensor(order))
    assert torch.equal(ids, torch.stack([store[i][0] for i in order]))
    assert torch.equal(logits, torch.stack([store[i][1] for i in order]))


def crash_after(batch_iterator, count):
    yield from itertools.islice(batch_iterator, count)
    raise KeyboardInterrupt  # the process dies mid-dump


def test_an_interrupted_dump_resumes_to_the_uninterrupted_result(teacher, tmp_path):
    input_ids = data(10)
    m = dump(tmp_path / "whole", teacher, input_ids)
    folder = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt), TopKWriter(folder, m) as writer:  # 8 sequences in: shards 0 and 1 written
        dump_teacher_topk(teacher, crash_after(batches(input_ids, 2), 4), writer, chunk_size=10)
    # It died while writing shard 2: its ids in place, its logits half written under the temporary name.
    np.save(folder / "ids-00002.npy", np.zeros((3, SEQ_LEN, K), np.int32))
    (folder / ".logits-00002.npy.tmp").write_bytes(b"\x93NUMPY half a file")
    with TopKWriter(folder, m) as writer:
        assert writer.next_sequence == 6
        assert not (folder / ".logits-00002.npy.tmp").exists()
        with pytest.raises(ValueError, match="incomplete"):
            TopKStore(folder, m)
        dump_teacher_topk(teacher, batches(input_ids, 2), writer, chunk_size=10)
    files = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert sorted(path.name for path in folder.iterdir()) == files
    for name in files:  # the same teacher on the same batches: the same bytes
        assert (folder / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    TopKStore(folder, m)


def test_a_resumed_dump_runs_the_teacher_only_on_the_missing_sequences(teacher, tmp_path):
    input_ids = data(10)
    m = manifest()
    ids, logits = random_topk(10)
    with TopKWriter(tmp_path, m) as writer:
        writer.add(ids[:5], logits[:5])  # shard 0 on disk, sequences 3 and 4 lost with the process
    positions = []
    hook = teacher.model.register_forward_hook(lambda module, args, kwargs, output: positions.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        with TopKWriter(tmp_path, m) as writer:
            assert writer.next_sequence == 3
            dump_teacher_topk(teacher, batches(input_ids, 4), writer)  # batch 0..3 starts before 3: 3 runs alone
    finally:
        hook.remove()
    assert positions == [1, 4, 2]
    store = TopKStore(tmp_path, m)
    assert torch.equal(store.batch(range(3))[0], ids[:3]) and torch.equal(store.batch(range(3))[1], logits[:3])
    with torch.no_grad():
        full = teacher(input_ids=input_ids[3:]).logits
    reference = torch.topk(full, K, dim=-1)
    assert torch.equal(store.batch(range(3, 10))[0].sort(-1).values, reference.indices.sort(-1).values)


def test_another_manifest_is_refused_by_name(tmp_path):
    m = manifest()
    with TopKWriter(tmp_path, m) as writer:
        writer.add(*random_topk(10))
        writer.finish()
    with pytest.raises(ValueError, match=f"holds a top-K dump of another manifest: k is {K} there, {K + 1} here$"):
        TopKWriter(tmp_path, manifest(k=K + 1))
    with pytest.raises(ValueError, match=r"does not match this run: seq_len is 13 in the dump, 14 here$"):
        TopKStore(tmp_path, {"seq_len": 14, "k": K})
    with pytest.raises(ValueError, match="does not match this run: data_digest is 'data' in the dump, 'other' here$"):
        TopKStore(tmp_path, dataclasses.replace(m, data_digest="other"))
    with pytest.raises(ValueError, match="expected names no TopKManifest field 'topk'"):
        TopKStore(tmp_path, {"topk": K})
    assert len(TopKStore(tmp_path, {"teacher": "llama-tiny", "k": K})) == 10


def test_an_unfinished_dump_is_refused(tmp_path):
    m = manifest()
    ids, logits = random_topk(10)
    with TopKWriter(tmp_path, m) as writer:
        writer.add(ids[:8], logits[:8])
        with pytest.raises(ValueError, match="holds 8 of 10 sequences; add the rest before finish"):
            writer.finish()
    with pytest.raises(ValueError, match=r"top-K dump '.*' is incomplete \(no 'complete' mark\): rerun the dump"):
        TopKStore(tmp_path, m)
    with TopKWriter(tmp_path, m) as writer:
        assert writer.next_sequence == 6  # sequences 6 and 7 never reached a shard
        writer.add(ids[6:], logits[6:])
        writer.finish()
    store = TopKStore(tmp_path, m)
    assert torch.equal(store.batch(range(10))[0], ids) and torch.equal(store.batch(range(10))[1], logits)


def finished_dump(folder, **changes):
    m = manifest(**changes)
    with TopKWriter(folder, m) as writer:
        writer.add(*random_topk(m.num_sequences))
        writer.finish()
    return m


@pytest.mark.parametrize("keep_bytes", [-1, 100, 0])  # cut in the data, in the header, empty
def test_a_cut_shard_file_is_refused_by_name(tmp_path, keep_bytes):
    m = finished_dump(tmp_path)
    path = tmp_path / "logits-00001.npy"
    content = path.read_bytes()
    path.write_bytes(content[:keep_bytes])
    with pytest.raises(ValueError) as error:
        TopKStore(tmp_path, m)
    assert str(error.value).startswith(f"top-K shard '{path}' is unreadable (") and "\n" not in str(error.value)
    path.unlink()
    with pytest.raises(ValueError, match=f"top-K shard '{path}' is unreadable"):
        TopKStore(tmp_path, m)


def test_a_misshapen_shard_file_is_refused_by_name(tmp_path):
    m = finished_dump(tmp_path)
    path = tmp_path / "ids-00003.npy"
    np.save(path, np.zeros((1, SEQ_LEN, K), np.int64))
    with pytest.raises(ValueError, match=f"top-K shard '{path}' holds int64 \\(1, 13, 7\\), expected int32 "
                                         "\\(1, 13, 7\\)"):
        TopKStore(tmp_path, m)


def test_the_writer_refuses_bad_input(tmp_path):
    m = manifest(logits_dtype="float16")
    ids, logits = random_topk(10)
    with TopKWriter(tmp_path / "dump", m) as writer:
        with pytest.raises(ValueError, match="another writer holds top-K dump folder"):
            TopKWriter(tmp_path / "dump", m)
        with pytest.raises(ValueError, match=r"must both be \(n, seq_len, k\) = \(n, 13, 7\) with n >= 1, got "
                                             r"\(2, 13, 6\) and \(2, 13, 6\)"):
            writer.add(ids[:2, :, :6], logits[:2, :, :6])
        too_large = logits[:2].clone()
        too_large[1, 4, 0] = 7e4
        with pytest.raises(ValueError, match="logits of sequences 0..1 are not finite in float16"):
            writer.add(ids[:2], too_large)
        with pytest.raises(ValueError, match=r"ids of sequences 0..1 must lie in \[0, 2\^31\)"):
            writer.add(ids[:2] - VOCAB, logits[:2])
        with pytest.raises(TypeError, match="ids must be a tensor of integer token ids"):
            writer.add(logits[:2], logits[:2])
        writer.add(ids, logits)
        with pytest.raises(ValueError, match="sequences 10..10 are beyond the manifest's num_sequences = 10"):
            writer.add(ids[:1], logits[:1])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a dump")
    with pytest.raises(ValueError, match="is not empty and holds no top-K dump"):
        TopKWriter(tmp_path / "other", m)
    with pytest.raises(ValueError, match=r"logits_dtype must be one of .* \(numpy cannot memory-map bfloat16"):
        manifest(logits_dtype="bfloat16")
    with pytest.raises(ValueError, match="TopKManifest.shard_size must be an integer >= 1, got 0"):
        manifest(shard_size=0)


def test_float16_storage_keeps_a_bfloat16_teachers_logits_exactly(tmp_path):
    m = manifest(logits_dtype="float16")
    ids, logits = random_topk(10)
    logits = (logits * 100).to(torch.bfloat16)  # |logits| in the hundreds: bfloat16's 8 bits fit float16's 11
    with TopKWriter(tmp_path, m) as writer:
        writer.add(ids, logits)
        writer.finish()
    assert torch.equal(TopKStore(tmp_path, m).batch(range(10))[1], logits.float())


def test_a_writer_interrupted_before_its_manifest_was_in_place_starts_afresh(tmp_path):
    (tmp_path / ".manifest.json.tmp").write_bytes(b'{"teacher": ')
    m = finished_dump(tmp_path)
    assert not any(path.name.endswith(".tmp") for path in tmp_path.iterdir())
    assert len(TopKStore(tmp_path, m)) == m.num_sequences
