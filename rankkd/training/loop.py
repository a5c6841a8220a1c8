"""The epoch loop every task shares: set-up (models on the device, optimizer, a resumed state, DDP and compile), one
training epoch, evaluation through the task, metrics.jsonl and checkpoints after every epoch.

train_and_evaluate(run, env) takes a Run (what rankkd.training.trainer set up: settings, folder, data, models) and
returns the summary {"student", "best", "last", "out"}."""
import dataclasses
import json
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from rankkd.training.checkpoint import (copy_atomically, gather_rng_states, save_checkpoint, seed_everything,
                                        set_rng_state, write_atomically)
from rankkd.training.config import RunConfig, record
from rankkd.distributed import all_reduce_sum, average_buffers, barrier
from rankkd.training.optim import learning_rate, make_optimizer
from rankkd.training.progress import Progress, format_duration
from rankkd.training.run_folder import MetricsLog, RunLock, saved_progress, write_on_main
from rankkd.training.task import BatchMixer, Task, TaskData


@dataclass
class Run:
    """One run, ready to train: its task and frozen settings, folder (and its lock, on rank 0), the checkpoint it
    continues from (None: a fresh start), data, models and batch mixer (None: none)."""
    task: Task
    cfg: RunConfig
    out: Path
    lock: RunLock | None
    resume_state: dict | None
    data: TaskData
    student: torch.nn.Module
    teacher: torch.nn.Module | None  # None until a demo's cached teacher is loaded, or none at all
    mixer: BatchMixer | None = None
    changed_settings: list[str] = dataclasses.field(default_factory=list)  # experiment settings changed on resuming


@dataclass
class TrainingState:
    """What the epochs carry: the modules as they run (DDP-wrapped, compiled), optimizer, scaler, autocast and the
    progress so far (best: the primary metric's best and its epoch, 0 for none)."""
    student: torch.nn.Module
    train_forward: torch.nn.Module
    eval_student: torch.nn.Module
    eval_teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Callable[[], AbstractContextManager]
    epoch_tensor: torch.Tensor
    start_epoch: int
    best: dict
    last_record: dict


class NonFiniteLossError(RuntimeError):
    pass


def train_and_evaluate(run, env):
    """Train run.student for the configured epochs (continuing a resumed run), evaluating and checkpointing after
    every epoch; then give up the run's folder (run.lock). Returns the run's summary."""
    try:
        return _run_epochs(run, env)
    finally:
        if run.lock is not None:
            run.lock.release()


def _run_epochs(run, env):
    cfg, print0 = run.cfg, (print if env.is_main else (lambda *args, **kwargs: None))
    training = set_up_training(run, env)
    summary = {"student": training.student, "out": run.out}
    if training.start_epoch >= cfg.job.epochs:
        print0(f"{run.out} already holds all {training.start_epoch} epochs of this run: nothing to train (a larger "
               f"--epochs continues it)")
        return summary | {"best": training.best, "last": training.last_record}
    log = write_on_main(env, run.out, lambda: start_log(run, training))
    print0(run_header(run, env))
    run_start = time.perf_counter()
    for epoch in range(training.start_epoch, cfg.job.epochs):
        epoch_record = train_and_evaluate_epoch(epoch, run, env, training)
        if epoch == training.start_epoch and run.changed_settings:
            epoch_record["settings_changed"] = run.changed_settings  # where this run's settings changed
        metric = run.task.primary_metric
        is_best = improves(run.task, epoch_record[metric], training.best)
        if is_best:
            training.best = {metric: epoch_record[metric], "epoch": epoch + 1}
        training.last_record = epoch_record
        save_epoch(run, env, training, log, is_best)
        done = epoch + 1 - training.start_epoch
        eta = (time.perf_counter() - run_start) / done * (cfg.job.epochs - epoch - 1)
        print0(epoch_line(run, training, eta), flush=True)
    if log is not None:
        log.close()
    barrier()
    return summary | {"best": training.best, "last": training.last_record}


def set_up_training(run, env):
    """Models on the device (as the task lays them out), optimizer, scaler and autocast; the resumed state when there
    is one; the training forward wrapped by DDP and compiled."""
    cfg, device, task = run.cfg, env.device, run.task
    student = task.place_model(run.student, cfg, device)
    teacher = task.place_model(run.teacher, cfg, device) if run.teacher is not None else None
    optimizer = make_optimizer(student, cfg.optim, device)
    precision = cfg.speed.precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if run.resume_state is not None:
        start_epoch, best, last_record = restore(run, env, student, optimizer, scaler)
    else:
        start_epoch, best, last_record = 0, no_best(task), {}
        seed_everything(cfg.job.seed + env.rank)  # dropout / drop-path differ between ranks
    # The whole training forward (teacher, student, loss terms) is one module, wrapped by DDP and then compiled: the
    # pattern torch.compile supports for DDP, one graph per gradient bucket. DDP syncs only the student's gradients
    # (the teacher's parameters need none).
    train_forward = task.train_forward(student, teacher, cfg)
    if env.world_size > 1:
        train_forward = DistributedDataParallel(train_forward, gradient_as_bucket_view=True,
                                                device_ids=[env.local_rank] if device.type == "cuda" else None)
    eval_student, eval_teacher = student, teacher
    if cfg.speed.compile:
        compile_model = partial(task.compile, mode=cfg.speed.compile_mode)
        train_forward = compile_model(train_forward)
        eval_student = compile_model(student)
        eval_teacher = compile_model(teacher) if teacher is not None else None
    return TrainingState(
        student=student, train_forward=train_forward, eval_student=eval_student, eval_teacher=eval_teacher,
        optimizer=optimizer, scaler=scaler,
        autocast=partial(torch.autocast, device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                         enabled=precision != "off"),
        epoch_tensor=torch.zeros((), device=device), start_epoch=start_epoch, best=best, last_record=last_record)


def no_best(task):
    """The best before any epoch, or after best.pt was lost."""
    return {task.primary_metric: None, "epoch": 0}


def improves(task, value, best):
    """Whether `value` of the task's primary metric beats `best` (with no best yet, any number does; NaN never)."""
    if math.isnan(value):
        return False
    if not best["epoch"]:
        return True
    return value > best[task.primary_metric] if task.greater_is_better else value < best[task.primary_metric]


def restore(run, env, student, optimizer, scaler):
    """Continue from run.resume_state: weights, optimizer, scaler and every rank's random streams; returns the
    progress (epochs done, best, the last epoch's record)."""
    state = run.resume_state
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    start_epoch = state["epoch"]
    best = keep_best_honest(state["best"], start_epoch, run, env)
    if len(state["rng"]) == env.world_size:
        set_rng_state(state["rng"][env.rank])
    else:
        if env.is_main:
            print(f"resuming on {env.world_size} processes, saved on {len(state['rng'])}: random streams reseeded")
        seed_everything(run.cfg.job.seed + 1_000_003 * start_epoch + env.rank)
    if env.is_main and start_epoch < run.cfg.job.epochs:
        print(f"resuming {run.out} after epoch {start_epoch}")
    return start_epoch, best, state["last_record"]


def keep_best_honest(best, start_epoch, run, env):
    """The summary's "best" is the weights in best.pt: a run stopped between writing last.pt and best.pt (a full
    disk) gets best.pt back when the best epoch is the last one, else stops claiming a best until a new one. Returns
    the best to continue with."""
    best_file = run.out / "best.pt"
    if best["epoch"] == 0 or best_file.exists():
        return best
    if best["epoch"] == start_epoch:
        if env.is_main:
            copy_atomically(run.out / "last.pt", best_file)
        return best
    if env.is_main:
        print(f"{best_file} is missing: the best epoch ({best['epoch']}) is not kept; the best is chosen again from "
              "the epochs to come")
    return no_best(run.task)


def train_and_evaluate_epoch(epoch, run, env, training):
    """One epoch of training, then the task's evaluation; returns the epoch's record for metrics.jsonl."""
    epoch_start = time.perf_counter()
    training.train_forward.train()
    train_stats = train_epoch(epoch, run, env, training)
    average_buffers(training.student)
    training.eval_student.eval()
    val_stats = run.task.evaluate(training.eval_student, training.eval_teacher, run.data.val, training.autocast,
                                  env, run.cfg)
    return {"epoch": epoch + 1, **train_stats, **val_stats, "epoch_time_s": time.perf_counter() - epoch_start}


def save_epoch(run, env, training, log, is_best):
    """metrics.jsonl's line, then last.pt (and best.pt): the line first, since a resumed run drops lines past its
    checkpoint."""
    rng = gather_rng_states()  # a collective: every rank takes part

    def write():
        log.write(training.last_record)
        save_checkpoint({"student": training.student.state_dict(), "optimizer": training.optimizer.state_dict(),
                         "scaler": training.scaler.state_dict(), "epoch": training.last_record["epoch"],
                         "best": training.best, "last_record": training.last_record, "config": record(run.cfg),
                         "rng": rng}, run.out / "last.pt", keep_previous=True)
        if is_best:
            copy_atomically(run.out / "last.pt", run.out / "best.pt")

    write_on_main(env, run.out, write)


def start_log(run, training):
    """config.json (the run's settings, rewritten at each start) and the metrics log, opened to append."""
    settings = json.dumps(record(run.cfg), indent=2).encode()
    write_atomically(run.out / "config.json", lambda file: file.write(settings))
    return MetricsLog(run.out, resumed_epochs=training.start_epoch, resumed_record=training.last_record)


def train_epoch(epoch, run, env, training):
    """One pass over the training set. No host sync inside a step: loss terms stay on the device and are read, summed
    over ranks and checked for NaN/inf once every log_every steps. Returns the epoch's mean terms and throughput."""
    cfg, loader = run.cfg, run.data.train
    loader.set_epoch(epoch)
    if run.mixer is not None:
        run.mixer.set_epoch(epoch)
    # Batches past the last whole accumulation are left out, as loaders leave out a last partial batch.
    accumulation = cfg.optim.grad_accum_steps
    steps = len(loader) // accumulation * accumulation
    meter = LossMeter(epoch, steps, run, env)
    optim = cfg.optim
    lr_at = partial(learning_rate, schedule=optim.schedule, lr=optim.scaled_lr, epochs=cfg.job.epochs,
                    warmup_epochs=optim.lr_warmup_epochs, warmup_lr=optim.warmup_lr, milestones=optim.milestones,
                    decay=optim.lr_decay, min_lr=optim.min_lr)
    # The DKD warm-up reads the epoch, counted from 1 as mdistiller does, from a device tensor: changing it neither
    # recompiles the compiled step nor syncs.
    training.epoch_tensor.fill_(epoch + 1)
    replays_cuda_graphs = cfg.speed.compile and cfg.speed.compile_mode == "reduce-overhead"
    lr = lr_at(epoch)
    for step, (inputs, targets) in zip(range(steps), loader):
        if replays_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be overwritten from here on
        lr = lr_at(epoch + step / steps)
        for group in training.optimizer.param_groups:
            group["lr"] = lr
        units = run.task.batch_units(inputs, targets)
        if run.mixer is not None:  # the teacher sees the same mixed inputs
            inputs, targets = run.mixer(inputs, targets)
        with training.autocast():
            _, terms = training.train_forward(inputs, targets, training.epoch_tensor)
        # Accumulated batches sum their gradients at 1/accumulation each: one step over their mean. (DDP reduces the
        # gradients at every backward; skipping that with no_sync would save communication, not change the result.)
        training.scaler.scale(terms["total"] / accumulation).backward()
        if (step + 1) % accumulation == 0:
            training.scaler.step(training.optimizer)
            training.scaler.update()
            training.optimizer.zero_grad(set_to_none=True)
        meter.add(step, terms, lr, units)
    return {"lr": lr, **meter.close()}


class LossMeter:
    """The loss terms of an epoch's steps and the units (task.unit) of their batches: kept on the device, read once
    every log_every steps (the one host sync), checked for NaN/inf, shown as progress and averaged over the epoch (the
    terms over ranks, the units summed); the throughput leaves out the first interval (compiling and warming up)."""

    def __init__(self, epoch, steps, run, env):
        self.epoch, self.steps, self.out, self.env, self.unit = epoch, steps, run.out, env, run.task.unit
        self.log_every = run.cfg.job.log_every
        self.progress = Progress(steps, f"epoch {epoch + 1}/{run.cfg.job.epochs}", enabled=env.is_main)
        self.pending, self.sums, self.names = [], None, None
        self.interval_start = time.perf_counter()
        self.timed_units, self.timed_seconds = 0.0, 0.0

    def add(self, step, terms, lr, units):
        """Step `step`'s loss terms (0-dim tensors, "total" among them) and the units of its batch on this rank (an
        int, or a 0-dim tensor)."""
        self.names = self.names or list(terms)
        values = [term.detach().float() for term in terms.values()]
        if not torch.is_tensor(units):  # filled in on the device: a copy from the host would wait for the device
            units = torch.full((), float(units), device=values[0].device)
        self.pending.append(torch.stack([*values, units.detach().float()]))
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
            self._read(step, lr)

    def _read(self, step, lr):
        summed = all_reduce_sum(torch.stack(self.pending)).cpu().double()
        interval, units = summed[:, :-1] / self.env.world_size, float(summed[:, -1].sum())
        bad_rows = (~interval.isfinite().all(dim=1)).nonzero()
        if len(bad_rows):
            bad = step + 1 - len(self.pending) + int(bad_rows[0])  # 0-based step within the epoch
            values = ", ".join(f"{name} {value:.4g}" for name, value in zip(self.names, interval[bad_rows[0, 0]]))
            raise NonFiniteLossError(
                f"non-finite loss at step {self.epoch * self.steps + bad + 1} (epoch {self.epoch + 1}, step "
                f"{bad + 1} of {self.steps}): {values}. Stopped without saving: {saved_progress(self.out)}")
        self.sums = interval.sum(0) if self.sums is None else self.sums + interval.sum(0)
        seconds = time.perf_counter() - self.interval_start
        if step + 1 > self.log_every or step + 1 == self.steps:
            self.timed_units += units
            self.timed_seconds += seconds
        mean = dict(zip(self.names, interval.mean(0).tolist()))
        terms = " ".join(f"{name} {value:.3f}" for name, value in mean.items() if name != "total")
        self.progress.update(step + 1, f"loss {mean['total']:.4f}{f' ({terms})' if terms else ''} lr {lr:.3g} "
                                       f"{units / seconds:,.0f} {self.unit}/s")
        self.pending.clear()
        self.interval_start = time.perf_counter()

    def close(self):
        self.progress.close()
        means = {f"loss_{name}": float(value) for name, value in zip(self.names, self.sums / self.steps)}
        return {**means, f"train_{self.unit}_s": self.timed_units / self.timed_seconds}


# ----------------------------------------------------------------------------------------------------------------------
# What the run prints.


def run_header(run, env):
    cfg, optim, speed = run.cfg, run.cfg.optim, run.cfg.speed
    rank = f" + {cfg.loss.rank_weight:g} x rank" if cfg.loss.rank_weight else ""
    return (f"{cfg.model.student} <- {cfg.model.teacher or 'no teacher'} | loss {cfg.loss.method}{rank} | "
            f"{env.world_size} process(es) on {env.device.type}, batch {optim.batch_size} per process"
            f"{f' x {optim.grad_accum_steps} accumulated' if optim.grad_accum_steps > 1 else ''} = "
            f"{optim.global_batch_size} global | lr {optim.scaled_lr:.4g} (= {optim.lr:g} x "
            f"{optim.global_batch_size}/{optim.lr_reference_batch}) | precision {speed.precision}, compile "
            f"{speed.compile_mode if speed.compile else 'off'} | data {cfg.data.data} ({run.data.backend}) | out "
            f"{run.out}")


def metric_text(value):
    """A metric as the run prints it: two decimals, "-" where there is nothing to measure (no teacher to agree with)."""
    return "-" if value is None else f"{value:.2f}"


def epoch_line(run, training, eta):
    cfg, last, best = run.cfg, training.last_record, training.best
    label, key, _ = run.task.summary_metrics[0]
    metrics = " ".join(f"{name} {metric_text(last[student])}" for name, student, _ in run.task.summary_metrics)
    tau = f", tau {last['val_tau']:.3f}" if last.get("val_tau") is not None else ""
    best_text = f"best {label} {best[key]:.2f} (epoch {best['epoch']})" if best["epoch"] else "no best yet"
    unit = run.task.unit
    return (f"epoch {last['epoch']}/{cfg.job.epochs}: loss {last['loss_total']:.4f}, val {metrics}{tau}, "
            f"{last[f'train_{unit}_s']:,.0f} {unit}/s, {last['epoch_time_s']:.1f}s; {best_text}"
            f"{f', ETA {format_duration(eta)}' if eta else ''}")
