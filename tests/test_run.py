"""rankkd.training.trainer: the trainer every task shares, called in-process on a tiny CIFAR-format folder. A run is
identified by its settings, refuses to mix another experiment into its folder, survives a full disk and a cut-short
metrics line, and ends on Ctrl-C with one line saying how to continue."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import write_cifar100

from rankkd.training import loop
from rankkd.training.checkpoint import load_checkpoint
from rankkd.training.config import make_parser, resolve_config
from rankkd.distributed import init_distributed
from rankkd.training.trainer import main
from rankkd.tasks.cifar100 import TASK

REPO = Path(__file__).resolve().parents[1]
TINY = ["--teacher", "resnet8", "--teacher-weights", "random", "--student", "resnet8", "--batch-size", "64",
        "--log-every", "2", "--epochs", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_cifar100(tmp_path_factory.mktemp("data"), num_train=128, num_test=64))


def run(data, *argv):
    return main(TASK, ["--data", data, *TINY, *argv])


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def refused(capsys, *argv):
    with pytest.raises(SystemExit) as stopped:
        main(TASK, list(argv))
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in error, error
    return error


def test_resume_auto_without_out_continues_only_the_same_experiment(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(data, "--epochs", "1")
    (first,) = Path("runs").iterdir()
    time.sleep(1.1)  # folder names hold the second
    run(data, "--epochs", "1", "--seed", "1", "--resume", "auto")  # another seed: another run, in a new folder
    assert "no run under runs/ has these settings" in capsys.readouterr().out
    assert len(list(Path("runs").iterdir())) == 2 and len(records(first)) == 1
    run(data, "--epochs", "2", "--resume", "auto")  # the seed-0 run, continued
    assert [record["epoch"] for record in records(first)] == [1, 2]


def test_a_changed_experiment_is_refused_unless_allowed_and_then_recorded(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    run(data, "--epochs", "1", "--out", out)
    error = refused(capsys, "--data", data, *TINY, "--out", out, "--resume", "auto", "--method", "dkd+rank")
    # The pair's DKD recipe differs in its weights too: each changed option is named.
    assert "holds a run with other settings (" in error and "--allow-changed-settings" in error
    assert "--method kd -> dkd" in error and "--ce-weight 0.1 -> 1.0" in error
    assert len(records(out)) == 1
    run(data, "--out", out, "--resume", "auto", "--method", "dkd+rank", "--allow-changed-settings")
    second = records(out)[1]
    assert "--method kd -> dkd" in second["settings_changed"] and "loss_dkd" in second


def test_a_full_disk_stops_with_one_line_and_best_agrees_after_resuming(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_copy = loop.copy_atomically

    def disk_full_at_best(source, destination):
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    monkeypatch.setattr(loop, "copy_atomically", disk_full_at_best)
    with pytest.raises(SystemExit) as stopped:
        run(data, "--epochs", "1", "--out", str(out))
    error = capsys.readouterr().err
    assert stopped.value.code == 1 and "Traceback" not in error
    assert f"no space left on the device while writing into {out}: {out / 'last.pt'} holds epoch 1" in error
    assert not (out / "best.pt").exists()
    monkeypatch.setattr(loop, "copy_atomically", real_copy)
    summary = run(data, "--epochs", "1", "--out", str(out), "--resume", "auto")  # nothing to train, best.pt back
    assert summary["best"]["epoch"] == 1
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and best["best"] == summary["best"]


def test_a_lost_best_of_an_earlier_epoch_is_not_claimed(data, tmp_path):
    out = tmp_path / "run"
    run(data, "--epochs", "1", "--out", str(out))
    state = torch.load(out / "last.pt", weights_only=True)
    state["best"] = {"val_top1": 99.0, "epoch": 0 + 1}
    state["epoch"] = 2  # as if epoch 2 were trained without beating epoch 1, whose best.pt is lost
    torch.save(state, out / "last.pt")
    (out / "best.pt").unlink()
    summary = run(data, "--epochs", "3", "--out", str(out), "--resume", "auto")
    assert summary["best"]["epoch"] == 3 and (out / "best.pt").exists()
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == 3


def test_a_cut_short_last_metrics_line_is_dropped_with_a_note(data, tmp_path, capsys):
    out = tmp_path / "run"
    run(data, "--epochs", "1", "--out", str(out))
    with open(out / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 2, "val_to')  # a crash between write and flush
    capsys.readouterr()
    run(data, "--out", str(out), "--resume", "auto")
    assert "its last line was cut short (a run stopped while writing it); dropped it" in capsys.readouterr().err
    assert [record["epoch"] for record in records(out)] == [1, 2]


def test_a_cut_short_line_of_an_epoch_the_checkpoint_holds_is_rebuilt_from_it(data, tmp_path, capsys):
    out = tmp_path / "run"
    run(data, "--out", str(out))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # the file lost its end
    capsys.readouterr()
    run(data, "--out", str(out), "--resume", "auto", "--epochs", "3")
    assert "its last line was cut short (a run stopped while writing it); rebuilt epoch 2's record from the " \
           "checkpoint" in capsys.readouterr().err
    kept = records(out)
    assert [record["epoch"] for record in kept] == [1, 2, 3]
    assert json.dumps(kept[1]) + "\n" == lines[1]  # the record as it was written


def test_an_unreadable_config_json_is_never_adopted(data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run(data, "--epochs", "1")
    (first,) = Path("runs").iterdir()
    args = make_parser(TASK).parse_args(["--data", data, *TINY, "--resume", "auto"])
    assert resolve_config(TASK, args, init_distributed("cpu")).job.out == str(first)  # readable: adopted
    for contents in ('{"seed": 0, "batch', "", "{}", "[1, 2]", '{"notes": "mine"}', "[" * 100_000):
        (first / "config.json").write_text(contents)
        capsys.readouterr()
        out = resolve_config(TASK, args, init_distributed("cpu")).job.out
        assert Path(out) != first and Path(out).parent == first.parent, contents
        assert f"no run under runs/ has these settings (the newest like it: {first})" in capsys.readouterr().out


def test_a_new_run_never_takes_an_existing_folder(data, tmp_path, monkeypatch):
    # Runs named by the second they start: a second run in the same second gets a suffix, not the first one's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda _format: "20261207-120000")
    args = make_parser(TASK).parse_args(["--data", data, *TINY])
    first = resolve_config(TASK, args, init_distributed("cpu")).job.out
    Path(first).mkdir(parents=True)
    second = resolve_config(TASK, args, init_distributed("cpu")).job.out
    Path(second).mkdir()
    third = resolve_config(TASK, args, init_distributed("cpu")).job.out
    assert (second, third) == (f"{first}-2", f"{first}-3")


def _overwrite_inside_the_weights(checkpoint):
    """2,000 bytes of the largest tensor in `checkpoint` overwritten; returns that tensor's zip member."""
    with zipfile.ZipFile(checkpoint) as archive:
        info = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 3
    data = bytearray(checkpoint.read_bytes())
    data[start:start + 2000] = os.urandom(2000)
    checkpoint.write_bytes(bytes(data))
    return info.filename


def test_a_damaged_last_pt_falls_back_to_the_previous_checkpoint_saying_so(data, tmp_path, capsys):
    out = tmp_path / "run"
    run(data, "--out", str(out))
    assert torch.load(out / "previous.pt", weights_only=True)["epoch"] == 1
    member = _overwrite_inside_the_weights(out / "last.pt")
    capsys.readouterr()
    run(data, "--out", str(out), "--resume", "auto")
    error = capsys.readouterr().err
    assert (f"cannot read checkpoint '{out / 'last.pt'}': member {member!r} is damaged (its CRC-32 does not match its "
            f"bytes): the file changed after it was written: continuing from {out / 'previous.pt'}, which holds "
            "epoch 1 (the damaged file is kept as last.pt.damaged)") in error
    assert [record["epoch"] for record in records(out)] == [1, 2]  # epoch 2 trained again
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert load_checkpoint(out / "previous.pt")["epoch"] == 1  # never the damaged file
    assert (out / "last.pt.damaged").exists()


def test_a_damaged_last_pt_without_a_previous_one_is_refused_in_one_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    run(data, "--out", str(out), "--epochs", "1")
    member = _overwrite_inside_the_weights(out / "last.pt")
    error = refused(capsys, "--data", data, *TINY, "--out", str(out), "--resume", "auto")
    assert error == (f"cifar100.py: error: cannot read checkpoint '{out / 'last.pt'}': member {member!r} is damaged "
                     "(its CRC-32 does not match its bytes): the file changed after it was written; there is no "
                     "previous.pt to fall back to\n")


def test_ctrl_c_ends_with_one_line_and_exit_130(data, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(REPO / "train" / "cifar100.py"), "--data", data, *TINY,
                                "--epochs", "50", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 240
    while not (out / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=120)
    assert process.returncode == 130, error
    assert "Traceback" not in error and "cifar100.py: interrupted:" in error and "--resume auto" in error, error
    assert len(error.strip().splitlines()) == 1, error


def test_a_checkpoint_with_the_earlier_flat_settings_resumes_or_is_refused_by_name(data, tmp_path, capsys):
    # Before the settings had parts, config.json and checkpoints held one flat dict of option names.
    from rankkd.training.config import flat_settings

    out = tmp_path / "run"
    run(data, "--epochs", "1", "--out", str(out))
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"] = {key: value for key, value in flat_settings(state["config"]).items()
                       if key not in ("task", "allow_changed_settings")}
    torch.save(state, out / "last.pt")
    error = refused(capsys, "--data", data, *TINY, "--out", str(out), "--resume", "auto", "--seed", "3")
    assert "holds a run with other settings (--seed 0 -> 3)" in error
    run(data, "--out", str(out), "--resume", "auto")
    assert [record["epoch"] for record in records(out)] == [1, 2]


def _as_written_before_the_job_part(record):
    """A record() as runs wrote it before the job's part had its name: that part called "run", and an "augment" part
    in every task (empty for CIFAR-100)."""
    parts = {("run" if key == "job" else key): value for key, value in record.items()}
    order = ("task", "recipe", "loss_recipe", "run", "model", "data", "augment", "optim", "speed", "loss")
    return {key: parts.get(key, {}) for key in order}


def test_a_run_written_before_the_job_part_had_its_name_resumes_or_is_refused_by_name(data, tmp_path, monkeypatch,
                                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    run(data, "--epochs", "1")
    (out,) = Path("runs").iterdir()
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"] = _as_written_before_the_job_part(state["config"])
    torch.save(state, out / "last.pt")
    earlier = _as_written_before_the_job_part(json.loads((out / "config.json").read_text()))
    (out / "config.json").write_text(json.dumps(earlier, indent=2))
    # The seed is one of the job part's settings: read from the part of its earlier name, it tells the runs apart.
    error = refused(capsys, "--data", data, *TINY, "--out", str(out), "--resume", "auto", "--seed", "3")
    assert "holds a run with other settings (--seed 0 -> 3)" in error
    run(data, "--epochs", "1", "--seed", "3", "--resume", "auto")  # without --out: another experiment's folder
    assert len(list(Path("runs").iterdir())) == 2 and len(records(out)) == 1
    run(data, "--resume", "auto")  # the same experiment's folder, continued
    assert [record["epoch"] for record in records(out)] == [1, 2]
    assert "job" in json.loads((out / "config.json").read_text())  # rewritten at the start, in today's form
