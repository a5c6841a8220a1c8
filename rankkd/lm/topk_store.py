"""The teacher's top-K logits per position, dumped once and reused across student runs (offline distillation, as
axolotl's KD plugin and verl store them): for every sequence of the training data, the teacher's K largest logits at
every position and their token ids, which is all fused_linear_distill_loss reads of the teacher.

A dump is a folder:

    manifest.json            the TopKManifest: what was dumped (teacher, tokenizer, data, K, seq_len, ...)
    ids-00000.npy            int32 (n, seq_len, K): the top-K token ids of sequences [0, shard_size)
    logits-00000.npy         (n, seq_len, K) in the manifest's logits_dtype: their logits, largest first
    ids-00001.npy ...        the next shard_size sequences; the last shard holds the rest
    complete                 written last, once every sequence is in

Every file is written under a temporary name, synced to disk and renamed into place (the manifest first), so a file
under its final name is whole, and a shard whose two files are there is complete: an interrupted dump resumes after
its last complete shard. Shards are .npy files that numpy memory-maps, so a student run reads only the rows it uses.

Logits are stored as float16 (half the bytes; a bfloat16 teacher's logits convert to it exactly above 2^-14 in
magnitude, a float32 teacher's within a relative 2^-11) or float32. Not bfloat16, which numpy cannot memory-map."""
import dataclasses
import fcntl
import json
import operator
import os
from pathlib import Path

import numpy as np
import torch

from rankkd.fused_linear import teacher_topk
from rankkd.lm.models import final_hidden, lm_head

LOGITS_DTYPES = ("float16", "float32")
MANIFEST, COMPLETE, LOCK = "manifest.json", "complete", ".lock"


@dataclasses.dataclass(frozen=True)
class TopKManifest:
    """What a dump holds. Two dumps, or a dump and a run, agree when every field is equal."""
    teacher: str  # the teacher's zoo name, folder or hub name
    teacher_digest: str  # of its weights (rankkd.lm.models.weights_digest)
    tokenizer_digest: str
    data_digest: str  # of the token sequences, in their order
    k: int  # top-K entries per position
    seq_len: int
    num_sequences: int
    logits_dtype: str  # the stored logits' dtype: one of LOGITS_DTYPES
    shard_size: int  # sequences per shard file

    def __post_init__(self):
        for field in ("teacher", "teacher_digest", "tokenizer_digest", "data_digest"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"TopKManifest.{field} must be a non-empty string, got {getattr(self, field)!r}")
        for field in ("k", "seq_len", "num_sequences", "shard_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TopKManifest.{field} must be an integer >= 1, got {value!r}")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"TopKManifest.logits_dtype must be one of {LOGITS_DTYPES} (numpy cannot memory-map "
                             f"bfloat16; float16 holds a bfloat16 teacher's logits), got {self.logits_dtype!r}")

    @property
    def num_shards(self):
        return -(-self.num_sequences // self.shard_size)

    def shard_length(self, shard):
        return min(self.shard_size, self.num_sequences - shard * self.shard_size)


def _first_difference(found, wanted):
    """The first (field, found value, wanted value) where `wanted` (a TopKManifest or a dict of some fields) differs
    from the TopKManifest `found`, or None."""
    names = [field.name for field in dataclasses.fields(TopKManifest)]
    if isinstance(wanted, TopKManifest):
        wanted = dataclasses.asdict(wanted)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"expected names no TopKManifest field {unknown[0]!r}; fields: {', '.join(names)}")
    for name in names:
        if name in wanted and getattr(found, name) != wanted[name]:
            return name, getattr(found, name), wanted[name]
    return None


def _read_manifest(folder):
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"folder {str(folder)!r} holds no top-K dump ({MANIFEST} is missing)")
    try:
        return TopKManifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:  # bad JSON (a ValueError), missing or unknown fields, bad values
        raise ValueError(f"{str(path)!r} is not a top-K manifest ({error})") from None


def _shard_paths(folder, shard):
    return folder / f"ids-{shard:05d}.npy", folder / f"logits-{shard:05d}.npy"


def _write_atomically(path, write):
    """write(file) into a temporary file beside `path`, synced to disk, then renamed to `path`."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _sync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the renames themselves
    finally:
        os.close(descriptor)


class TopKWriter:
    """Writes a dump into `folder` (created if needed): sequences in order through add(), whole shards to disk as
    they fill, then finish(). next_sequence is the sequence add() takes next. Opening a folder that holds a dump of
    an equal manifest resumes it after its last complete shard (sequences added to a shard that never filled are
    lost with their process). One writer per folder at a time (a file lock); use it as a context manager or close()
    it to release the folder."""

    def __init__(self, folder, manifest):
        if not isinstance(manifest, TopKManifest):
            raise TypeError(f"manifest must be a TopKManifest, got {type(manifest).__name__}")
        self.folder, self.manifest = Path(folder), manifest
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / LOCK, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ValueError(f"another writer holds top-K dump folder {str(self.folder)!r}") from None
        try:
            self._open_dump()
        except BaseException:
            self.close()
            raise

    def _open_dump(self):
        # Temporary files of an interrupted writer (the lock says it is gone), with the names only a writer gives.
        for pattern in (f".{MANIFEST}.tmp", f".{COMPLETE}.tmp", ".ids-*.npy.tmp", ".logits-*.npy.tmp"):
            for leftover in self.folder.glob(pattern):
                leftover.unlink()
        if (self.folder / MANIFEST).exists():
            difference = _first_difference(_read_manifest(self.folder), self.manifest)
            if difference:
                field, found, wanted = difference
                raise ValueError(f"folder {str(self.folder)!r} holds a top-K dump of another manifest: {field} is "
                                 f"{found!r} there, {wanted!r} here")
        elif any(path.name != LOCK for path in self.folder.iterdir()):
            raise ValueError(f"folder {str(self.folder)!r} is not empty and holds no top-K dump ({MANIFEST} is "
                             "missing): give a new or empty folder")
        else:
            text = json.dumps(dataclasses.asdict(self.manifest), indent=2) + "\n"
            _write_atomically(self.folder / MANIFEST, lambda file: file.write(text.encode()))
            _sync_folder(self.folder)
        shards = 0
        while shards < self.manifest.num_shards and all(path.exists() for path in _shard_paths(self.folder, shards)):
            shards += 1
        self._shards_written = shards
        self.next_sequence = min(shards * self.manifest.shard_size, self.manifest.num_sequences)
        self._pending = []  # (ids, logits) numpy arrays of the shard being filled, in order

    def add(self, ids, logits):
        """Append sequences next_sequence, next_sequence + 1, ...: their top-K ids and logits, each (n, seq_len, k)
        with n >= 1. A shard goes to disk as soon as it is full."""
        m = self.manifest
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be a tensor of integer token ids, got {getattr(ids, 'dtype', type(ids))}")
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
        if ids.dim() != 3 or ids.shape[0] < 1 or ids.shape[1:] != (m.seq_len, m.k) or logits.shape != ids.shape:
            raise ValueError(f"ids and logits must both be (n, seq_len, k) = (n, {m.seq_len}, {m.k}) with n >= 1, got "
                             f"{tuple(ids.shape)} and {tuple(logits.shape)}")
        first, count = self.next_sequence, ids.shape[0]
        if first + count > m.num_sequences:
            raise ValueError(f"sequences {first}..{first + count - 1} are beyond the manifest's num_sequences = "
                             f"{m.num_sequences}")
        if ids.min() < 0 or ids.max() > torch.iinfo(torch.int32).max:
            raise ValueError(f"ids of sequences {first}..{first + count - 1} must lie in [0, 2^31), got "
                             f"[{ids.min().item()}, {ids.max().item()}]")
        stored = logits.detach().to(getattr(torch, m.logits_dtype))
        if not torch.isfinite(stored).all():
            raise ValueError(f"logits of sequences {first}..{first + count - 1} are not finite in {m.logits_dtype} "
                             "(NaN, inf, or beyond float16's 65504: store float32)")
        self._pending.append((ids.detach().to(torch.int32).cpu().numpy(), stored.cpu().numpy()))
        self.next_sequence += count
        self._write_full_shards()

    def _write_full_shards(self):
        m = self.manifest
        while self._shards_written < m.num_shards:
            length = m.shard_length(self._shards_written)
            if sum(len(ids) for ids, _ in self._pending) < length:
                return
            ids, logits = (np.concatenate(arrays) for arrays in zip(*self._pending))
            self._pending = [(ids[length:], logits[length:])] if len(ids) > length else []
            for path, array in zip(_shard_paths(self.folder, self._shards_written), (ids[:length], logits[:length])):
                _write_atomically(path, lambda file: np.save(file, array))
            _sync_folder(self.folder)
            self._shards_written += 1

    def finish(self):
        """Mark the dump complete; raises a ValueError unless every sequence is in."""
        if self.next_sequence < self.manifest.num_sequences:
            raise ValueError(f"the top-K dump in {str(self.folder)!r} holds {self.next_sequence} of "
                             f"{self.manifest.num_sequences} sequences; add the rest before finish()")
        _write_atomically(self.folder / COMPLETE, lambda file: None)
        _sync_folder(self.folder)

    def close(self):
        self._lock.close()  # releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class TopKStore:
    """A finished dump, memory-mapped: store[i] -> (ids (seq_len, k) int64, logits (seq_len, k) float32) of sequence
    i; store.batch(indices) stacks them. `expected` is the run's TopKManifest or a dict of the fields it must match;
    a mismatch, an unfinished dump, or a missing, cut or misshapen shard file is refused before any reading."""

    def __init__(self, folder, expected):
        self.folder = Path(folder)
        self.manifest = m = _read_manifest(self.folder)
        difference = _first_difference(m, expected)
        if difference:
            field, found, wanted = difference
            raise ValueError(f"top-K dump {str(self.folder)!r} does not match this run: {field} is {found!r} in the "
                             f"dump, {wanted!r} here")
        if not (self.folder / COMPLETE).is_file():
            raise ValueError(f"top-K dump {str(self.folder)!r} is incomplete (no {COMPLETE!r} mark): rerun the dump, "
                             "which resumes it")
        self._shards = []
        for shard in range(m.num_shards):
            shape = (m.shard_length(shard), m.seq_len, m.k)
            arrays = []
            for path, dtype in zip(_shard_paths(self.folder, shard), (np.int32, np.dtype(m.logits_dtype))):
                try:
                    array = np.load(path, mmap_mode="r")
                except (OSError, ValueError, EOFError) as error:
                    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                    raise ValueError(f"top-K shard {str(path)!r} is unreadable ({reason})") from None
                if array.dtype != dtype or array.shape != shape:
                    raise ValueError(f"top-K shard {str(path)!r} holds {array.dtype} {array.shape}, expected "
                                     f"{np.dtype(dtype)} {shape}")
                arrays.append(array)
            self._shards.append(tuple(arrays))

    def __len__(self):
        return self.manifest.num_sequences

    def __getitem__(self, index):
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} is outside the dump's {len(self)} sequences")
        ids, logits = self._shards[index // self.manifest.shard_size]
        row = index % self.manifest.shard_size
        return (torch.from_numpy(np.array(ids[row], dtype=np.int64)),
                torch.from_numpy(np.array(logits[row], dtype=np.float32)))

    def batch(self, indices):
        """(ids (n, seq_len, k) int64, logits (n, seq_len, k) float32) of the sequences `indices` (ints, or a 1-D
        integer tensor), in that order."""
        rows = [self[index] for index in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
        if not rows:
            raise ValueError("indices must name at least one sequence")
        return torch.stack([ids for ids, _ in rows]), torch.stack([logits for _, logits in rows])

    def __reduce__(self):  # a DataLoader worker reopens the files rather than receiving copies of them
        return type(self), (self.folder, self.manifest)


@torch.no_grad()
def dump_teacher_topk(model, sequences, writer, *, chunk_size=1024):
    """Run the teacher over `sequences` and write its top-K (writer.manifest.k) per position, then finish the dump.

    sequences yields (indices, input_ids): a batch's sequence numbers (1-D) and its token ids (n, seq_len), in order
    from sequence 0. On a resumed writer the sequences before writer.next_sequence are skipped without running the
    teacher. The logits come from the teacher's last hidden state and output embeddings, chunk_size positions at a
    time (rankkd.teacher_topk), never as a whole (positions x vocabulary) tensor, in the teacher's dtype or under the
    caller's autocast. One process writes a dump: under torchrun, rank 0."""
    weight, bias = lm_head(model)
    was_training = model.training
    model.eval()
    try:
        for indices, input_ids in sequences:
            indices = torch.as_tensor(indices).reshape(-1).cpu()
            if input_ids.dim() != 2 or len(indices) != input_ids.shape[0]:
                raise ValueError(f"each batch must be (indices (n,), input_ids (n, seq_len)), got {len(indices)} "
                                 f"indices and input_ids {tuple(input_ids.shape)}")
            start = writer.next_sequence
            keep = indices >= start
            if not keep.any():
                continue
            indices, input_ids = indices[keep], input_ids[keep.to(input_ids.device)]
            if not torch.equal(indices, torch.arange(start, start + len(indices))):
                raise ValueError(f"sequences must come in order: expected {start}..{start + len(indices) - 1}, got "
                                 f"{indices.tolist()[:8]}")
            hidden = final_hidden(model, input_ids.to(weight.device))
            writer.add(*teacher_topk(hidden, weight, writer.manifest.k, bias=bias, chunk_size=chunk_size))
        writer.finish()
    finally:
        model.train(was_training)
