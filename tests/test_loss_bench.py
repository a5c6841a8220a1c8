"""bench/loss_bench.py as a user meets it on a CPU machine: no word about CUDA, Ctrl-C one line, errors one line."""
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_loss_bench_is_quiet_about_cuda_on_the_cpu_and_ends_ctrl_c_in_one_line(tmp_path):
    # The first shape's line comes after torch.compile has set up its C++ toolchain (where the warning came from);
    # the second shape is large enough to be interrupted while it runs.
    bench = subprocess.Popen([sys.executable, str(REPO / "bench" / "loss_bench.py"), "--device", "cpu", "--shapes",
                              "8x10,32x1000", "--backends", "reference+compile", "--repeats", "50", "--json",
                              str(tmp_path / "results.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    for line in bench.stdout:
        if line.split()[:2] == ["8x10", "reference+compile"]:
            break
    bench.send_signal(signal.SIGINT)
    _, error = bench.communicate(timeout=120)
    assert bench.returncode == 130 and error == "loss_bench.py: interrupted; nothing saved\n", error
    assert not (tmp_path / "results.json").exists()


def test_loss_bench_option_errors_are_one_line(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("loss_bench", REPO / "bench" / "loss_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["loss_bench.py", "--repeats", "x"])
    with pytest.raises(SystemExit) as stopped:
        bench.main()
    assert stopped.value.code == 2
    assert capsys.readouterr() == ("", "loss_bench.py: error: argument --repeats: invalid int value: 'x' (--help lists "
                                       "the options)\n")
