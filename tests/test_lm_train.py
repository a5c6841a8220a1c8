"""The LM task (train/lm.py) run as users run it, at tiny settings: distillation with the fused loss through the
run skeleton, a teacher's top-K dumped once and trained from, kill and resume, two gloo processes, bad input refused
before anything is written, and the demo end to end on a reduced corpus."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from rankkd.lm import models as lm_zoo  # noqa: E402
from rankkd.lm import text  # noqa: E402
from rankkd.tasks import lm  # noqa: E402
from rankkd.training.trainer import main as train_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = ("tau", "rank", "order", "teacher", "student", "token", "logit", "pair", "loss", "model", "data", "step")


def _document(generator, words):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (words,), generator=generator)) + "."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of .txt documents and a .jsonl file, and a small byte-level BPE tokenizer trained on them."""
    root = tmp_path_factory.mktemp("lm-corpus")
    generator = torch.Generator().manual_seed(0)
    (root / "docs").mkdir()
    for i in range(24):
        (root / "docs" / f"{i:02d}.txt").write_text(_document(generator, 40 + 7 * i))
    with open(root / "more.jsonl", "w") as file:
        for i in range(16):
            file.write(json.dumps({"text": _document(generator, 30 + 5 * i)}) + "\n")
    tokenizer_folder = root / "tokenizer"
    text.train_demo_tokenizer(text.read_documents([root / "docs", root / "more.jsonl"]), tokenizer_folder,
                              vocab_size=300)
    return root


# Zoo models with untrained weights, 16-token sequences, 4 a step: seconds per run.
def tiny(corpus, *extra):
    return ["--data", f"{corpus / 'docs'},{corpus / 'more.jsonl'}", "--tokenizer", str(corpus / "tokenizer"),
            "--teacher", "llama-tiny", "--teacher-weights", "random", "--student", "gpt-demo-student",
            "--seq-len", "16", "--batch-size", "4", "--topk", "8", "--val-fraction", "0.2", "--log-every", "5",
            "--lr", "3e-3", *extra]


@pytest.fixture
def run_lm(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKKD_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield lambda *argv: lm.main(list(argv))
    torch.set_num_threads(threads)


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_distillation_records_perplexity_agreement_and_tau(corpus, run_lm, tmp_path):
    out = tmp_path / "run"
    summary = run_lm(*tiny(corpus, "--epochs", "2", "--method", "kd+rank", "--out", str(out)))
    first, second = records(out)
    for record in (first, second):
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]), rel=1e-12)
        assert 0 <= record["val_agreement"] <= 100 and -1 <= record["val_tau"] <= 1
        assert record["teacher_ppl"] > 1 and record["train_tok_s"] > 0
    assert second["teacher_ppl"] == first["teacher_ppl"]  # frozen
    best = min((first, second), key=lambda record: record["val_ppl"])
    assert summary["best"] == {"val_ppl": best["val_ppl"], "epoch": best["epoch"]}  # lower is better
    settings = json.loads((out / "config.json").read_text())
    assert settings["lm"]["topk"] == 8 and settings["loss"]["rank_weight"] == 1.0


def test_offline_top_k_trains_as_the_online_teacher_does(corpus, run_lm, tmp_path):
    dump = tmp_path / "dump"
    run_lm(*tiny(corpus, "--dump-teacher-topk", str(dump)))
    manifest = json.loads((dump / "train" / "manifest.json").read_text())
    assert manifest["k"] == 8 and manifest["seq_len"] == 16 and manifest["teacher"] == "llama-tiny"
    online, offline = tmp_path / "online", tmp_path / "offline"
    run_lm(*tiny(corpus, "--epochs", "1", "--deterministic", "--out", str(online)))
    run_lm(*tiny(corpus, "--epochs", "1", "--deterministic", "--teacher-topk", str(dump), "--out", str(offline)))
    (expected,), (got,) = records(online), records(offline)
    # The dump holds the teacher's logits in float16, and an epoch of AdamW steps carries their rounding on (up to
    # about 1 % in the epoch's mean loss here); a dump of another teacher or misaligned with the sequences is far off.
    # The first step's equality, to 1e-5 with float32 logits, is tests/test_lm_distill.py's.
    for key in ("loss_total", "val_loss"):
        assert got[key] == pytest.approx(expected[key], rel=3e-2), key
    assert got["val_tau"] == pytest.approx(expected["val_tau"], abs=0.05)
    assert got["val_agreement"] == pytest.approx(expected["val_agreement"], abs=2.0)
    assert got["teacher_ppl"] is None  # the teacher was never loaded

    with pytest.raises(SystemExit) as stopped:  # a dump of another K serves no run with --topk 6
        run_lm(*tiny(corpus, "--epochs", "1", "--topk", "6", "--teacher-topk", str(dump), "--out",
                     str(tmp_path / "other")))
    assert stopped.value.code == 2 and not (tmp_path / "other").exists()


def test_killed_run_resumes_bit_exactly(corpus, run_lm, tmp_path):
    args = tiny(corpus, "--epochs", "2", "--deterministic")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_lm(*args, "--out", str(whole))
    process = subprocess.Popen([sys.executable, str(REPO / "train" / "lm.py"), *args, "--out", str(killed)],
                               env={**os.environ, "RANKKD_CACHE": str(tmp_path / "cache")},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (killed / "last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] < 2
    run_lm(*args, "--out", str(killed), "--resume", "auto")
    expected = torch.load(whole / "last.pt", weights_only=True)["student"]
    got = torch.load(killed / "last.pt", weights_only=True)["student"]
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert [r["val_ppl"] for r in records(whole)] == [r["val_ppl"] for r in records(killed)]


def test_two_gloo_processes(corpus, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "train" / "lm.py"), *tiny(corpus, "--epochs", "1", "--batch-size", "2", "--out", str(out))]
    result = subprocess.run(command, env={**os.environ, "RANKKD_CACHE": str(tmp_path / "cache"),
                                          "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) on cpu, batch 2 per process = 4 global" in result.stdout
    assert [record["epoch"] for record in records(out)] == [1]


def _refusal(run_lm, capsys, argv, out):
    with pytest.raises(SystemExit) as stopped:
        run_lm(*argv, "--out", str(out))
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(error.splitlines()) == 1 and "Traceback" not in error, error
    assert not out.exists()
    return error


@pytest.mark.parametrize("damage, message", [
    ("no files", "no .txt or .jsonl"),
    ("empty file", "empty"),
    ("undecodable", "UTF-8"),
    ("too long", "--seq-len 4096 is beyond"),
    ("missing path", "no such file or folder"),
])
def test_bad_input_is_refused_before_anything_is_written(corpus, run_lm, capsys, tmp_path, damage, message):
    argv = tiny(corpus)
    data = tmp_path / "data"
    data.mkdir()
    if damage == "empty file":
        (data / "a.txt").write_text("   \n")
    elif damage == "undecodable":
        (data / "a.txt").write_bytes(b"caf\xe9 au lait")
    if damage in ("no files", "empty file", "undecodable"):
        argv[1] = str(data)
    elif damage == "too long":
        argv += ["--seq-len", "4096"]
    else:
        argv[1] = str(tmp_path / "nowhere.txt")
    assert message in _refusal(run_lm, capsys, argv, tmp_path / "run")


def test_models_of_another_vocabulary_are_refused(corpus, run_lm, capsys, tmp_path):
    for name, vocab in (("student", 300), ("teacher", 301)):
        lm_zoo.load_causal_lm("gpt-demo-student", vocab_size=vocab).save_pretrained(tmp_path / name)
    capsys.readouterr()  # save_pretrained's progress bar
    argv = tiny(corpus) + ["--student", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher")]
    error = _refusal(run_lm, capsys, argv, tmp_path / "run")
    assert "vocabulary of 300 tokens" in error and "301" in error


def test_the_demo_runs_end_to_end(monkeypatch, tmp_path):
    """python train/lm.py on a reduced corpus: the tokenizer trained, the teacher trained and cached, the student
    distilled from it with kd+rank; a second run reuses the cache."""
    monkeypatch.setenv("RANKKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lm, "DEMO_CORPUS_BYTES", 40_000)
    reduced = {"seq_len": 32, "batch_size": 8, "epochs": 1, "topk": 8}
    for recipe in ("demo", "demo-teacher"):
        monkeypatch.setitem(lm.RECIPES, recipe, lm.RECIPES[recipe] | reduced)
    summary = train_main(lm.TASK, ["--out", str(tmp_path / "run")])
    record = summary["last"]
    assert record["val_tau"] is not None and record["teacher_ppl"] < 8192 and record["val_ppl"] < 8192
    assert (tmp_path / "cache" / "lm-demo-tokenizer" / "tokenizer.json").exists()
    assert len(list((tmp_path / "cache" / "teachers").glob("gpt-demo-teacher-*/teacher.pt"))) == 1
