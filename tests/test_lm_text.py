"""rankkd.lm.text: reading and refusing text files, the demo corpus and tokenizer, the tokenization cache (hits,
invalidation, atomicity), the split by document, and packing checked against a plain-Python construction."""
import copy
import json
import os

import numpy as np
import pytest
from tokenizers import processors

from rankkd.lm import text
from rankkd.lm.text import (END_OF_TEXT, IGNORE_INDEX, CorpusSplit, Document, PackedSequences, TokenizedCorpus,
                            demo_documents, load_tokenizer, read_documents, split_documents, tokenize_documents,
                            train_demo_tokenizer)

DEMO_BYTES = 300_000
DEMO_VOCAB = 512


@pytest.fixture(scope="module")
def small_demo():
    return demo_documents(max_bytes=DEMO_BYTES)


@pytest.fixture(scope="module")
def demo_tokenizer(small_demo, tmp_path_factory):
    return train_demo_tokenizer(small_demo, tmp_path_factory.mktemp("tokenizer") / "bpe", vocab_size=DEMO_VOCAB)


class CountingTokenizer:
    """The tokenizer, with its batch calls counted; fail_on_call: the call (1-based) that raises instead."""

    def __init__(self, tokenizer, fail_on_call=None):
        self.tokenizer, self.fail_on_call, self.calls = tokenizer, fail_on_call, 0

    def __call__(self, texts, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("tokenizer failed mid-corpus")
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def _refusal(paths):
    with pytest.raises(ValueError) as caught:
        read_documents(paths)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def test_reads_folders_and_files_in_order(tmp_path):
    (tmp_path / "corpus" / "b").mkdir(parents=True)
    (tmp_path / "corpus" / ".hidden").mkdir()
    (tmp_path / "corpus" / "b" / "z.txt").write_text("zed\n")
    (tmp_path / "corpus" / "a.txt").write_text("first file ü\n")
    (tmp_path / "corpus" / "notes.md").write_text("not data")
    (tmp_path / "corpus" / ".hidden" / "x.txt").write_text("hidden")
    records = [{"text": "one"}, {"text": "two\u2028still two", "id": 7}]
    lines = [json.dumps(records[0]), "", json.dumps(records[1], ensure_ascii=False) + "\r"]
    (tmp_path / "lines.jsonl").write_text("\n".join(lines) + "\n")
    folder, jsonl = tmp_path / "corpus", tmp_path / "lines.jsonl"

    documents = read_documents([jsonl, folder, folder / "a.txt"])

    assert documents == [Document(f"{jsonl}:1", "one"), Document(f"{jsonl}:3", "two\u2028still two"),
                         Document(str(folder / "a.txt"), "first file ü\n"),
                         Document(str(folder / "b" / "z.txt"), "zed\n")]


@pytest.mark.parametrize("name, content, expected", [
    ("empty.txt", b"", " is empty"),
    ("blank.jsonl", b"\n  \n", " is empty"),
    ("latin1.txt", "line one\ncaf\u00e9\n".encode("latin-1"), ":2 is not UTF-8 text (byte 0xe9"),
    ("latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', ":2 is not UTF-8 text"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"\n', ":2 is not JSON"),
    ("no_text.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', ":3: expected an object with a string 'text' field"),
    ("number.jsonl", b'{"text": 3}\n', ":1: expected an object with a string 'text' field"),
    ("array.jsonl", b'["text"]\n', ":1: expected an object with a string 'text' field"),
    ("empty_text.jsonl", b'{"text": "a"}\n{"text": " "}\n', ":2: 'text' is empty"),
    ("surrogate.jsonl", b'{"text": "a\\ud800b"}\n', ":1: 'text' holds an unpaired surrogate"),
])
def test_refuses_bad_files_naming_file_and_line(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    message = _refusal([path])
    assert f"{str(path)!r}{expected}" in message, message


def test_refuses_missing_paths_and_unsupported_suffixes(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("fine")
    assert repr(str(tmp_path / "missing")) in _refusal([good, tmp_path / "missing"])
    csv = tmp_path / "table.csv"
    csv.write_text("a,b")
    message = _refusal([csv])
    assert repr(str(csv)) in message and "unsupported suffix '.csv'" in message
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "table.csv").write_text("a,b")
    message = _refusal([tmp_path / "other"])
    assert repr(str(tmp_path / "other")) in message and "holds no .txt or .jsonl file" in message
    assert "no data paths" in _refusal([])


# ---------------------------------------------------------------------------------------------------------------------
# Demo corpus and tokenizer


def test_demo_corpus_is_deterministic_capped_library_source(small_demo):
    assert demo_documents(max_bytes=DEMO_BYTES) == small_demo
    sizes = [len(document.text.encode()) for document in small_demo]
    # Files are taken until the cap is reached: the total is past it, but not before the last file taken.
    assert sum(sizes) >= DEMO_BYTES > sum(sizes) - max(sizes)
    sources = [document.source for document in small_demo]
    assert sources == sorted(sources) and len(set(sources)) == len(sources)
    for source in sources:
        folders = set(source.split("/")[1:-1])
        assert source.endswith(".py") and not folders & {"test", "tests", "idle_test", "site-packages"}, source
    assert all(document.text.strip() for document in small_demo)


def test_demo_tokenizer_round_trips_and_ends_with_eos(small_demo, demo_tokenizer):
    assert demo_tokenizer.eos_token == demo_tokenizer.pad_token == END_OF_TEXT
    assert len(demo_tokenizer) <= DEMO_VOCAB
    samples = [small_demo[0].text, small_demo[-1].text, "naïve café → 日本語 \t\r\n  spaces"]
    for sample in samples:
        ids = demo_tokenizer(sample, add_special_tokens=True)["input_ids"]
        assert demo_tokenizer.eos_token_id not in ids
        assert demo_tokenizer.decode(ids) == sample
    # Training compressed the library's source: fewer tokens than bytes.
    assert len(demo_tokenizer(small_demo[0].text)["input_ids"]) < 0.6 * len(small_demo[0].text.encode())


def test_demo_tokenizer_folder_reused_replaced_or_refused(small_demo, tmp_path, monkeypatch):
    folder = tmp_path / "bpe"
    documents = small_demo[:4]
    trainings = []
    train = text._train_tokenizer
    monkeypatch.setattr(text, "_train_tokenizer", lambda *args: trainings.append(args[1]) or train(*args))

    first = train_demo_tokenizer(documents, folder, vocab_size=300)
    again = train_demo_tokenizer(documents, folder, vocab_size=300)
    assert trainings == [documents] and again.get_vocab() == first.get_vocab()

    replaced = train_demo_tokenizer(documents[:1], folder, vocab_size=300)
    assert trainings == [documents, documents[:1]] and replaced.get_vocab() != first.get_vocab()
    assert replaced.get_vocab() == train_demo_tokenizer(documents[:1], tmp_path / "fresh", vocab_size=300).get_vocab()
    assert sorted(os.listdir(tmp_path)) == ["bpe", "fresh"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "weights.bin").write_bytes(b"keep me")
    with pytest.raises(ValueError, match="holds no tokenizer train_demo_tokenizer trained"):
        train_demo_tokenizer(documents, foreign, vocab_size=300)
    assert os.listdir(foreign) == ["weights.bin"]


def test_load_tokenizer_refuses_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="cannot load it") as caught:
        load_tokenizer(tmp_path / "absent")
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization cache


def _expected_tokens(tokenizer, documents):
    """Each document encoded on its own, EOS-ended once."""
    eos = tokenizer.eos_token_id
    expected = []
    for document in documents:
        ids = tokenizer(document.text, add_special_tokens=True)["input_ids"]
        expected.append(ids if ids[-1] == eos else ids + [eos])
    return expected


def _write_corpus(folder, rng):
    folder.mkdir()
    for index in range(5):
        words = rng.choice(["def", "return", "self", "x", "+", "(", ")", ":", "\n", "    ", "é"], rng.integers(1, 60))
        (folder / f"{index}.txt").write_text("".join(words) + "end")
    (folder / "more.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} " * i}) for i in range(1, 8)))


def test_tokenize_matches_per_document_encoding_and_caches(demo_tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    _write_corpus(tmp_path / "data", rng)
    documents = read_documents([tmp_path / "data"])
    counting = CountingTokenizer(demo_tokenizer)

    corpus = tokenize_documents(documents, counting, tmp_path / "cache", batch_documents=3)

    assert counting.calls == 4  # 12 documents, 3 at a time
    assert corpus.tokens.dtype == np.int32 and corpus.sources == tuple(d.source for d in documents)
    pieces = [corpus.tokens[corpus.starts[i]:corpus.starts[i + 1]].tolist() for i in range(len(corpus))]
    assert pieces == _expected_tokens(demo_tokenizer, documents)
    assert corpus.starts[0] == 0 and corpus.starts[-1] == len(corpus.tokens)

    cached = CountingTokenizer(demo_tokenizer)
    again = tokenize_documents(read_documents([tmp_path / "data"]), cached, tmp_path / "cache")
    assert cached.calls == 0
    assert isinstance(again.tokens, np.memmap) and again.key == corpus.key
    assert np.array_equal(again.tokens, corpus.tokens) and np.array_equal(again.starts, corpus.starts)

    (tmp_path / "data" / "3.txt").write_text("changed text")
    changed = read_documents([tmp_path / "data"])
    counting = CountingTokenizer(demo_tokenizer)
    after_edit = tokenize_documents(changed, counting, tmp_path / "cache")
    assert counting.calls == 1 and after_edit.key != corpus.key
    assert np.diff(after_edit.starts)[3] == len(_expected_tokens(demo_tokenizer, [changed[3]])[0])

    # Another post-processor (BOS and EOS around each text) is another tokenizer: re-tokenized, EOS not repeated.
    framed = copy.deepcopy(demo_tokenizer)
    eos = framed.eos_token_id
    framed.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{END_OF_TEXT} $A {END_OF_TEXT}", special_tokens=[(END_OF_TEXT, eos)])
    counting = CountingTokenizer(framed)
    reframed = tokenize_documents(changed, counting, tmp_path / "cache")
    assert counting.calls == 1 and reframed.key != after_edit.key
    assert np.array_equal(np.diff(reframed.starts), np.diff(after_edit.starts) + 1)
    assert reframed.tokens[0] == eos and reframed.tokens[reframed.starts[1] - 2] != eos


def test_tokenize_failure_leaves_no_cache_folder(demo_tokenizer, small_demo, tmp_path):
    failing = CountingTokenizer(demo_tokenizer, fail_on_call=2)
    with pytest.raises(RuntimeError, match="mid-corpus"):
        tokenize_documents(small_demo[:6], failing, tmp_path / "cache", batch_documents=2)
    assert os.listdir(tmp_path / "cache") == []
    counting = CountingTokenizer(demo_tokenizer)
    tokenize_documents(small_demo[:6], counting, tmp_path / "cache", batch_documents=2)
    assert counting.calls == 3 and len(os.listdir(tmp_path / "cache")) == 1


# ---------------------------------------------------------------------------------------------------------------------
# Split and packing


def _random_corpus(rng, lengths):
    tokens = rng.integers(0, 50_000, int(sum(lengths))).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenizedCorpus(tokens, starts, tuple(f"doc{i}.txt" for i in range(len(lengths))), "test")


def _reference_items(split, seq_len):
    """Plain Python: the split's documents one after the other, each token tagged with its document; windows of
    seq_len + 1 every seq_len tokens; a label kept only when it and its input token share a document."""
    stream, owner = [], []
    for document in split.documents:
        begin, end = split.corpus.starts[document], split.corpus.starts[document + 1]
        stream += split.corpus.tokens[begin:end].tolist()
        owner += [int(document)] * int(end - begin)
    items = []
    start = 0
    while start + seq_len + 1 <= len(stream):
        inputs = stream[start:start + seq_len]
        labels = [stream[start + j + 1] if owner[start + j + 1] == owner[start + j] else IGNORE_INDEX
                  for j in range(seq_len)]
        items.append((inputs, labels))
        start += seq_len
    return items


@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_packing_matches_plain_python(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = np.concatenate([[1, 2, 1, 1, 97, 2, 1, 40], rng.integers(1, 30, 15), [1, 3, 61]])
    corpus = _random_corpus(rng, lengths)
    every_other = CorpusSplit("train", corpus, np.flatnonzero(rng.random(len(lengths)) < 0.6))
    for split in (CorpusSplit("train", corpus, np.arange(len(lengths))), every_other):
        packed = PackedSequences(split, seq_len)
        expected = _reference_items(split, seq_len)
        assert len(packed) == len(expected) > 0
        for index, (inputs, labels) in enumerate(expected):
            item = packed[index]
            assert item["input_ids"].tolist() == inputs and item["labels"].tolist() == labels
        assert packed.trained_tokens == sum(label != IGNORE_INDEX for _, labels in expected for label in labels)
        with pytest.raises(IndexError):
            packed[len(packed)]


def test_packing_refusals():
    rng = np.random.default_rng(1)
    corpus = _random_corpus(rng, [5, 4, 3])
    split = CorpusSplit("validation", corpus, np.arange(3))
    with pytest.raises(ValueError, match="--seq-len must be >= 1, got 0"):
        PackedSequences(split, 0)
    with pytest.raises(ValueError, match=r"validation split \(3 documents, 12 tokens\) yields no sequence of "
                                         r"--seq-len 12"):
        PackedSequences(split, 12)
    assert len(PackedSequences(split, 11)) == 1
    singles = CorpusSplit("train", _random_corpus(rng, [1] * 9), np.arange(9))
    with pytest.raises(ValueError, match="every document is shorter than 2 tokens"):
        PackedSequences(singles, 2)


def test_split_is_deterministic_disjoint_and_stable():
    rng = np.random.default_rng(2)
    corpus = _random_corpus(rng, rng.integers(1, 9, 400))
    train, val = split_documents(corpus, 0.2, seed=5)
    again_train, again_val = split_documents(corpus, 0.2, seed=5)
    assert np.array_equal(train.documents, again_train.documents) and np.array_equal(val.documents, again_val.documents)
    assert (train.name, val.name) == ("train", "validation")
    assert np.array_equal(np.sort(np.concatenate([train.documents, val.documents])), np.arange(400))
    assert 40 < len(val.documents) < 120
    other_train, _ = split_documents(corpus, 0.2, seed=6)
    assert not np.array_equal(other_train.documents, train.documents)

    # More documents: the first 400 keep their split.
    bigger = _random_corpus(rng, rng.integers(1, 9, 500))
    bigger_train, _ = split_documents(bigger, 0.2, seed=5)
    assert np.array_equal(bigger_train.documents[bigger_train.documents < 400], train.documents)


def test_split_always_fills_both_sides_or_refuses():
    rng = np.random.default_rng(3)
    pair = _random_corpus(rng, [4, 6])
    for fraction in (1e-9, 1 - 1e-9):
        train, val = split_documents(pair, fraction)
        assert len(train.documents) == len(val.documents) == 1
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_documents(pair, 0.0)
    with pytest.raises(ValueError, match="needs at least 2"):
        split_documents(_random_corpus(rng, [4]), 0.5)
