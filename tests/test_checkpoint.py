"""Checkpoint files that are not what they should be: one line naming the file and the problem, for both readers
(rankkd.training.checkpoint.load_checkpoint and rankkd.models.weights.read_checkpoint_weights)."""
import io
import os
import pickle
import re
import zipfile

import pytest
import torch

from rankkd.models.weights import read_checkpoint_weights
from rankkd.training.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint

# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint files that are not what they should be: one line naming the file and the problem, for both readers.


def _saved_bytes(obj, **kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def _weights():
    return {"layer.weight": torch.randn(5, 3), "layer.bias": torch.randn(5)}


BROKEN_FILES = {  # name: (contents, a pattern for what the message must say)
    "empty": (lambda: b"", r"it is empty \(0 bytes\)$"),
    "cut in half": (lambda: (data := _saved_bytes(_weights()))[: len(data) // 2],
                    "it is truncated or corrupt: not a complete torch.save file"),
    "cut after its header": (lambda: _saved_bytes(_weights())[:100],
                             "it is truncated or corrupt: not a complete torch.save file"),
    "legacy format cut short": (lambda: (data := _saved_bytes(_weights(), _use_new_zipfile_serialization=False))
                                [: len(data) - 200], "it is truncated or corrupt: not a complete torch.save file"),
    "text": (lambda: b"<!DOCTYPE html>\n<title>404</title>", "it is not a torch.save file but text, starting "
                                                              "'<!DOCTYPE html>'$"),
    "random bytes": (lambda: b"\x00" + os.urandom(4096), "it is not a torch.save file$"),
    "python pickle": (lambda: pickle.dumps({"weights": [1.0, 2.0]}), "it is a Python pickle, not a torch.save file"),
    "pickled object": (lambda: _saved_bytes(torch.nn.Linear(3, 5)),
                       r"it holds a pickled torch.nn.modules.linear.Linear object, not only tensors"),
    "git lfs pointer": (lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n",
                        "Git LFS pointer"),
}
READERS = {"load_checkpoint": load_checkpoint, "read_checkpoint_weights": read_checkpoint_weights}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", BROKEN_FILES)
def test_broken_checkpoint_files_are_refused_in_one_line(tmp_path, reader, case):
    contents, problem = BROKEN_FILES[case]
    path = tmp_path / "last.pt"
    path.write_bytes(contents())
    with pytest.raises(ValueError) as refused:
        READERS[reader](path)
    message = str(refused.value)
    assert message.startswith(f"cannot read checkpoint {str(path)!r}: ")
    assert re.search(problem, message)
    assert "\n" not in message and "weights_only" not in message and "Errno" not in message


@pytest.mark.parametrize("reader", READERS)
def test_missing_paths_and_folders_are_named(tmp_path, reader):
    with pytest.raises(ValueError, match=f"^cannot read checkpoint '{tmp_path / 'nowhere.pt'}': no such file$"):
        READERS[reader](tmp_path / "nowhere.pt")
    with pytest.raises(ValueError, match=f"^cannot read checkpoint '{tmp_path}': it is a folder, not a file$"):
        READERS[reader](tmp_path)


def test_load_checkpoint_refuses_files_that_are_not_training_checkpoints(tmp_path):
    weights = tmp_path / "teacher.pth"
    torch.save(_weights(), weights)
    with pytest.raises(ValueError, match=rf"^checkpoint '{weights}' is not a rankkd training checkpoint \(it holds "
                                         rf"model weights only; missing keys {', '.join(CHECKPOINT_KEYS)}\)$"):
        load_checkpoint(weights)
    partial = tmp_path / "partial.pt"
    torch.save({"student": _weights(), "epoch": 2}, partial)
    with pytest.raises(ValueError, match=r"\(missing keys optimizer, config, rng\)$"):
        load_checkpoint(partial)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match=r"\(it holds a list; missing keys student, "):
        load_checkpoint(listed)


def test_load_checkpoint_reads_back_what_save_checkpoint_wrote(tmp_path):
    state = {"student": _weights(), "optimizer": {"state": {}}, "epoch": 3, "config": {"lr": 0.1}, "rng": [1, 2]}
    save_checkpoint(state, tmp_path / "last.pt")
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded["student"][key], value) for key, value in state["student"].items())
    assert (loaded["epoch"], loaded["config"], loaded["rng"]) == (3, {"lr": 0.1}, [1, 2])
    assert load_checkpoint(tmp_path / "last.pt", required_keys=("student",))["epoch"] == 3


def test_read_checkpoint_weights_refuses_files_without_weights(tmp_path):
    path = tmp_path / "config.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    with pytest.raises(ValueError, match=f"^checkpoint '{path}' holds no model weights but a dict of epoch, config"):
        read_checkpoint_weights(path)
    torch.save({}, path)
    with pytest.raises(ValueError, match="holds no model weights but {}"):
        read_checkpoint_weights(path)


# ---------------------------------------------------------------------------------------------------------------------
# Damage that leaves a file's shape intact: torch.load reads it without a word, the CRC check of every member does not.


def _checkpoint_with_tensors(path):
    """A training checkpoint of fresh random weights (odd sizes) at `path`; returns the zip member of each tensor's
    storage by its key, and where its bytes start in the file."""
    student = {"conv.weight": torch.randn(37, 3, 3, 3), "fc.weight": torch.randn(101, 37), "fc.bias": torch.randn(101)}
    save_checkpoint({"student": student, "optimizer": {"state": {}}, "epoch": 4, "config": {}, "rng": []}, path)
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: info for info in archive.infolist()}
    # torch.save writes the storages in the order the pickle meets them: data/0, data/1, ...
    starts = {}
    for index, key in enumerate(student):
        info = members[next(name for name in members if name.endswith(f"/data/{index}"))]
        starts[key] = (info.filename, info.header_offset + 30 + len(info.filename.encode()) + len(info.extra))
    return student, starts


@pytest.mark.parametrize("reader", READERS)
def test_bytes_overwritten_inside_a_tensor_are_refused_naming_its_member(tmp_path, reader):
    path = tmp_path / "last.pt"
    student, starts = _checkpoint_with_tensors(path)
    member, start = starts["fc.weight"]
    data = bytearray(path.read_bytes())
    data[start + 100:start + 2100] = os.urandom(2000)  # inside fc.weight's 101 x 37 float32 values
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # what went before: it loads, with wrong weights
    with pytest.raises(ValueError) as refused:
        READERS[reader](path)
    assert str(refused.value) == (f"cannot read checkpoint {str(path)!r}: member {member!r} is damaged (its CRC-32 "
                                  "does not match its bytes): the file changed after it was written")


@pytest.mark.parametrize("where", ["the end", "the directory", "a recorded CRC"])
def test_damage_at_the_end_and_in_the_zip_directory_is_refused(tmp_path, where):
    path = tmp_path / "last.pt"
    _, starts = _checkpoint_with_tensors(path)
    data = bytearray(path.read_bytes())
    directory = data.rindex(b"PK\x05\x06")  # the end-of-directory record; the directory's entries before it
    entries = data.index(b"PK\x01\x02")
    if where == "the end":
        data[-2000:] = os.urandom(2000)
    elif where == "the directory":
        data[entries:directory] = os.urandom(directory - entries)
    else:  # one entry's CRC field (16 bytes into it): only a read of that member shows the mismatch
        member, _ = starts["conv.weight"]
        entry = data.index(member.encode(), entries) - 46  # the name follows the entry's 46 fixed bytes
        data[entry + 16:entry + 20] = bytes(4 * [0xA5])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"cannot read checkpoint {str(path)!r}: ") and "\n" not in message
    if where == "a recorded CRC":
        assert f"member {starts['conv.weight'][0]!r} is damaged (its CRC-32 does not match its bytes)" in message
    else:
        assert message.endswith("it is truncated or corrupt: not a complete torch.save file")
