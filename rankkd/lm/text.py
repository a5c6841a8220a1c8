"""Text data for causal-LM distillation: documents read and checked, a demo corpus and tokenizer, tokenization cached
on disk, a train/validation split by document, and documents packed into fixed-length sequences.

- read_documents(paths): `.txt` files (one document each) and `.jsonl` files (one document per line, its "text"
  field), named directly or found in folders. Everything that would otherwise fail later (no files, an unsupported
  suffix, an empty or undecodable file, a line that is not an object with a non-empty string "text") is refused
  here with a one-line ValueError naming the file and line.
- demo_documents() / train_demo_tokenizer(): Python's own standard library source, one document per module, and a
  byte-level BPE tokenizer trained on it; present wherever Python is, no download.
- tokenize_documents(): each document encoded with the tokenizer's own special tokens (e.g. Llama's BOS) and ended
  with its EOS, all documents in one flat int32 array memory-mapped from a cache folder keyed by the tokenizer's
  full serialization and the documents' sources and contents.
- split_documents() / PackedSequences: each document wholly in one split, chosen by a hash of its source; a split's
  documents concatenated and cut into sequences whose labels never cross a document boundary.

Every cache folder is built in a hidden temporary folder beside its final place and renamed into place when
complete: an interruption leaves no partial cache, and concurrent builders (several ranks) settle on one.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rankkd.data.staging import build_folder

SUFFIXES = (".txt", ".jsonl")
END_OF_TEXT = "<|endoftext|>"
DEMO_VOCAB_SIZE = 8192
# About 1M tokens of the demo tokenizer: more than the demo trains on, and read, trained on and tokenized in seconds.
DEMO_CORPUS_BYTES = 4_000_000
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
_DEMO_EXCLUDED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
_TOKENIZER_KEY_FILE = "rankkd_tokenizer.json"
_CACHE_FORMAT = 1  # bump when the layout or the encoding rule of a cache folder changes


@dataclass(frozen=True)
class Document:
    source: str  # where the text came from: a file's path, or "path:line" for a JSON Lines record
    text: str


def _refuse(problem: str) -> NoReturn:
    raise ValueError(problem)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_documents(paths: Iterable[str | os.PathLike]) -> list[Document]:
    """The documents of the named files and folders, in order: each path's files (a folder's, walked in sorted
    order, hidden entries and files of other suffixes ignored), each file's documents in file order. A file named
    twice is read once."""
    files = list(dict.fromkeys(itertools.chain.from_iterable(_data_files(Path(path)) for path in paths)))
    if not files:
        _refuse("no data paths given; name .txt or .jsonl files or folders holding them")
    return [document for file in files for document in _file_documents(file)]


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = [file for file in _walk_sorted(path) if file.suffix in SUFFIXES]
        if not files:
            _refuse(f"data folder {str(path)!r} holds no {' or '.join(SUFFIXES)} file")
        return files
    if not path.is_file():
        _refuse(f"data path {str(path)!r}: no such file or folder")
    if path.suffix not in SUFFIXES:
        _refuse(f"data file {str(path)!r}: unsupported suffix {path.suffix!r}; expected {' or '.join(SUFFIXES)}")
    return [path]


def _walk_sorted(folder: Path, excluded: frozenset[str] = frozenset()) -> list[Path]:
    """Every file under `folder`, hidden entries and folders named in `excluded` left out, sorted by path."""
    files = []
    for parent, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".") and name not in excluded]
        files.extend(Path(parent, name) for name in names if not name.startswith("."))
    return sorted(files)


def _file_text(path: Path) -> str:
    try:
        content = path.read_bytes()
    except OSError as error:
        _refuse(f"data file {str(path)!r}: cannot read it ({error.strerror or error})")
    if not content.strip():
        _refuse(f"data file {str(path)!r} is empty (nothing but whitespace)")
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as error:
        line = content.count(b"\n", 0, error.start) + 1
        _refuse(f"data file {str(path)!r}:{line} is not UTF-8 text (byte {content[error.start]:#04x} at offset "
                f"{error.start})")


def _file_documents(path: Path) -> list[Document]:
    text = _file_text(path)
    if path.suffix == ".txt":
        return [Document(str(path), text)]
    return [Document(f"{path}:{number}", _record_text(path, number, line))
            for number, line in enumerate(text.split("\n"), start=1) if line.strip()]


def _record_text(path: Path, number: int, line: str) -> str:
    where = f"data file {str(path)!r}:{number}"
    try:
        record = json.loads(line)
    except ValueError as error:
        _refuse(f"{where} is not JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        _refuse(f"{where}: expected an object with a string 'text' field, got {line[:60]!r}")
    text = record["text"]
    if not text.strip():
        _refuse(f"{where}: 'text' is empty (nothing but whitespace)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        _refuse(f"{where}: 'text' holds an unpaired surrogate escape (\\ud800-\\udfff), which is no Unicode text")
    return text


# ---------------------------------------------------------------------------------------------------------------------
# The demo corpus and tokenizer


def demo_documents(max_bytes: int = DEMO_CORPUS_BYTES) -> list[Document]:
    """Python's standard library source files (tests and site-packages left out), one document per module, sorted by
    source "python3.X/<module path>". Files are taken in the order of a hash of their path until max_bytes of source
    are reached, which spreads the corpus over the whole library rather than its alphabetically first packages;
    empty and non-UTF-8 files are skipped."""
    if max_bytes < 1:
        _refuse(f"demo_documents: max_bytes must be >= 1, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [file for file in _walk_sorted(root, _DEMO_EXCLUDED_FOLDERS) if file.suffix == ".py"]
    files.sort(key=lambda file: _digest(str(file.relative_to(root)).encode()))
    documents, total = [], 0
    for file in files:
        if total >= max_bytes:
            break
        content = file.read_bytes()
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            documents.append(Document(f"{root.name}/{file.relative_to(root)}", text))
            total += len(content)
    if not documents:
        _refuse(f"demo corpus: no Python source file under {str(root)!r}, the standard library's folder")
    return sorted(documents, key=lambda document: document.source)


def train_demo_tokenizer(documents: Sequence[Document], folder: str | os.PathLike,
                         vocab_size: int = DEMO_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme) of at most vocab_size tokens trained on `documents`, with
    END_OF_TEXT as its EOS and padding token, saved in `folder` as transformers saves a tokenizer and loaded from
    there. A folder already holding the tokenizer of the same documents and vocab_size is reused; one holding
    another tokenizer this function trained is replaced; any other existing folder is refused."""
    if vocab_size < 257:
        _refuse(f"train_demo_tokenizer: vocab_size must be >= 257 (256 bytes and {END_OF_TEXT}), got {vocab_size}")
    if not documents:
        _refuse("train_demo_tokenizer: no documents to train on")
    folder = Path(folder)
    key = _digest(f"bpe-{_CACHE_FORMAT}-{vocab_size}-{document_digest(documents)}".encode())
    stored = _trained_tokenizer_key(folder)
    if stored != key:
        if stored is None and folder.exists():
            _refuse(f"tokenizer folder {str(folder)!r} exists and holds no tokenizer train_demo_tokenizer trained; "
                    "name a new folder")
        build_folder(folder, lambda staging: _train_tokenizer(staging, documents, vocab_size, key),
                     replace=lambda: _trained_tokenizer_key(folder) != key)
    return load_tokenizer(folder)


def _trained_tokenizer_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / _TOKENIZER_KEY_FILE).read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _train_tokenizer(folder: Path, documents: Sequence[Document], vocab_size: int, key: str) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # min_frequency 2: a merge seen once describes one spot of the corpus, not its language.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((document.text for document in documents), trainer, length=len(documents))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT,
                            pad_token=END_OF_TEXT).save_pretrained(folder)
    record = {"key": key, "vocab_size": vocab_size, "documents": len(documents)}
    (folder / _TOKENIZER_KEY_FILE).write_text(json.dumps(record) + "\n")


def load_tokenizer(name_or_folder: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast (Rust) tokenizer with an EOS token, from a local folder or, where the hub is reachable, a Hugging Face
    hub name."""
    name = str(name_or_folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _refuse(f"tokenizer {name!r}: cannot load it ({reason}); name a local folder holding a saved tokenizer, or "
                "a Hugging Face hub name where the hub is reachable")
    if not tokenizer.is_fast:
        _refuse(f"tokenizer {name!r} has no fast (tokenizers) implementation; save one with tokenizer.json")
    if tokenizer.eos_token_id is None:
        _refuse(f"tokenizer {name!r} has no EOS token to end documents with; set eos_token in its "
                "tokenizer_config.json")
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


@dataclass(frozen=True)
class TokenizedCorpus:
    """Every document's tokens, EOS-ended, one after the other: document i is tokens[starts[i]:starts[i + 1]]."""
    tokens: np.ndarray  # (num_tokens,) int32, memory-mapped when read from the cache
    starts: np.ndarray  # (num_documents + 1,) int64, starts[0] == 0, starts[-1] == num_tokens
    sources: tuple[str, ...]
    key: str  # names the tokenizer and the documents: equal keys, equal tokens

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)


def document_digest(documents: Sequence[Document]) -> str:
    """A digest of the documents' sources and texts, in order."""
    hasher = hashlib.blake2b(digest_size=16)
    for document in documents:
        source, text = document.source.encode(), document.text.encode()
        hasher.update(f"{len(source)}:{len(text)}:".encode())
        hasher.update(source)
        hasher.update(text)
    return hasher.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerFast) -> str:
    """A digest of the tokenizer's full serialization (vocabulary, merges, normalizer, special tokens and the
    post-processor that adds them) and of its EOS token."""
    return _digest(f"{tokenizer.backend_tokenizer.to_str()}\0eos={tokenizer.eos_token_id}".encode())


def tokenize_documents(documents: Sequence[Document], tokenizer: PreTrainedTokenizerFast, cache_dir: str | os.PathLike,
                       batch_documents: int = 256) -> TokenizedCorpus:
    """The documents tokenized, from cache_dir/lm-tokens-<key> when a previous call wrote it, else tokenized
    batch_documents at a time with the tokenizer's batch API and cached there. Each document is encoded with the
    tokenizer's own special tokens and ended with its EOS (not repeated when the tokenizer already ends with it)."""
    if not documents:
        _refuse("tokenize_documents: no documents")
    if batch_documents < 1:
        _refuse(f"tokenize_documents: batch_documents must be >= 1, got {batch_documents}")
    key = _digest(f"tokens-{_CACHE_FORMAT}-{tokenizer_digest(tokenizer)}-{document_digest(documents)}".encode())
    folder = Path(cache_dir) / f"lm-tokens-{key[:24]}"
    return _read_tokens(build_folder(folder, lambda staging: _write_tokens(staging, documents, tokenizer,
                                                                           batch_documents, key)))


def _write_tokens(folder: Path, documents: Sequence[Document], tokenizer: PreTrainedTokenizerFast,
                  batch_documents: int, key: str) -> None:
    eos = tokenizer.eos_token_id
    starts = np.zeros(len(documents) + 1, dtype=np.int64)
    with open(folder / "tokens.bin", "wb") as file:
        for first in range(0, len(documents), batch_documents):
            batch = documents[first:first + batch_documents]
            encoded = tokenizer([document.text for document in batch], add_special_tokens=True,
                                return_attention_mask=False, verbose=False)["input_ids"]
            ended = [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]
            lengths = np.array([len(ids) for ids in ended], dtype=np.int64)
            file.write(np.fromiter(itertools.chain.from_iterable(ended), dtype="<i4", count=lengths.sum()).tobytes())
            starts[first + 1:first + len(batch) + 1] = starts[first] + np.cumsum(lengths)
    np.save(folder / "starts.npy", starts)
    record = {"key": key, "num_tokens": int(starts[-1]), "sources": [document.source for document in documents]}
    (folder / "index.json").write_text(json.dumps(record))


def _read_tokens(folder: Path) -> TokenizedCorpus:
    record = json.loads((folder / "index.json").read_text())
    tokens = np.memmap(folder / "tokens.bin", dtype="<i4", mode="r", shape=(record["num_tokens"],))
    return TokenizedCorpus(tokens, np.load(folder / "starts.npy"), tuple(record["sources"]), record["key"])


# ---------------------------------------------------------------------------------------------------------------------
# Split and packing


@dataclass(frozen=True)
class CorpusSplit:
    name: str  # "train" or "validation": names the split in refusals
    corpus: TokenizedCorpus
    documents: np.ndarray  # (num_documents,) int64 indices into corpus, ascending


def split_documents(corpus: TokenizedCorpus, val_fraction: float, seed: int = 0) -> tuple[CorpusSplit, CorpusSplit]:
    """(train, validation): a document goes to validation when a hash of (seed, its source), read as a fraction in
    [0, 1), falls below val_fraction, so a document keeps its split when others are added or removed. A split the
    hash leaves empty takes the one document nearest the threshold, so a corpus of two or more documents always
    splits."""
    if not 0 < val_fraction < 1:
        _refuse(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(corpus) < 2:
        _refuse(f"the corpus has {len(corpus)} document; a train/validation split by document needs at least 2")
    fractions = np.array([_unit_fraction(f"{seed}\0{source}") for source in corpus.sources])
    is_val = fractions < val_fraction
    if not is_val.any():
        is_val[np.argmin(fractions)] = True
    elif is_val.all():
        is_val[np.argmax(fractions)] = False
    return (CorpusSplit("train", corpus, np.flatnonzero(~is_val)),
            CorpusSplit("validation", corpus, np.flatnonzero(is_val)))


class PackedSequences(Dataset):
    """A split's documents concatenated (corpus order) into one stream, cut into sequences of seq_len + 1 tokens
    starting every seq_len tokens: item i holds input_ids = stream[i*L : i*L + L] and labels = stream[i*L + 1 : i*L +
    L + 1] (L = seq_len), a label set to IGNORE_INDEX where its token starts another document than the input token's,
    so no document is predicted from another. Every stream token after the first is a label of exactly one item, up
    to the last full sequence: the partial one after it is dropped. trained_tokens counts the labels kept."""

    def __init__(self, split: CorpusSplit, seq_len: int):
        if seq_len < 1:
            _refuse(f"--seq-len must be >= 1, got {seq_len}")
        self.split, self.seq_len = split, seq_len
        lengths = split.corpus.lengths[split.documents]
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])  # documents' starts in the stream
        num_tokens = int(self._offsets[-1])
        where = f"the {split.name} split ({len(lengths)} documents, {num_tokens} tokens)"
        if not (lengths >= 2).any():
            _refuse(f"{where}: every document is shorter than 2 tokens, so none has a token to predict")
        self.num_sequences = (num_tokens - 1) // seq_len
        if self.num_sequences == 0:
            _refuse(f"{where} yields no sequence of --seq-len {seq_len} (needs {seq_len + 1} tokens); lower "
                    "--seq-len or add data")
        # An input position's label is dropped exactly when it is its document's last token.
        packed = self.num_sequences * seq_len
        last_tokens = self._offsets[1:][lengths > 0] - 1
        self.trained_tokens = packed - int(np.count_nonzero(last_tokens < packed))
        if self.trained_tokens == 0:
            _refuse(f"{where}: its {self.num_sequences} sequence(s) of --seq-len {seq_len} hold no token to predict; "
                    "lower --seq-len")

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} out of range [0, {self.num_sequences})")
        begin, end = index * self.seq_len, (index + 1) * self.seq_len + 1
        first, last = np.searchsorted(self._offsets, [begin, end - 1], side="right") - 1
        pieces, owners = [], []
        for local in range(first, last + 1):
            low, high = max(begin, self._offsets[local]), min(end, self._offsets[local + 1])
            start = self.split.corpus.starts[self.split.documents[local]] - self._offsets[local]
            pieces.append(self.split.corpus.tokens[start + low:start + high])
            owners.append(np.full(high - low, local))
        tokens = torch.from_numpy(np.concatenate(pieces).astype(np.int64))
        owner = torch.from_numpy(np.concatenate(owners))
        labels = tokens[1:].masked_fill(owner[1:] != owner[:-1], IGNORE_INDEX)
        return {"input_ids": tokens[:-1], "labels": labels}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _digest(content: bytes) -> str:
    return hashlib.blake2b(content, digest_size=16).hexdigest()


def _unit_fraction(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2.0 ** 64
