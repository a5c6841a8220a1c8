"""rankkd.training.task: the task contract. A task lacking a member fails when it is made, naming the member; members
that disagree are refused by name; and a task that is not about images (a toy next-token task counting tokens, whose
best epoch has the lowest validation loss) trains, resumes and reports through the trainer unchanged."""
import json
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rankkd.distill import DistillConfig
from rankkd.distributed import DistEnv, all_reduce_sum
from rankkd.training import loop
from rankkd.training.config import Option, flat_settings, make_parser, resolve_config
from rankkd.training.loop import LossMeter, Run
from rankkd.training.task import Task, TaskData
from rankkd.training.trainer import main

VOCAB, LENGTH, IGNORE = 11, 12, -100
CPU = DistEnv(0, 0, 1, torch.device("cpu"))
RECIPES = {"toy": dict(
    student="toy", teacher=None, loss=DistillConfig(method="ce"), epochs=2, log_every=3, batch_size=8,
    optimizer="sgd", lr=0.5, lr_reference_batch=8, momentum=0.9, nesterov=False, weight_decay=0.0,
    decay_norm_and_bias=True, schedule="step", milestones=(), lr_decay=0.1, lr_warmup_epochs=0.0, warmup_lr=0.0,
    min_lr=0.0, compile_mode="default")}


class TokenBatches:
    """Fixed random sequences whose next token is (3 x token + 1) mod VOCAB, every fourth target left out."""

    def __init__(self, sequences, batch_size, seed):
        tokens = torch.randint(VOCAB, (sequences, LENGTH), generator=torch.Generator().manual_seed(seed))
        targets = (3 * tokens + 1) % VOCAB
        targets[:, ::4] = IGNORE
        self.batches = list(zip(tokens.split(batch_size), targets.split(batch_size)))

    def set_epoch(self, epoch):
        """Every epoch is the same."""

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class NextTokenLoss(nn.Module):
    def __init__(self, student):
        super().__init__()
        self.student = student

    def forward(self, inputs, targets, epoch):
        logits = self.student(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        return logits, {"ce": loss, "total": loss}


class ToyTask(Task):
    name = "toy"
    description = "Next-token prediction on random sequences: a task that is not about images."
    recipes = RECIPES
    own_options = (Option("data", "data", default="toy", group="run", help="only 'toy'"),)
    primary_metric = "val_loss"
    greater_is_better = False
    summary_metrics = (("loss", "val_loss", "teacher_val_loss"), ("accuracy", "val_accuracy", "teacher_accuracy"))
    unit = "tok"

    def recipe(self, args, name=None):
        return name or "toy", RECIPES[name or "toy"]

    def check(self, values, env):
        if values["data"] != "toy":
            raise ValueError(f"--data {values['data']!r}: the toy task has only 'toy'")

    def make_data(self, cfg, env):
        return TaskData(train=TokenBatches(64, cfg.optim.batch_size, cfg.job.seed),
                        val=TokenBatches(24, 16, cfg.job.seed + 1), num_classes=VOCAB, backend="memory")

    def build_student(self, cfg, num_classes):
        return nn.Sequential(nn.Embedding(num_classes, 16), nn.Linear(16, num_classes))

    def load_teacher(self, cfg, weights, num_classes):
        raise ValueError("the toy task trains without a teacher")

    def train_forward(self, student, teacher, cfg):
        return NextTokenLoss(student)

    def batch_units(self, inputs, targets):
        return (targets != IGNORE).sum()

    @torch.no_grad()
    def evaluate(self, student, teacher, loader, autocast, env, cfg):
        sums = torch.zeros(3, dtype=torch.float64)
        for inputs, targets in loader:
            logits, kept = student(inputs).flatten(0, 1), targets.flatten() != IGNORE
            sums[0] += F.cross_entropy(logits[kept], targets.flatten()[kept], reduction="sum")
            sums[1] += (logits[kept].argmax(-1) == targets.flatten()[kept]).sum()
            sums[2] += kept.sum()
        loss, correct, tokens = all_reduce_sum(sums).tolist()
        return {"val_loss": loss / tokens, "val_accuracy": 100 * correct / tokens, "teacher_val_loss": None,
                "teacher_accuracy": None}


TOY = ToyTask()
CONTRACT = {"name", "description", "recipes", "own_options", "primary_metric", "summary_metrics", "unit", "recipe",
            "check", "make_data", "build_student", "load_teacher", "train_forward", "batch_units", "evaluate"}


def test_every_member_the_trainer_needs_is_abstract():
    assert Task.__abstractmethods__ == CONTRACT


@pytest.mark.parametrize("member", sorted(CONTRACT))
def test_a_task_lacking_a_member_fails_when_made_naming_it(member):
    members = {key: value for key, value in vars(ToyTask).items() if not key.startswith("__")}
    del members[member]
    partial = type("PartialTask", (Task,), members)
    with pytest.raises(TypeError, match=rf"abstract class PartialTask\b.*\b{member}\b"):
        partial()


@pytest.mark.parametrize(("members", "message"), [
    ({"own_options": (Option("data", "data"), Option("seed", "job", type=int))},
     "task 'toy' declares options twice: seed"),
    ({"own_options": (Option("corpus", "data"),)}, "task 'toy' declares no option 'data' of section 'data'"),
    ({"own_options": (Option("data", "data"), Option("chunk", "loss", type=int))}, "options chunk name a section"),
    ({"primary_metric": "val_accuracy"}, "the first of summary_metrics must be the primary metric 'val_accuracy'"),
    ({"own_options": (Option("data", "data"), Option("sizes", "data", type=lambda text: text.split(",")))},
     "option --sizes: its converter <lambda> declares no return type"),
])
def test_members_that_disagree_are_refused_by_name(members, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        type("DisagreeingTask", (ToyTask,), members)()


def test_the_shared_settings_know_no_images_and_image_tasks_add_theirs():
    from rankkd.tasks.cifar100 import TASK as CIFAR
    from rankkd.tasks.coco import TASK as COCO
    from rankkd.tasks.imagenet import TASK as IMAGENET

    cfg = resolve_config(TOY, make_parser(TOY).parse_args(["--out", "unused"]), CPU)
    assert [part for part in vars(cfg) if part not in ("task", "recipe", "loss_recipe")] == [
        "job", "model", "data", "optim", "speed", "loss"]
    assert "channels_last" not in {option.name for option in TOY.options}
    for task in (IMAGENET, CIFAR, COCO):
        assert task.unit == "img" and "channels_last" in {option.name for option in task.options}
    assert {option.section for option in IMAGENET.options} >= {"augment"}


def test_a_recipe_lacking_a_setting_is_refused_naming_it():
    lacking = type("LackingTask", (ToyTask,), {"recipe": lambda self, args, name=None: (
        "toy", {key: value for key, value in RECIPES["toy"].items() if key not in ("lr", "momentum")})})()
    with pytest.raises(ValueError, match=r"^recipe 'toy' sets no --lr, --momentum: give them on the command line$"):
        resolve_config(lacking, make_parser(lacking).parse_args(["--out", "unused"]), CPU)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_throughput_counts_the_units_the_task_says_a_batch_holds(monkeypatch, capsys, tmp_path):
    # Steps of random loss terms and unit counts (ints and device tensors, as a task may give either) over a clock
    # that moves only between steps: the progress lines and the epoch's rate against sums in float64.
    clock = Clock()
    monkeypatch.setattr(loop.time, "perf_counter", clock)
    cfg = resolve_config(TOY, make_parser(TOY).parse_args(["--out", str(tmp_path), "--log-every", "3"]), CPU)
    run = Run(task=TOY, cfg=cfg, out=tmp_path, lock=None, resume_state=None,
              data=TOY.make_data(cfg, CPU), student=nn.Linear(1, 1), teacher=None)
    steps, rng = 8, random.Random()
    units = [rng.randrange(1, 10_000) for _ in range(steps)]
    seconds = [rng.uniform(0.01, 2.0) for _ in range(steps)]
    ce = torch.rand(steps, dtype=torch.float64) * 5
    meter = LossMeter(0, steps, run, CPU)
    for step in range(steps):
        clock.now += seconds[step]
        count = units[step] if step % 2 else torch.tensor(units[step])
        meter.add(step, {"ce": ce[step].float(), "total": ce[step].float()}, 0.1, count)
    stats = meter.close()
    intervals = [(0, 3), (3, 6), (6, 8)]  # log every 3 steps, and at the epoch's end
    rates = [sum(units[a:b]) / sum(seconds[a:b]) for a, b in intervals]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/2")]
    assert [re.search(r" ([\d,]+) tok/s", line).group(1) for line in lines] == [f"{rate:,.0f}" for rate in rates]
    # The first interval (compiling, warming up) is left out of the epoch's rate.
    assert stats["train_tok_s"] == pytest.approx(sum(units[3:]) / sum(seconds[3:]), rel=1e-6)
    assert stats["loss_ce"] == pytest.approx(ce.float().double().mean().item(), rel=1e-6)
    assert "train_img_s" not in stats


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_a_task_that_is_not_about_images_trains_resumes_and_reports_in_its_units(tmp_path, capsys):
    out = tmp_path / "run"
    main(TOY, ["--out", str(out), "--epochs", "1"])
    summary = main(TOY, ["--out", str(out), "--epochs", "3", "--resume", "auto"])
    printed = capsys.readouterr().out
    kept = records(out)
    assert [record["epoch"] for record in kept] == [1, 2, 3]
    assert all(record["train_tok_s"] > 0 and "train_img_s" not in record for record in kept)
    assert "tok/s" in printed and "img/s" not in printed and "data toy (memory)" in printed
    assert kept[-1]["val_loss"] < kept[0]["val_loss"]  # it learns
    lowest = min(kept, key=lambda record: record["val_loss"])
    assert summary["best"] == {"val_loss": lowest["val_loss"], "epoch": lowest["epoch"]}  # lower is better here
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == lowest["epoch"]
    config = json.loads((out / "config.json").read_text())
    assert list(config) == ["task", "recipe", "loss_recipe", "job", "model", "data", "optim", "speed", "loss"]
    assert "channels_last" not in flat_settings(config)


def test_accumulated_batches_take_the_step_of_their_union(tmp_path, capsys):
    """--grad-accum-steps 2 over batches of 4 is one SGD step per 8 sequences: the weights of batches of 8."""
    whole, accumulated = tmp_path / "whole", tmp_path / "accumulated"
    main(TOY, ["--out", str(whole), "--epochs", "1", "--batch-size", "8"])
    main(TOY, ["--out", str(accumulated), "--epochs", "1", "--batch-size", "4", "--grad-accum-steps", "2"])
    assert "batch 4 per process x 2 accumulated = 8 global" in capsys.readouterr().out
    expected = torch.load(whole / "last.pt", weights_only=True)["student"]
    got = torch.load(accumulated / "last.pt", weights_only=True)["student"]
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)
    assert json.loads((accumulated / "config.json").read_text())["optim"]["global_batch_size"] == 8
