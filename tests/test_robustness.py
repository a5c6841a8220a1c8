"""Failing early and clearly: run-folder locks (between real processes), writable-folder checks, checkpoint files
that are not what they should be, teacher downloads without network, and unreadable images found before training."""
import io
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lock_is_free
from PIL import Image

from rankkd.models.weights import read_checkpoint_weights
from rankkd.training import run_folder
from rankkd.training.checkpoint import CHECKPOINT_KEYS, load_checkpoint, save_checkpoint
from rankkd.training.data import folder, scan
from rankkd.training.run_folder import FolderInUseError, RunLock, check_writable

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------------
# Run lock: the second of two real processes on one folder stops at once; a killed holder leaves no stale lock.

HOLD = """
import sys, time
from rankkd.training.run_folder import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""

TAKE = """
import sys
from rankkd.training.run_folder import FolderInUseError, RunLock
try:
    RunLock(sys.argv[1], wait=sys.argv[2] == "wait", what="--out").acquire()
except FolderInUseError as error:
    print(error, file=sys.stderr)
    sys.exit(3)
print("acquired", flush=True)
"""


def _python(script, *args, **popen):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, text=True, **popen)


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of tmp_path/run, killed (SIGKILL) by the test or at the end."""
    process = _python(HOLD, tmp_path / "run", stdout=subprocess.PIPE)
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def test_second_run_on_a_folder_stops_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, holder):
    folder = tmp_path / "run"
    second = _python(TAKE, folder, "fail", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 3 and out == ""
    assert f"--out {folder} is in use by process {holder.pid} on {socket.gethostname()}" in err
    assert not lock_is_free(folder)
    with pytest.raises(FolderInUseError, match=f"process {holder.pid} "):
        RunLock(folder).acquire()

    holder.kill()
    assert holder.wait() == -9
    assert lock_is_free(folder)
    with RunLock(folder):
        assert f'"pid": {os.getpid()},' in (folder / RunLock.file_name).read_text()
        assert not lock_is_free(folder)
    assert lock_is_free(folder) and (folder / RunLock.file_name).read_text() == ""


def test_waiting_lock_says_whom_it_waits_for_then_takes_over(tmp_path, holder):
    waiter = _python(TAKE, tmp_path / "run", "wait", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waiting = next((line for line in waiter.stderr if "waiting" in line), "")  # read up to the notice
    assert f"{tmp_path / 'run'} is in use by process {holder.pid}" in waiting
    assert waiter.poll() is None  # still blocked: the holder is alive
    holder.kill()
    out, err = waiter.communicate(timeout=120)
    assert (waiter.returncode, out) == (0, "acquired\n") and "waiting" not in err  # said once


HOLD_WITH_CHILD = """
import os, sys, time
from rankkd.training.run_folder import RunLock
RunLock(sys.argv[1], what="--out").acquire()
if os.fork() == 0:  # a loader worker that outlives its parent for a while
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    folder = tmp_path / "run"
    parent = _python(HOLD_WITH_CHILD, folder, stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert parent.stdout.readline() == "locked\n"
        assert not lock_is_free(folder)
        parent.kill()  # the child lives on
        assert parent.wait() == -9
        assert lock_is_free(folder)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)


def test_lock_nests_within_a_process_and_creates_its_folder(tmp_path):
    folder = tmp_path / "cache" / "teacher"
    with RunLock(folder, wait=True):
        with RunLock(folder):  # the run that trains the cached teacher locks the same folder
            assert not lock_is_free(folder)
        assert not lock_is_free(folder)
    assert lock_is_free(folder)


def test_lock_on_an_unwritable_place_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"^--out {blocker / 'run'} is not writable: {blocker} is a file, not a "
                                         "folder$"):
        RunLock(blocker / "run", what="--out").acquire()


# ---------------------------------------------------------------------------------------------------------------------
# Writable folders, checked before any work.


def test_check_writable_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "runs" / "x"
    assert check_writable(folder, "--out") == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_check_writable_refuses_a_path_through_a_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    for path in (blocker, blocker / "runs" / "x"):
        with pytest.raises(ValueError, match=f"^--out {path} is not writable: {blocker} is a file, not a folder$"):
            check_writable(path, "--out")


def test_check_writable_refuses_a_read_only_folder(tmp_path, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        writable_anyway = os.access(folder, os.W_OK)  # root ignores the mode bits
        if writable_anyway:
            # Root (as in many containers) writes into any folder; fail the probe the way a read-only folder does.
            def denied(**kwargs):
                raise PermissionError(13, "Permission denied", os.path.join(kwargs["dir"], ".write-probe-x"))
            monkeypatch.setattr(run_folder.tempfile, "mkstemp", denied)
        with pytest.raises(ValueError, match=f"^the cache folder {folder} is not writable: Permission denied$"):
            check_writable(folder, "the cache folder")
    finally:
        folder.chmod(0o700)


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
# Teacher weights without network: the URL, the cause, and how to pass a file instead.


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """torch.hub's downloads raise `error` (set by the test); its cache is an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    failure = {}

    def download(url, destination, *args, **kwargs):
        raise failure["error"]

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return failure


@pytest.mark.parametrize("error, cause", [
    (urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")),
     r"\[Errno -3\] Temporary failure in name resolution"),
    (urllib.error.HTTPError("https://x", 403, "Forbidden", None, None), "HTTP Error 403: Forbidden"),
    (TimeoutError("timed out"), "timed out"),
])
def test_teacher_download_failure_names_url_and_the_local_file_way(tmp_path, no_network, error, cause):
    import torchvision

    no_network["error"] = error
    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    file_name = entry.url.rsplit("/", 1)[1]
    with pytest.raises(ValueError) as refused:
        models.load_teacher("resnet18", "IMAGENET1K_V1", 1000)
    message = str(refused.value)
    assert message.startswith(f"cannot download torchvision weights {entry} from {entry.url}: ")
    assert re.search(cause, message) and "\n" not in message
    assert f"--teacher-weights /path/to/{file_name}" in message
    assert str(tmp_path / "torch-home" / "hub" / "checkpoints" / file_name) in message

    # The way out that the message gives: the same file, fetched elsewhere, passed by path.
    fetched = models.build_model("resnet18", 1000).state_dict()
    torch.save(fetched, tmp_path / file_name)
    teacher = models.load_teacher("resnet18", str(tmp_path / file_name), 1000)
    assert all(torch.equal(teacher.state_dict()[key], value) for key, value in fetched.items())


def test_unreadable_earlier_download_is_named(tmp_path, no_network):
    import torchvision

    entry = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / entry.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(_saved_bytes(_weights())[:300])
    with pytest.raises(ValueError, match=f"the copy downloaded before, {cached}, can't be read .*delete it"):
        models.load_teacher("resnet18", "IMAGENET1K_V1", 1000)


# ---------------------------------------------------------------------------------------------------------------------
# Unreadable images: found in parallel before training, and by `python -m rankkd.training.data.scan`.


def _image_bytes(rng, file_format):
    height, width = rng.integers(7, 40, size=2)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, file_format)
    return buffer.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    """ROOT/{train,val}/<class>/ with readable JPEGs and PNGs (some in disguise, some padded) and four broken files;
    returns (root, {broken path: what its reason must say})."""
    rng = np.random.default_rng()
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for index in range(int(rng.integers(5, 9))):
                file_format = "PNG" if index % 3 == 0 else "JPEG"
                (root / split / name / f"{index:02d}.{file_format}").write_bytes(_image_bytes(rng, file_format))
    (root / "train" / "ant" / "png-named.JPEG").write_bytes(_image_bytes(rng, "PNG"))  # readable: PIL sniffs
    (root / "train" / "bee" / "padded.jpg").write_bytes(_image_bytes(rng, "JPEG") + b"\0" * 300)  # readable
    (root / "val" / ".cache").mkdir()
    (root / "val" / ".cache" / "junk.jpg").write_text("hidden folders are not read")
    jpeg, png = _image_bytes(rng, "JPEG"), _image_bytes(rng, "PNG")
    broken = {
        root / "train" / "bee" / "cut.JPEG": (jpeg[: int(rng.integers(len(jpeg) // 3, len(jpeg) - 2))], "truncated"),
        # Cut into the pixel data: a PNG without only its end chunk decodes, so it is readable.
        root / "train" / "ant" / "cut.png": (png[: int(rng.integers(len(png) // 3, len(png) - 20))], "truncated"),
        root / "val" / "ant" / "empty.jpeg": (b"", "empty file"),
        root / "val" / "bee" / "notes.JPEG": (b"these are notes, not pixels\n", "not an image"),
    }
    for path, (contents, _) in broken.items():
        path.write_bytes(contents)
    return root, {str(path): reason for path, (_, reason) in broken.items()}


def test_find_unreadable_images_lists_every_broken_file_in_order(image_tree):
    root, broken = image_tree
    paths = scan.list_images(root)
    assert not any("/." in path for path in paths)
    for workers in (1, 3):
        calls = []
        found = folder.find_unreadable_images(paths, workers=workers, progress=lambda *args: calls.append(args))
        assert [image.path for image in found] == [path for path in paths if path in broken]
        assert all(re.search(broken[image.path], image.reason) for image in found)
        assert calls[-1] == (len(paths), len(broken))
        assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    full = folder.find_unreadable_images(paths, full=True, workers=2)
    assert [image.path for image in full] == [path for path in paths if path in broken]


def test_check_images_names_the_files_and_the_way_out(image_tree):
    root, broken = image_tree
    val = scan.list_images(root / "val")
    with pytest.raises(folder.BadImageError) as refused:
        folder.check_images(val, what="the validation set", workers=2)
    message = str(refused.value)
    val_broken = sorted(path for path in broken if "/val/" in path)
    assert message.startswith("2 unreadable image file(s) in the validation set: ")
    assert all(path in message for path in val_broken) and refused.value.path == val_broken[0]
    assert "mv FILE FILE.unreadable" in message and f"python -m rankkd.training.data.scan {root / 'val'}" in message
    folder.check_images([path for path in val if path not in broken], what="the validation set")  # no error


def test_find_undecodable_names_the_first_broken_file(image_tree):
    root, broken = image_tree
    paths = scan.list_images(root / "train")
    first = next(path for path in paths if path in broken)
    error = folder.find_undecodable(paths)
    assert isinstance(error, folder.BadImageError) and error.path == first and first in str(error)
    assert folder.find_undecodable([path for path in paths if path not in broken]) is None


def test_scan_command_lists_unreadable_images_and_exits_1(image_tree, capsys):
    root, broken = image_tree
    assert scan.main([str(root), "--workers", "2"]) == 1
    out, err = capsys.readouterr()
    listed = dict(line.split("\t") for line in out.splitlines())
    assert sorted(listed) == sorted(broken)
    total = len(scan.list_images(root))
    assert f"checked {total:,}/{total:,} images, 4 unreadable" in err
    assert f"4 of {total:,} images are unreadable" in err and "while read -r f; do mv" in err

    for path in broken:
        os.rename(path, path + ".unreadable")  # the exclusion the summary suggests
    assert scan.main([str(root), "--full"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and f"all {total - 4:,} images are readable" in err


def test_scan_command_refuses_bad_arguments(tmp_path, capsys):
    for argv, message in (([str(tmp_path / "nowhere")], "is not a folder"), ([str(tmp_path)], "no image files"),
                          ([str(tmp_path), "--workers", "0"], "--workers must be at least 1")):
        with pytest.raises(SystemExit) as stopped:
            scan.main(argv)
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_scan_runs_as_a_module(image_tree):
    root, broken = image_tree
    done = subprocess.run([sys.executable, "-m", "rankkd.training.data.scan", str(root / "val")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert sorted(line.split("\t")[0] for line in done.stdout.splitlines()) == sorted(
        path for path in broken if "/val/" in path)
