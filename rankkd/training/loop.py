"""The epoch loop every task shares: set-up (models on the device, optimizer, a resumed state, DDP and compile), one
training epoch, evaluation through the task, metrics.jsonl and checkpoints after every epoch.

train_and_evaluate(run, env) takes a Run (what rankkd.training.run made: settings, folder, loaders, models) and
returns the summary {"student", "best", "last", "out"}."""
import dataclasses
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from rankkd.training.checkpoint import (copy_atomically, gather_rng_states, save_checkpoint, seed_everything,
                                        set_rng_state, write_atomically)
from rankkd.training.config import record
from rankkd.distributed import all_reduce_sum, average_buffers, barrier
from rankkd.training.optim import learning_rate, make_optimizer
from rankkd.training.progress import Progress, format_duration
from rankkd.training.run_folder import MetricsLog, saved_progress, write_on_main


@dataclass
class Run:
    """One run, ready to train: its task and frozen settings, folder (and its lock on rank 0), the checkpoint it
    continues from (None: a fresh start), loaders, models and batch mixer (None: none)."""
    task: object
    cfg: object
    out: Path
    lock: object
    resume_state: dict | None
    loaders: object
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    mixer: object = None
    changed_settings: list = dataclasses.field(default_factory=list)  # experiment settings changed on resuming


@dataclass
class Training:
    """The state the epochs carry: the modules as they run (DDP-wrapped, compiled), optimizer, scaler, autocast and
    the progress so far."""
    student: torch.nn.Module
    train_forward: torch.nn.Module
    eval_student: torch.nn.Module
    eval_teacher: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: object
    epoch_tensor: torch.Tensor
    start_epoch: int = 0
    best: dict | None = None
    last_record: dict | None = None


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
    if training.start_epoch >= cfg.run.epochs:
        print0(f"{run.out} already holds all {training.start_epoch} epochs of this run: nothing to train (a larger "
               f"--epochs continues it)")
        return summary | {"best": training.best, "last": training.last_record}
    log = write_on_main(env, run.out, lambda: start_log(run, training))
    print0(run_header(run, env))
    run_start = time.perf_counter()
    for epoch in range(training.start_epoch, cfg.run.epochs):
        epoch_record = train_and_evaluate_epoch(epoch, run, env, training)
        if epoch == training.start_epoch and run.changed_settings:
            epoch_record["settings_changed"] = run.changed_settings  # where this run's settings changed
        metric = run.task.primary_metric
        is_best = epoch_record[metric] > training.best[metric]
        if is_best:
            training.best = {metric: epoch_record[metric], "epoch": epoch + 1}
        training.last_record = epoch_record
        save_epoch(run, env, training, log, is_best)
        done = epoch + 1 - training.start_epoch
        eta = (time.perf_counter() - run_start) / done * (cfg.run.epochs - epoch - 1)
        print0(epoch_line(run, training, eta), flush=True)
    if log is not None:
        log.close()
    barrier()
    return summary | {"best": training.best, "last": training.last_record}


def set_up_training(run, env):
    """Models on the device, optimizer, scaler and autocast; the resumed state when there is one; the training
    forward wrapped by DDP and compiled."""
    cfg, device = run.cfg, env.device
    memory_format = torch.channels_last if cfg.speed.channels_last else torch.contiguous_format
    student = run.student.to(device, memory_format=memory_format)
    teacher = run.teacher.to(device, memory_format=memory_format) if run.teacher is not None else None
    precision = cfg.speed.precision
    training = Training(
        student=student, train_forward=None, eval_student=student, eval_teacher=teacher,
        optimizer=make_optimizer(student, cfg.optim, device),
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        autocast=partial(torch.autocast, device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                         enabled=precision != "off"),
        epoch_tensor=torch.zeros((), device=device), best={run.task.primary_metric: -1.0, "epoch": 0},
        last_record={})
    if run.resume_state is not None:
        restore(training, run, env)
    else:
        seed_everything(cfg.run.seed + env.rank)  # dropout / drop-path differ between ranks
    # The whole training forward (teacher, student, loss terms) is one module, wrapped by DDP and then compiled: the
    # pattern torch.compile supports for DDP, one graph per gradient bucket. DDP syncs only the student's gradients
    # (the teacher's parameters need none).
    train_forward = run.task.train_forward(student, teacher, cfg)
    if env.world_size > 1:
        train_forward = DistributedDataParallel(train_forward, gradient_as_bucket_view=True,
                                                device_ids=[env.local_rank] if device.type == "cuda" else None)
    training.train_forward = train_forward
    if cfg.speed.compile:
        compile_model = partial(run.task.compile, mode=cfg.speed.compile_mode)
        training.train_forward = compile_model(train_forward)
        training.eval_student = compile_model(student)
        training.eval_teacher = compile_model(teacher) if teacher is not None else None
    return training


def restore(training, run, env):
    """Continue from run.resume_state: weights, optimizer, scaler, progress and every rank's random streams."""
    state = run.resume_state
    training.student.load_state_dict(state["student"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scaler.load_state_dict(state["scaler"])
    training.start_epoch, training.best, training.last_record = state["epoch"], state["best"], state["last_record"]
    keep_best_honest(training, run, env)
    if len(state["rng"]) == env.world_size:
        set_rng_state(state["rng"][env.rank])
    else:
        if env.is_main:
            print(f"resuming on {env.world_size} processes, saved on {len(state['rng'])}: random streams reseeded")
        seed_everything(run.cfg.run.seed + 1_000_003 * training.start_epoch + env.rank)
    if env.is_main and training.start_epoch < run.cfg.run.epochs:
        print(f"resuming {run.out} after epoch {training.start_epoch}")


def keep_best_honest(training, run, env):
    """The summary's "best" is the weights in best.pt: a run stopped between writing last.pt and best.pt (a full
    disk) gets best.pt back when the best epoch is the last one, else stops claiming a best until a new one."""
    best_file = run.out / "best.pt"
    if training.best["epoch"] == 0 or best_file.exists():
        return
    if training.best["epoch"] == training.start_epoch:
        if env.is_main:
            copy_atomically(run.out / "last.pt", best_file)
        return
    if env.is_main:
        print(f"{best_file} is missing: the best epoch ({training.best['epoch']}) is not kept; the best is chosen "
              "again from the epochs to come")
    training.best = {run.task.primary_metric: -1.0, "epoch": 0}


def train_and_evaluate_epoch(epoch, run, env, training):
    """One epoch of training, then the task's evaluation; returns the epoch's record for metrics.jsonl."""
    epoch_start = time.perf_counter()
    training.train_forward.train()
    train_stats = train_epoch(epoch, run, env, training)
    average_buffers(training.student)
    training.eval_student.eval()
    val_stats = run.task.evaluate(training.eval_student, training.eval_teacher, run.loaders.val, training.autocast,
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
    over ranks and checked for NaN/inf once every log_every steps. Returns the epoch's mean terms and img/s."""
    cfg, loader = run.cfg, run.loaders.train
    loader.set_epoch(epoch)
    if run.mixer is not None:
        run.mixer.set_epoch(epoch)
    steps = len(loader)
    meter = LossMeter(epoch, steps, run, env)
    optim = cfg.optim
    lr_at = partial(learning_rate, schedule=optim.schedule, lr=optim.scaled_lr, epochs=cfg.run.epochs,
                    warmup_epochs=optim.lr_warmup_epochs, warmup_lr=optim.warmup_lr, milestones=optim.milestones,
                    decay=optim.lr_decay, min_lr=optim.min_lr)
    # The DKD warm-up reads the epoch, counted from 1 as mdistiller does, from a device tensor: changing it neither
    # recompiles the compiled step nor syncs.
    training.epoch_tensor.fill_(epoch + 1)
    replays_cuda_graphs = cfg.speed.compile and cfg.speed.compile_mode == "reduce-overhead"
    lr = lr_at(epoch)
    for step, (inputs, targets) in enumerate(loader):
        if replays_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be overwritten from here on
        lr = lr_at(epoch + step / steps)
        for group in training.optimizer.param_groups:
            group["lr"] = lr
        if run.mixer is not None:  # mixup / cutmix / label smoothing: the teacher sees the same mixed images
            inputs, targets = run.mixer(inputs, targets)
        with training.autocast():
            _, terms = training.train_forward(inputs, targets, training.epoch_tensor)
        training.scaler.scale(terms["total"]).backward()
        training.scaler.step(training.optimizer)
        training.scaler.update()
        training.optimizer.zero_grad(set_to_none=True)
        meter.add(step, terms, lr)
    return {"lr": lr, **meter.close()}


class LossMeter:
    """The loss terms of an epoch's steps: kept on the device, read once every log_every steps (the one host sync),
    checked for NaN/inf, shown as progress and averaged over the epoch; img/s without the first interval (compiling
    and warming up)."""

    def __init__(self, epoch, steps, run, env):
        self.epoch, self.steps, self.out, self.env = epoch, steps, run.out, env
        self.log_every, self.global_batch = run.cfg.run.log_every, run.cfg.optim.global_batch_size
        self.progress = Progress(steps, f"epoch {epoch + 1}/{run.cfg.run.epochs}", enabled=env.is_main)
        self.pending, self.sums, self.names = [], None, None
        self.interval_start = time.perf_counter()
        self.timed_images, self.timed_seconds = 0, 0.0

    def add(self, step, terms, lr):
        self.names = self.names or list(terms)
        self.pending.append(torch.stack([term.detach().float() for term in terms.values()]))
        if (step + 1) % self.log_every == 0 or step + 1 == self.steps:
            self._read(step, lr)

    def _read(self, step, lr):
        interval = all_reduce_sum(torch.stack(self.pending)).cpu().double() / self.env.world_size
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
            self.timed_images += len(self.pending) * self.global_batch
            self.timed_seconds += seconds
        mean = interval.mean(0)
        terms_text = " ".join(f"{name} {value:.3f}" for name, value in zip(self.names[:-1], mean[:-1]))
        self.progress.update(step + 1, f"loss {mean[-1]:.4f} ({terms_text}) lr {lr:.3g} "
                                       f"{len(self.pending) * self.global_batch / seconds:,.0f} img/s")
        self.pending.clear()
        self.interval_start = time.perf_counter()

    def close(self):
        self.progress.close()
        means = {f"loss_{name}": float(value) for name, value in zip(self.names, self.sums / self.steps)}
        return {**means, "train_img_s": self.timed_images / self.timed_seconds}


# ----------------------------------------------------------------------------------------------------------------------
# What the run prints.


def run_header(run, env):
    cfg, optim, speed = run.cfg, run.cfg.optim, run.cfg.speed
    rank = f" + {cfg.loss.rank_weight:g} x rank" if cfg.loss.rank_weight else ""
    return (f"{cfg.model.student} <- {cfg.model.teacher or 'no teacher'} | loss {cfg.loss.method}{rank} | "
            f"{env.world_size} process(es) on {env.device.type}, batch {optim.batch_size} per process = "
            f"{optim.global_batch_size} global | lr {optim.scaled_lr:.4g} (= {optim.lr:g} x "
            f"{optim.global_batch_size}/{optim.lr_reference_batch}) | precision {speed.precision}, compile "
            f"{speed.compile_mode if speed.compile else 'off'} | data {cfg.data.data} ({run.loaders.train.backend}) "
            f"| out {run.out}")


def epoch_line(run, training, eta):
    cfg, last, best = run.cfg, training.last_record, training.best
    label, key, _ = run.task.summary_metrics[0]
    metrics = " ".join(f"{name} {last[student]:.2f}" for name, student, _ in run.task.summary_metrics)
    tau = f", tau {last['val_tau']:.3f}" if last.get("val_tau") is not None else ""
    best_text = f"best {label} {best[key]:.2f} (epoch {best['epoch']})" if best["epoch"] else "no best yet"
    return (f"epoch {last['epoch']}/{cfg.run.epochs}: loss {last['loss_total']:.4f}, val {metrics}{tau}, "
            f"{last['train_img_s']:,.0f} img/s, {last['epoch_time_s']:.1f}s; {best_text}"
            f"{f', ETA {format_duration(eta)}' if eta else ''}")
