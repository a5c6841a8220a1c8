"""rankkd.training.run_folder: run-folder locks between real processes and writable-folder checks, before any work."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lock_is_free

from rankkd.training import run_folder
from rankkd.training.checkpoint import load_checkpoint, save_checkpoint
from rankkd.training.run_folder import (FolderInUseError, RunLock, check_writable, checkpoint_to_continue_from,
                                        saved_progress)

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


def test_locks_of_other_names_on_one_folder_are_independent_and_create_it(tmp_path):
    # The cache entry's lock and the lock of the run that trains the cached teacher there; a cell's claim and its run.
    folder = tmp_path / "cache" / "teacher"
    with RunLock(folder, wait=True, name=".cache-lock"):
        with RunLock(folder):
            assert not lock_is_free(folder)
        assert lock_is_free(folder)
        with pytest.raises(FolderInUseError):
            RunLock(folder, name=".cache-lock").acquire()


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
# A full disk on rank 0 stops every rank, not only rank 0 while the others train on into a collective that never ends.

WRITE_ON_MAIN = """
import errno, sys
from pathlib import Path
from rankkd.distributed import cleanup_distributed, init_distributed
from rankkd.training.run_folder import DiskFullError, write_on_main

env = init_distributed("cpu")
out = Path(sys.argv[1])
assert write_on_main(env, out, lambda: "written") == ("written" if env.is_main else None)

def fill_the_disk():
    raise OSError(errno.ENOSPC, "No space left on device", str(out / "last.pt"))

def say(line):  # one write, so that the two ranks' lines on the shared pipe do not interleave (print writes twice)
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()

try:
    write_on_main(env, out, fill_the_disk)
    say(f"rank {env.rank} went on")
except DiskFullError as error:
    say(f"rank {env.rank} stopped: {error}")
cleanup_distributed()
"""


def test_a_full_disk_on_rank_0_stops_every_rank(tmp_path):
    script = tmp_path / "write_on_main.py"
    script.write_text(WRITE_ON_MAIN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert lines[0].startswith(f"rank 0 stopped: no space left on the device while writing into {tmp_path}")
    assert lines[1] == f"rank 1 stopped: rank 0 ran out of disk space while writing into {tmp_path}; stopped with it."


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint a run continues from: last.pt, else the one before it.


def _save(path, epoch, keep_previous=True):
    state = {"student": {"weight": torch.randn(7, 5)}, "optimizer": {}, "epoch": epoch, "config": {}, "rng": []}
    save_checkpoint(state, path, keep_previous=keep_previous)


def test_each_checkpoint_keeps_the_one_before_it_and_a_missing_last_pt_falls_back_to_it(tmp_path):
    assert checkpoint_to_continue_from(tmp_path) is None
    assert saved_progress(tmp_path) == "no checkpoint had been written yet."
    for epoch in (1, 2, 3):
        _save(tmp_path / "last.pt", epoch)
    path, state, note = checkpoint_to_continue_from(tmp_path)
    assert (path, state["epoch"], note) == (tmp_path / "last.pt", 3, None)
    assert load_checkpoint(tmp_path / "previous.pt")["epoch"] == 2
    (tmp_path / "last.pt").unlink()  # killed between keeping the previous one and writing the new one
    path, state, note = checkpoint_to_continue_from(tmp_path)
    assert (path, state["epoch"]) == (tmp_path / "previous.pt", 2)
    assert note == (f"{tmp_path / 'last.pt'} is missing (a run stopped while replacing it): continuing from "
                    f"{tmp_path / 'previous.pt'}, which holds epoch 2")
    assert saved_progress(tmp_path) == f"{tmp_path / 'previous.pt'} holds epoch 2."


def test_neither_checkpoint_readable_is_one_line_naming_both(tmp_path):
    _save(tmp_path / "last.pt", 1)
    _save(tmp_path / "last.pt", 2)
    for name in ("last.pt", "previous.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as refused:
        checkpoint_to_continue_from(tmp_path)
    assert str(refused.value) == (f"cannot read checkpoint '{tmp_path / 'last.pt'}': it is truncated or corrupt: not "
                                  f"a complete torch.save file; and cannot read checkpoint "
                                  f"'{tmp_path / 'previous.pt'}': it is truncated or corrupt: not a complete "
                                  "torch.save file")
    assert saved_progress(tmp_path) == f"nothing to continue from: {refused.value}."
