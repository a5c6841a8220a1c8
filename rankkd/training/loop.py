"""The epoch loop both trainers share: optimizer, training step, evaluation, checkpoints, metrics and the summary.

A trainer (train/imagenet.py, train/cifar100.py) resolves its settings (rankkd.training.config), builds its data
loaders and models, and calls fit(run, env) with run = SimpleNamespace(cfg, out, resume_state, loaders, teacher,
student); fit trains, evaluates after every epoch, writes metrics.jsonl and checkpoints, and returns the summary."""
import contextlib
import hashlib
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from rankkd.distill import Distiller
from rankkd.training.config import record
from rankkd.training.data.demo import default_cache_dir
from rankkd.training.data.folder import EXCLUDE_HINT, BadImageError
from rankkd.training.metrics import kendall_tau, topk_correct
from rankkd.training.utils import (MetricsLog, Progress, RunLock, all_reduce_sum, average_buffers, barrier,
                                   broadcast_object, cleanup_distributed, copy_atomically, format_duration,
                                   gather_rng_states, init_distributed, learning_rate, load_checkpoint,
                                   save_checkpoint, seed_everything, set_rng_state)


def resolve_for_device(cfg, env):
    """Settings that depend on the processes and the device: batch sizes, scaled lr, precision, compile."""
    if cfg.global_batch_size is not None:
        if cfg.global_batch_size % env.world_size:
            raise ValueError(f"--global-batch-size {cfg.global_batch_size} does not split evenly over "
                             f"{env.world_size} processes")
        cfg.batch_size = cfg.global_batch_size // env.world_size
    cfg.global_batch_size = cfg.batch_size * env.world_size
    cfg.world_size = env.world_size
    cfg.scaled_lr = cfg.lr * cfg.global_batch_size / cfg.lr_reference_batch
    on_cuda = env.device.type == "cuda"
    if cfg.precision == "auto":
        cfg.precision = "bf16" if on_cuda else "off"
    if cfg.compile is None:
        cfg.compile = on_cuda
    if cfg.compile_mode == "reduce-overhead" and env.world_size > 1:
        # CUDA graphs and DDP's gradient hooks do not mix: several processes compile without graphs.
        cfg.compile_mode = "default"


def output_folder(cfg, env):
    """The run's folder, its lock (rank 0; None elsewhere) and the checkpoint to continue from (None: a fresh start).
    Never overwrites a run silently, and never shares its folder: a second run on it stops at once."""
    if cfg.out is None:
        data_name = cfg.data if cfg.data in ("demo", "synthetic") else Path(cfg.data).name
        prefix = f"runs/{data_name}-{cfg.student}-{cfg.loss.method}{'-rank' if cfg.loss.rank_weight else ''}"
        earlier = sorted(Path().glob(f"{prefix}-*/last.pt")) if cfg.resume else []
        # Decided on rank 0 and broadcast, so that every process agrees on one date-time.
        cfg.out = broadcast_object(str(earlier[-1].parent) if earlier else f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = RunLock(cfg.out, what="--out").acquire() if env.is_main else None  # before anything is written there
    last = Path(cfg.out) / "last.pt"
    if not last.exists():
        return Path(cfg.out), lock, None
    if not cfg.resume:
        raise ValueError(f"{cfg.out} already holds a run (last.pt): continue it with --resume auto, or pick another "
                         "--out")
    state = load_checkpoint(last)
    if state["config"]["student"] != cfg.student:
        raise ValueError(f"{last} holds a {state['config']['student']} student, not --student {cfg.student}")
    changed = [f"{key} {state['config'][key]} -> {value}" for key, value in record(cfg).items()
               if key in state["config"] and state["config"][key] != value and key not in ("resume", "out")]
    if changed and env.is_main:
        print(f"resuming with changed settings: {', '.join(changed)}")
    return Path(cfg.out), lock, state


class NonFiniteLossError(RuntimeError):
    pass


def saved_progress(out):
    """What a run that stops now leaves behind, in one sentence."""
    last = Path(out) / "last.pt"
    if not last.exists():
        return "no checkpoint had been written yet."
    return f"{last} holds epoch {load_checkpoint(last)['epoch']}, the last completed one."


def make_optimizer(student, cfg, device):
    decay, no_decay = [], []
    # timm ViTs name the embeddings that DeiT keeps out of weight decay (position embedding, class token).
    no_decay_names = set(student.no_weight_decay()) if hasattr(student, "no_weight_decay") else set()
    for name, parameter in student.named_parameters():
        skip = not cfg.decay_norm_and_bias and (parameter.ndim <= 1 or name in no_decay_names)
        (no_decay if skip else decay).append(parameter)
    groups = [{"params": params, "weight_decay": wd}
              for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if params]
    fused = device.type == "cuda"  # one kernel for the whole update, and no host sync under a GradScaler
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.scaled_lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.scaled_lr, fused=fused)


def train_one_epoch(epoch, run, env, forward, optimizer, scaler, autocast, epoch_tensor):
    """One pass over the training set. No host sync inside a step: loss terms stay on the device and are read, summed
    over ranks and checked for NaN/inf once every log_every steps. Returns the epoch's mean terms and img/s."""
    cfg, loader = run.cfg, run.loaders.train
    loader.set_epoch(epoch)
    if run.mixer is not None:
        run.mixer.set_epoch(epoch)
    steps = len(loader)
    progress = Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=env.is_main)
    lr_at = partial(learning_rate, schedule=cfg.schedule, lr=cfg.scaled_lr, epochs=cfg.epochs,
                    warmup_epochs=cfg.lr_warmup_epochs, warmup_lr=cfg.warmup_lr, milestones=cfg.milestones,
                    decay=cfg.lr_decay, min_lr=cfg.min_lr)
    # The DKD warm-up reads the epoch, counted from 1 as mdistiller does, from a device tensor: changing it neither
    # recompiles the compiled step nor syncs.
    epoch_tensor.fill_(epoch + 1)
    pending, sums, names = [], None, None
    interval_start = time.perf_counter()
    timed_images, timed_seconds, lr = 0, 0.0, lr_at(epoch)
    replays_cuda_graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    for step, (images, labels) in enumerate(loader):
        if replays_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be overwritten from here on
        lr = lr_at(epoch + step / steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if run.mixer is not None:  # mixup / cutmix / label smoothing: the teacher sees the same mixed images
            images, labels = run.mixer(images, labels)
        with autocast():
            _, terms = forward(images, labels, epoch_tensor)
        scaler.scale(terms["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        names = names or list(terms)
        pending.append(torch.stack([term.detach().float() for term in terms.values()]))

        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            interval = all_reduce_sum(torch.stack(pending)).cpu().double() / env.world_size  # the one host sync
            bad_rows = (~interval.isfinite().all(dim=1)).nonzero()
            if len(bad_rows):
                bad = step + 1 - len(pending) + int(bad_rows[0])  # 0-based step within the epoch
                values = ", ".join(f"{name} {value:.4g}" for name, value in zip(names, interval[bad_rows[0, 0]]))
                raise NonFiniteLossError(
                    f"non-finite loss at step {epoch * steps + bad + 1} (epoch {epoch + 1}, step {bad + 1} of {steps}):"
                    f" {values}. Stopped without saving: {saved_progress(run.out)}")
            sums = interval.sum(0) if sums is None else sums + interval.sum(0)
            seconds = time.perf_counter() - interval_start
            images_per_second = len(pending) * cfg.global_batch_size / seconds
            if step + 1 > cfg.log_every or step + 1 == steps:  # the first interval holds compilation and warm-up
                timed_images += len(pending) * cfg.global_batch_size
                timed_seconds += seconds
            mean = interval.mean(0)
            terms_text = " ".join(f"{name} {value:.3f}" for name, value in zip(names[:-1], mean[:-1]))
            progress.update(step + 1, f"loss {mean[-1]:.4f} ({terms_text}) lr {lr:.3g} "
                                      f"{images_per_second:,.0f} img/s")
            pending.clear()
            interval_start = time.perf_counter()
    progress.close()
    means = {f"loss_{name}": float(value) for name, value in zip(names, sums / steps)}
    return {"lr": lr, **means, "train_img_s": timed_images / timed_seconds}


@torch.no_grad()
def evaluate(student, teacher, loader, autocast, env, replays_cuda_graphs=False):
    """Top-1 / top-5 (%) of student and teacher over the whole validation set, and the mean Kendall tau-b between
    their logits. Sums stay per rank until one all-reduce at the end (ranks may run different batch counts)."""
    sums = torch.zeros(7, dtype=torch.float64, device=env.device)
    for images, labels in loader:
        if replays_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each batch replays the graphs anew; its logits are used up
        with autocast():
            student_logits = student(images)
            teacher_logits = teacher(images) if teacher is not None else None
        sums[0] += labels.numel()
        sums[1:3] += topk_correct(student_logits, labels)
        if teacher_logits is not None:
            sums[3:5] += topk_correct(teacher_logits, labels)
            tau = kendall_tau(student_logits, teacher_logits)
            sums[5] += tau.nansum()
            sums[6] += tau.isfinite().sum()
    images, top1, top5, teacher_top1, teacher_top5, tau_sum, tau_rows = all_reduce_sum(sums).tolist()
    has_teacher = teacher is not None
    return {"val_top1": 100 * top1 / images, "val_top5": 100 * top5 / images,
            "val_tau": tau_sum / tau_rows if has_teacher and tau_rows else None,
            "teacher_top1": 100 * teacher_top1 / images if has_teacher else None,
            "teacher_top5": 100 * teacher_top5 / images if has_teacher else None}


def fit(run, env):
    """Train run.student for the configured epochs (continuing a resumed run), evaluating and checkpointing after
    every epoch; then give up the run's folder (run.lock). run.mixer, when not None, turns each training batch into
    (mixed images, soft targets). Returns the run's summary."""
    try:
        return _train_epochs(run, env)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train_epochs(run, env):
    cfg, device = run.cfg, env.device
    print0 = print if env.is_main else (lambda *args, **kwargs: None)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    student = run.student.to(device, memory_format=memory_format)
    teacher = run.teacher.to(device, memory_format=memory_format) if run.teacher is not None else None
    optimizer = make_optimizer(student, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    autocast = partial(torch.autocast, device.type, dtype=torch.float16 if cfg.precision == "fp16" else torch.bfloat16,
                       enabled=cfg.precision != "off")
    start_epoch, best = 0, {"val_top1": -1.0, "epoch": 0}
    last_record = {}
    if run.resume_state is not None:
        state = run.resume_state
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, last_record = state["epoch"], state["best"], state["last_record"]
        if len(state["rng"]) == env.world_size:
            set_rng_state(state["rng"][env.rank])
        else:
            print0(f"resuming on {env.world_size} processes, saved on {len(state['rng'])}: random streams reseeded")
            seed_everything(cfg.seed + 1_000_003 * start_epoch + env.rank)
        if start_epoch >= cfg.epochs:
            print0(f"{run.out} already holds all {start_epoch} epochs of this run: nothing to train (a larger "
                   f"--epochs continues it)")
            return {"student": student, "best": best, "last": last_record, "out": run.out}
        print0(f"resuming {run.out} after epoch {start_epoch}")
    else:
        seed_everything(cfg.seed + env.rank)  # dropout / drop-path differ between ranks

    # The whole training forward (teacher, student, loss terms) is one module, wrapped by DDP and then compiled: the
    # pattern torch.compile supports for DDP, one graph per gradient bucket. DDP syncs only the student's gradients
    # (the teacher's parameters need none).
    train_forward = Distiller(student, teacher if cfg.loss.uses_teacher else None, cfg.loss)
    if env.world_size > 1:
        train_forward = DistributedDataParallel(train_forward, gradient_as_bucket_view=True,
                                                device_ids=[env.local_rank] if device.type == "cuda" else None)
    eval_student, eval_teacher = student, teacher
    if cfg.compile:
        compile_model = partial(torch.compile, mode=cfg.compile_mode)
        train_forward = compile_model(train_forward)
        eval_student = compile_model(student)
        eval_teacher = compile_model(teacher) if teacher is not None else None
    epoch_tensor = torch.zeros((), device=device)

    log = None
    if env.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(record(cfg), indent=2) + "\n")
        log = MetricsLog(run.out, resumed_epochs=start_epoch)
    print0(f"{cfg.student} <- {cfg.teacher or 'no teacher'} | loss {cfg.loss.method}"
           f"{f' + {cfg.loss.rank_weight:g} x rank' if cfg.loss.rank_weight else ''} | {env.world_size} process(es) on "
           f"{device.type}, batch {cfg.batch_size} per process = {cfg.global_batch_size} global | "
           f"lr {cfg.scaled_lr:.4g} (= {cfg.lr:g} x {cfg.global_batch_size}/{cfg.lr_reference_batch}) | "
           f"precision {cfg.precision}, compile {cfg.compile_mode if cfg.compile else 'off'} | "
           f"data {cfg.data} ({run.loaders.train.backend}) | out {run.out}")

    run_start = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        train_forward.train()
        train_stats = train_one_epoch(epoch, run, env, train_forward, optimizer, scaler, autocast, epoch_tensor)
        average_buffers(student)
        eval_student.eval()
        val_stats = evaluate(eval_student, eval_teacher, run.loaders.val, autocast, env,
                             replays_cuda_graphs=cfg.compile and cfg.compile_mode == "reduce-overhead")
        last_record = {"epoch": epoch + 1, **train_stats, **val_stats,
                       "epoch_time_s": time.perf_counter() - epoch_start}
        is_best = val_stats["val_top1"] > best["val_top1"]
        if is_best:
            best = {"val_top1": val_stats["val_top1"], "epoch": epoch + 1}
        rng = gather_rng_states()  # a collective: every rank takes part
        if env.is_main:
            log.write(last_record)  # before the checkpoint: a resumed run drops lines past its checkpoint
            save_checkpoint({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "epoch": epoch + 1, "best": best,
                             "last_record": last_record, "config": record(cfg), "rng": rng},
                            run.out / "last.pt")
            if is_best:
                copy_atomically(run.out / "last.pt", run.out / "best.pt")
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - run_start) / done * (cfg.epochs - epoch - 1)
        tau = last_record["val_tau"]
        print0(f"epoch {epoch + 1}/{cfg.epochs}: loss {train_stats['loss_total']:.4f}, val top-1 "
               f"{val_stats['val_top1']:.2f} top-5 {val_stats['val_top5']:.2f}"
               f"{f', tau {tau:.3f}' if tau is not None else ''}, {train_stats['train_img_s']:,.0f} img/s, "
               f"{last_record['epoch_time_s']:.1f}s; best top-1 {best['val_top1']:.2f} (epoch {best['epoch']})"
               f"{f', ETA {format_duration(eta)}' if eta else ''}", flush=True)
    if log is not None:
        log.close()
    barrier()
    return {"student": student, "best": best, "last": last_record, "out": run.out}


# ----------------------------------------------------------------------------------------------------------------------
# A teacher trained by this loop (the demos'), cached by every setting of its training.


def teacher_cache_folder(teacher_cfg):
    """Where the teacher trained with `teacher_cfg` (resolved for the device) is cached: a hash of every setting of
    that training but its output folder, the number of processes included."""
    settings = {key: value for key, value in record(teacher_cfg).items() if key not in ("out", "resume")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir() / "teachers" / f"{teacher_cfg.student}-{key}"


def cached_teacher(teacher_cfg, env, prepare_run):
    """Path of the weights of a teacher trained by fit() with `teacher_cfg` (its `student` is the teacher), trained
    on first use under $RANKKD_CACHE (default ~/.cache/rankkd) and reused by every later run with the same settings:
    the cache key covers every setting of that training, the number of processes included. prepare_run(cfg, env)
    builds the run as the trainer does. A second run that needs the same teacher while the first trains it waits for
    it (a lock on the cache entry) instead of training it again."""
    resolve_for_device(teacher_cfg, env)
    folder = teacher_cache_folder(teacher_cfg)
    weights = folder / "teacher.pt"
    teacher_cfg.out, teacher_cfg.resume = str(folder), "auto"
    with RunLock(folder, wait=True, what="teacher cache") if env.is_main else contextlib.nullcontext():
        barrier()  # every rank checks the cache once rank 0 holds the entry
        if not weights.exists():
            if env.is_main:
                print(f"training the teacher {teacher_cfg.student} first (cached in {folder} for later runs)",
                      flush=True)
            fit(prepare_run(teacher_cfg, env), env)
            if env.is_main:
                copy_atomically(folder / "last.pt", weights)
        barrier()
    return weights


# ----------------------------------------------------------------------------------------------------------------------
# The end of a run: a clean exit with a message, and the results table.


def configure_torch(cfg):
    """Process-wide torch settings of a run: deterministic kernels when asked, else cuDNN autotuning; TF32 matmuls."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def run_trainer(script, args, make_config, prepare_run, load_demo_teacher):
    """A trainer's main() after parsing `args`: every check of the settings before any work (make_config(args),
    prepare_run(cfg, env)); a bad one ends the run with one line and exit status 2. Then the demo's teacher when
    run.teacher is still None (load_demo_teacher(run, env) gives it), fit() and the results table; what a run can meet
    on the way (a diverging loss, an unreadable training image) ends it with one line and exit status 1. Returns the
    summary."""
    try:
        env = init_distributed(args.device)
        cfg = make_config(args)
        configure_torch(cfg)
        run = prepare_run(cfg, env)
    except (ValueError, FileNotFoundError, ImportError, BadImageError) as error:
        stop(f"{script}: error: {error}", 2)
    try:
        if cfg.teacher is not None and run.teacher is None:
            run.teacher = load_demo_teacher(run, env)
        summary = fit(run, env)
    except NonFiniteLossError as error:
        stop(f"{script}: error: {error}", 1)
    except BadImageError as error:  # met in the training set, mid-epoch
        stop(f"{script}: error: {error}. Stopped: {saved_progress(run.out)} {EXCLUDE_HINT}, then continue with "
             "--resume auto.", 1)
    cleanup_distributed()
    if env.is_main:
        print_summary(cfg, summary)
    return summary


def stop(message, exit_code):
    """Print `message` (rank 0 only) and leave with `exit_code`, closing the process group first."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    cleanup_distributed()
    sys.exit(exit_code)


def print_summary(cfg, summary):
    best, last = summary["best"], summary["last"]
    rows = [("model", "role", "top-1", "top-5")]
    if last.get("teacher_top1") is not None:
        rows.append((cfg.teacher, "teacher", f"{last['teacher_top1']:.2f}", f"{last['teacher_top5']:.2f}"))
    loss = f"{cfg.loss.method}{' + rank' if cfg.loss.rank_weight else ''}"
    rows.append((cfg.student, f"student ({loss}), last", f"{last['val_top1']:.2f}", f"{last['val_top5']:.2f}"))
    rows.append(("", f"student, best (epoch {best['epoch']})", f"{best['val_top1']:.2f}", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    print(f"\nvalidation results ({summary['out']}):")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))))
    if last.get("val_tau") is not None:
        print(f"  mean Kendall tau-b, student vs teacher logits: {last['val_tau']:.3f}")
