"""A demo's teacher: trained by the same run skeleton with the task's "demo-teacher" recipe on first use, cached by
every setting of its training, and reused by every later run that needs it."""
import dataclasses
import hashlib
import json

from rankkd.training.checkpoint import copy_atomically
from rankkd.training.config import TEACHER_RUN_INHERITS, flat_settings, make_parser, record, resolve_config
from rankkd.data.demo import default_cache_dir
from rankkd.distributed import barrier
from rankkd.training.run_folder import RunLock


def teacher_config(task, cfg, env):
    """The settings of the demo teacher's training for a run with settings `cfg`: the task's demo-teacher recipe,
    on the same device, precision, compile and loader settings, in its cache folder."""
    settings = flat_settings(record(cfg))
    argv = ["--data", "demo", "--student", cfg.model.teacher]
    for option in task.options:
        value = settings.get(option.name)
        if option.name in TEACHER_RUN_INHERITS and value is not None:
            argv += ([option.option if value else f"--no-{option.option[2:]}"] if option.type is bool
                     else [option.option, str(value)])
    resolved = resolve_config(task, make_parser(task).parse_args([*argv, "--out", "."]), env, "demo-teacher")
    return _with_folder(resolved, teacher_cache_folder(resolved), resume="auto")


def _with_folder(cfg, out, resume):
    return dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, out=str(out), resume=resume))


def teacher_cache_folder(teacher_cfg):
    """Where the teacher trained with `teacher_cfg` is cached: a hash of every setting of that training but its output
    folder, the number of processes included."""
    settings = {key: value for key, value in flat_settings(record(teacher_cfg)).items() if key not in ("out", "resume")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return default_cache_dir() / "teachers" / f"{teacher_cfg.model.student}-{key}"


def cached_teacher(task, cfg, env, train):
    """Path of the weights of the demo teacher that the run with settings `cfg` needs, trained on first use under
    $RANKKD_CACHE (default ~/.cache/rankkd) by train(task, teacher_cfg, env) and reused by every later run with the
    same settings. A second run that needs it while the first trains it waits for it (a lock on the cache entry)
    instead of training it again."""
    teacher_cfg = teacher_config(task, cfg, env)
    folder = teacher_cache_folder(teacher_cfg)
    weights = folder / "teacher.pt"
    lock = RunLock(folder, wait=True, what="teacher cache", name=".cache-lock") if env.is_main else None
    if lock is not None:
        lock.acquire()
    try:
        barrier()  # every rank checks the cache once rank 0 holds the entry
        if not weights.exists():
            if env.is_main:
                print(f"training the teacher {teacher_cfg.model.student} first (cached in {folder} for later runs)",
                      flush=True)
            train(task, teacher_cfg, env)
            if env.is_main:
                copy_atomically(folder / "last.pt", weights)
        barrier()
    finally:
        if lock is not None:
            lock.release()
    return weights
