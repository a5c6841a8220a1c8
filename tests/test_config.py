"""rankkd.training.config in-process: one frozen RunConfig from recipe + command line + device, its parts typed by
the options' declarations, every option checked by its own declaration, the method names shared by every trainer, and
what makes two runs the same experiment."""
import dataclasses
import json
import types
import typing

import pytest
import torch

from rankkd.training.config import (RunConfig, changed_settings, flat_settings, make_parser, record, resolve_config,
                                    settings_of_values)
from rankkd.distributed import DistEnv
from rankkd.tasks.cifar100 import TASK as CIFAR
from rankkd.tasks.imagenet import TASK as IMAGENET

CPU = DistEnv(0, 0, 1, torch.device("cpu"))


def resolve(task, *argv, env=CPU, recipe=None):
    return resolve_config(task, make_parser(task).parse_args([*argv, "--out", "unused"]), env, recipe)


def test_the_config_is_frozen_in_parts_and_recorded_whole():
    cfg = resolve(IMAGENET, "--lr", "0.3", "--batch-size", "32")
    assert isinstance(cfg, RunConfig) and cfg.task == "imagenet" and cfg.recipe == "demo"
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.augment.hflip, cfg.data.image_size) == (0.3, 32, False, 32)
    for part in (cfg, cfg.job, cfg.model, cfg.data, cfg.augment, cfg.optim, cfg.speed, cfg.loss):
        with pytest.raises(dataclasses.FrozenInstanceError):
            part.__setattr__("seed", 1)
    saved = json.loads(json.dumps(record(cfg)))
    assert list(saved) == ["task", "recipe", "loss_recipe", "job", "model", "data", "optim", "speed", "augment", "loss"]
    flat = flat_settings(saved)
    assert flat["lr"] == 0.3 and flat["rank_weight"] == 1.0 and flat["milestones"] == [30, 60, 90]
    # A record from before the settings had parts is already flat, and reads the same; so does one whose job part was
    # still called "run".
    assert flat_settings(flat) == flat
    earlier = {("run" if key == "job" else key): value for key, value in saved.items()}
    assert flat_settings(earlier) == flat


def _holds(value, kind):
    """isinstance for the field types of the settings: unions, tuple[X, ...], and an int where a float is declared."""
    if isinstance(kind, types.UnionType):
        return any(_holds(value, member) for member in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return isinstance(value, tuple) and all(_holds(item, typing.get_args(kind)[0]) for item in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


@pytest.mark.parametrize("argv", [[], ["--data", "synthetic"]])
def test_each_part_is_typed_by_its_options_and_holds_values_of_those_types(argv):
    from rankkd.tasks.coco import TASK as COCO

    for task in (IMAGENET, CIFAR, COCO):
        cfg = resolve(task, *argv)
        declared = {option.name: option for option in task.options}
        for part in dataclasses.fields(cfg):
            if part.name in ("task", "recipe", "loss_recipe", "loss"):
                continue
            for field in dataclasses.fields(getattr(cfg, part.name)):
                option = declared[field.name]
                assert option.section == part.name, (task.name, field.name)
                value = getattr(getattr(cfg, part.name), field.name)
                assert _holds(value, field.type), (task.name, field.name, field.type, value)
                assert (value is None) <= option.optional, (task.name, field.name)
    cfg, coco = resolve(IMAGENET), resolve(COCO)
    types_of = {field.name: field.type for part in (cfg.job, cfg.model, cfg.optim, cfg.speed, cfg.augment)
                for field in dataclasses.fields(part)}
    assert (types_of["seed"], types_of["lr"], types_of["nesterov"], types_of["milestones"]) == (
        int, float, bool, tuple[int | float, ...])
    assert (types_of["resume"], types_of["teacher"], types_of["channels_last"]) == (str | None, str | None, bool)
    assert {field.name: field.type for field in dataclasses.fields(coco.augment)} == {
        "train_sizes": tuple[int, ...], "hflip": bool}


def test_what_the_processes_and_device_decide():
    cfg = resolve(IMAGENET, "--global-batch-size", "256", "--lr", "0.1", "--lr-reference-batch", "64",
                  env=DistEnv(0, 0, 4, torch.device("cpu")))
    assert (cfg.optim.batch_size, cfg.optim.global_batch_size, cfg.job.world_size) == (64, 256, 4)
    assert cfg.optim.scaled_lr == pytest.approx(0.4)
    assert (cfg.speed.precision, cfg.speed.compile) == ("off", False)  # the CPU's defaults
    with pytest.raises(ValueError, match="--global-batch-size 100 does not split evenly over 3 processes"):
        resolve(IMAGENET, "--global-batch-size", "100", env=DistEnv(0, 0, 3, torch.device("cpu")))


@pytest.mark.parametrize(("argv", "message"), [
    (["--momentum", "5"], "--momentum must be >= 0 and < 1, got 5.0"),
    (["--seed", "99999999999999999999999"], "--seed must be >= 0 and < 4294967296, got 99999999999999999999999"),
    (["--seed", "-1"], "--seed must be >= 0 and < 4294967296, got -1"),
    (["--rank-k", "1e-300"], "--rank-k must be a finite number in [2^-126, 3.4e38]"),
    (["--rank-k", "0"], "--rank-k must be > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--milestones", "30,-1"], "--milestones takes epochs >= 0, got 30,-1"),
    (["--standardize", "--method", "dist+rank"], "--standardize applies to --method kd and dkd, not 'dist'"),
    (["--teacher", "none"], "needs a --teacher"),
])
def test_every_option_is_checked_by_name_before_any_work(argv, message):
    with pytest.raises(ValueError) as error:
        resolve(CIFAR, *argv)
    assert message in str(error.value)


def test_method_names_mean_the_same_in_every_trainer():
    # kd is knowledge distillation alone, kd+rank adds the ranking loss at gamma = alpha; --rank-weight overrides.
    for task in (IMAGENET, CIFAR):
        plain, ranked = resolve(task, "--method", "kd").loss, resolve(task, "--method", "kd+rank").loss
        assert (plain.method, plain.rank_weight) == ("kd", 0.0)
        assert (ranked.method, ranked.rank_weight) == ("kd", ranked.ce_weight)
        assert resolve(task, "--method", "kd", "--rank-weight", "0.3").loss.rank_weight == 0.3
    pair = ("--data", "synthetic", "--pair", "vgg13_vgg8")
    assert resolve(CIFAR, *pair, "--method", "dkd").loss.rank_weight == 0.0
    dkd = resolve(CIFAR, *pair, "--method", "dkd+rank").loss
    assert (dkd.method, dkd.dkd_beta, dkd.rank_weight) == ("dkd", 6.0, 1.0)
    assert resolve(CIFAR, *pair).loss.rank_weight == 0.1  # the default is the product: kd+rank, gamma = alpha 0.1


def test_changed_experiment_settings_are_named_and_speed_settings_are_not():
    cfg = resolve(CIFAR)
    saved = flat_settings(record(cfg))
    same = flat_settings(record(resolve(CIFAR, "--epochs", "20", "--log-every", "3", "--no-channels-last")))
    assert changed_settings(CIFAR, saved, same) == []  # length, logging and speed are not the experiment
    other = flat_settings(record(resolve(CIFAR, "--seed", "1", "--method", "dkd+rank", "--lr", "0.2")))
    assert changed_settings(CIFAR, saved, other) == ["--seed 0 -> 1", "--lr 0.1 -> 0.2", "--method kd -> dkd"]


def test_settings_before_freezing_equal_the_record():
    args = make_parser(CIFAR).parse_args(["--out", "unused", "--seed", "4"])
    cfg = resolve_config(CIFAR, args, CPU)
    values = flat_settings(record(cfg)) | {"loss": cfg.loss}
    assert settings_of_values(CIFAR, values) == {key: value for key, value in flat_settings(record(cfg)).items()
                                                 if key not in ("task", "recipe", "loss_recipe")}


# ---------------------------------------------------------------------------------------------------------------------
# The command line as a user meets it: errors in one line (the usage is --help's), each trainer offering its own
# methods and loss recipes.


@pytest.mark.parametrize("argv, problem", [(["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
                                           (["--bogus"], "unrecognized arguments: --bogus"),
                                           (["--method", "none"], "argument --method: invalid choice: 'none'")])
def test_command_line_errors_are_one_line(capsys, argv, problem):
    with pytest.raises(SystemExit) as stopped:
        make_parser(IMAGENET).parse_args(argv)
    out, error = capsys.readouterr()
    assert stopped.value.code == 2 and out == ""
    assert error.startswith(f"{make_parser(IMAGENET).prog}: error: {problem}") and error.count("\n") == 1, error
    assert error.endswith(" (--help lists the options)\n")


def test_each_trainers_help_offers_its_own_methods_and_loss_recipes(capsys, monkeypatch):
    from rankkd.recipes import LOSS_RECIPES
    from rankkd.tasks.coco import TASK as COCO

    monkeypatch.setenv("COLUMNS", "100000")  # --help unwrapped: argparse wraps lines at hyphens too
    offered = {}
    for task in (IMAGENET, CIFAR, COCO):
        with pytest.raises(SystemExit):
            make_parser(task).parse_args(["--help"])
        text = capsys.readouterr().out
        offered[task.name] = {name for name in LOSS_RECIPES if f" {name}," in text or f" {name}\n" in text}
        methods = f"--method {{{','.join(task.methods)}}}"
        assert methods in text
    assert all(name.startswith(("imagenet-", "deit-")) for name in offered["imagenet"])
    assert all(name.startswith("cifar100-") for name in offered["cifar100"])
    assert offered["coco"] == {"coco-kd", "coco-dkd", "coco-kd-rank", "coco-dkd-rank"}
    assert set(LOSS_RECIPES) == offered["imagenet"] | offered["cifar100"] | offered["coco"]
    assert COCO.methods == ("none", "kd", "kd+rank", "dkd", "dkd+rank") and "dist+rank" in IMAGENET.methods
    with pytest.raises(ValueError, match=r"^--loss 'imagenet-kd' is not a loss recipe of this trainer; known: "
                                         r"coco-kd, coco-dkd, coco-kd-rank, coco-dkd-rank$"):
        resolve(COCO, "--data", "synthetic", "--loss", "imagenet-kd")
