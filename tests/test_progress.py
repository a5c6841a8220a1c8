"""Progress lines (rankkd.training.progress): the duration format, plain lines in a log, tqdm's bar on a terminal."""
import io
import re

import numpy as np
import pytest

from rankkd.training import progress
from rankkd.training.progress import Progress, format_duration


def _seconds(text):
    """format_duration read back: m:ss, or h:mm:ss with as many hour digits as needed."""
    match = re.fullmatch(r"(?:(?P<h>[1-9]\d*):(?P<m2>[0-5]\d)|(?P<m>[1-5]?\d)):(?P<s>[0-5]\d)", text)
    assert match, text
    hours, minutes = int(match["h"] or 0), int(match["m2"] or match["m"])
    return 3600 * hours + 60 * minutes + int(match["s"])


def test_format_duration():
    assert [format_duration(s) for s in (0, 0.99, 9, 60, 599.5, 3599, 3600, 3661, 36000, 360000)] == [
        "0:00", "0:00", "0:09", "1:00", "9:59", "59:59", "1:00:00", "1:01:01", "10:00:00", "100:00:00"]
    # Any duration reads back as its whole seconds, in the shortest form: hours only when there are some.
    for seconds in np.random.default_rng().uniform(0, 500 * 3600, 500):
        text = format_duration(seconds)
        assert _seconds(text) == int(seconds) and (text.count(":") == 2) == (seconds >= 3600)


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    return clock


def test_a_log_gets_one_line_per_update_with_the_time_left(capsys, clock):
    bar = Progress(250, "epoch 3")
    assert bar.bar is None  # pytest's captured stdout is no terminal
    bar.update(0, "starting")
    clock.now += 40.0
    bar.update(16, "loss 2.3071  812 img/s")
    clock.now += 3.5 * 3600 - 40.0
    bar.update(200, "loss 1.0002")
    bar.update(250, "loss 0.9")
    bar.close()
    assert capsys.readouterr().out.splitlines() == [
        "epoch 3 [  0/250] starting  ETA 0:00",
        "epoch 3 [ 16/250] loss 2.3071  812 img/s  ETA 9:45",  # 40 s for 16 steps: 234 more take 585 s
        "epoch 3 [200/250] loss 1.0002  ETA 52:30",  # 3.5 h for 200 steps: 50 more take 52.5 min
        "epoch 3 [250/250] loss 0.9  ETA 0:00",
    ]


@pytest.mark.parametrize("on_terminal", [False, True])
def test_disabled_progress_shows_nothing(monkeypatch, capsys, on_terminal):
    """Ranks other than 0 pass enabled=False: no line and no bar, on a terminal or not."""
    terminal = Terminal()
    if on_terminal:
        monkeypatch.setattr(progress.sys, "stdout", terminal)
    bar = Progress(10, "val", enabled=False)
    assert bar.bar is None
    bar.update(5, "loss 1.0")
    bar.close()
    assert capsys.readouterr().out == "" and terminal.getvalue() == ""


def test_a_terminal_gets_tqdms_bar(monkeypatch):
    pytest.importorskip("tqdm")
    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stdout", terminal)
    bar = Progress(40, "epoch 0")
    assert bar.bar is not None and bar.bar.total == 40
    bar.update(7, "loss 3.1416")
    bar.update(19, "loss 2.7183")
    assert bar.bar.n == 19  # update takes the steps done so far, not an increment
    bar.close()
    shown = terminal.getvalue()
    assert "epoch 0" in shown and "loss 3.1416" in shown and "loss 2.7183" in shown and "19/40" in shown
    assert "ETA" not in shown  # tqdm shows its own time left; no plain lines


def test_a_terminal_without_tqdm_gets_lines(monkeypatch, clock):
    terminal = Terminal()
    monkeypatch.setattr(progress.sys, "stdout", terminal)
    find_spec = progress.importlib.util.find_spec
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda name: None if name == "tqdm" else find_spec(name))
    bar = Progress(8, "val")
    clock.now += 6.0
    bar.update(3, "acc 0.5")
    bar.close()
    assert terminal.getvalue() == "val [3/8] acc 0.5  ETA 0:10\n"
