"""The trainer every task shares: main(task, argv) is a whole training command.

    settings   parse the command line, resolve and freeze the RunConfig (rankkd.training.config)
    set-up     distributed processes, data, run folder and lock, the checkpoint to resume, teacher and student
    training   the demo's teacher when needed (cached), then the epochs (rankkd.training.loop)
    end        the summary table; one line and an exit status for anything that stops a run

A setting that cannot work stops the run before any work with one line and exit status 2; what a run can meet on
the way (a diverging loss, a damaged training file) stops it with one line and exit status 1."""
import os
import sys

import torch

from rankkd.training.checkpoint import seed_everything
from rankkd.training.config import check_loss_fits, make_parser, resolve_config
from rankkd.distributed import cleanup_distributed, init_distributed
from rankkd.training.loop import NonFiniteLossError, Run, metric_text, train_and_evaluate
from rankkd.training.run_folder import DiskFullError, open_run_folder, saved_progress
from rankkd.training.teacher_cache import cached_teacher


def main(task, argv=None):
    """Run `task` (a rankkd.training.task.Task) on `argv` (default: the command line); returns the run's summary."""
    args = make_parser(task).parse_args(argv)
    script = f"{task.name}.py"
    data_errors = tuple(task.data_errors)
    try:
        env = init_distributed(args.device)
        cfg = resolve_config(task, args, env)
        configure_torch(cfg)
        run = prepare_run(task, cfg, env)
    except (ValueError, FileNotFoundError, ImportError, *data_errors) as error:
        stop(f"{script}: error: {error}", 2)
    except KeyboardInterrupt:
        stop(f"{script}: interrupted before training started; nothing to continue from.", 130)
    try:
        if task.runs_teacher(cfg) and run.teacher is None:
            weights = cached_teacher(task, cfg, env, train)
            run.teacher = task.load_teacher(cfg, weights, run.data.num_classes)
        summary = train_and_evaluate(run, env)
    except (NonFiniteLossError, DiskFullError) as error:
        stop(f"{script}: error: {error}", 1)
    except KeyboardInterrupt:
        stop(f"{script}: interrupted: {saved_progress(cfg.job.out)} Continue with the same command and --out "
             f"{cfg.job.out} --resume auto.", 130)
    except data_errors as error:  # met in the training set, mid-epoch
        hint = next(hint for kind, hint in task.data_errors.items() if isinstance(error, kind))
        stop(f"{script}: error: {error}. Stopped: {saved_progress(run.out)} {hint}, then continue with --resume "
             "auto.", 1)
    cleanup_distributed()
    if env.is_main:
        print_summary(task, cfg, summary)
    return summary


def train(task, cfg, env):
    """Set up and train one run with frozen settings `cfg` (the demo teacher's training goes this way)."""
    return train_and_evaluate(prepare_run(task, cfg, env), env)


def prepare_run(task, cfg, env):
    """Data, teacher, run folder (locked once the data and the teacher passed their checks), checkpoint to resume and
    student. Raises ValueError (or FileNotFoundError for a missing data folder) on anything wrong with the settings,
    before anything is written to the run folder."""
    data = task.make_data(cfg, env)
    if len(data.train) < cfg.optim.grad_accum_steps:
        raise ValueError(f"--grad-accum-steps {cfg.optim.grad_accum_steps} is more than the {len(data.train)} "
                         "batches of an epoch on each process")
    check_loss_fits(cfg.loss, data.num_classes, env.device)
    mixer = task.make_mixer(cfg, env, data)
    teacher = None
    if task.runs_teacher(cfg) and cfg.model.teacher_weights is not None:
        seed_everything(cfg.job.seed)  # a "random" teacher is the same one on every rank and in every run
        teacher = task.load_teacher(cfg, cfg.model.teacher_weights, data.num_classes)
    # The same initial weights on every rank (DDP would broadcast rank 0's anyway), whether or not a teacher was built
    seed_everything(cfg.job.seed)
    student = task.build_student(cfg, data.num_classes)
    out, lock, resume_state, changed = open_run_folder(task, cfg, env)
    return Run(task=task, cfg=cfg, out=out, lock=lock, resume_state=resume_state, data=data, student=student,
               teacher=teacher, mixer=mixer, changed_settings=changed)


def configure_torch(cfg):
    """Process-wide torch settings of a run: deterministic kernels when asked, else cuDNN autotuning; TF32 matmuls."""
    if cfg.job.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.job.deterministic
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def stop(message, exit_code):
    """Print `message` (rank 0 only) and leave with `exit_code`, closing the process group first."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)
    cleanup_distributed()
    sys.exit(exit_code)


def print_summary(task, cfg, summary):
    """The results table: teacher, last student and best student, in the task's summary metrics."""
    best, last = summary["best"], summary["last"]
    columns = task.summary_metrics
    rows = [("model", "role", *(label for label, _, _ in columns))]
    if last.get(columns[0][2]) is not None:
        rows.append((cfg.model.teacher, "teacher", *(metric_text(last[teacher]) for _, _, teacher in columns)))
    loss = f"{cfg.loss.method}{' + rank' if cfg.loss.rank_weight else ''}"
    rows.append((cfg.model.student, f"student ({loss}), last",
                 *(metric_text(last[student]) for _, student, _ in columns)))
    if best["epoch"]:  # 0: best.pt was lost and no epoch since replaced it (rankkd.training.loop.keep_best_honest)
        rows.append(("", f"student, best (epoch {best['epoch']})", f"{best[task.primary_metric]:.2f}",
                     *([""] * (len(columns) - 1))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\nvalidation results ({summary['out']}):")
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))))
    if last.get("val_tau") is not None:
        print(f"  mean Kendall tau-b, student vs teacher logits: {last['val_tau']:.3f}")
