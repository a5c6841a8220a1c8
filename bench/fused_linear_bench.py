"""Time and peak memory of rankkd.fused_linear_distill_loss against plain PyTorch, forward + backward.

    python bench/fused_linear_bench.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                       [--shapes 2048x32000x512,8192x32768x512] [--top-k 128] [--chunk-size 1024]
                                       [--repeats N] [--impls fused,plain] [--json PATH]

Shapes are tokens x vocabulary x hidden size. Both implementations compute the same loss (CE + KD over the teacher's
top-K + the ranking loss, weights 1, T = 1, k = 1, a tenth of the targets ignored) and the gradients of the hidden
states and the LM head's weight:
  fused  rankkd.fused_linear_distill_loss (chunks of --chunk-size positions);
  plain  the full (tokens x V) logits, log_softmax, gather, and rankkd.kendall_rank_loss on the gathered (tokens x K)
         logits, through autograd;
  liger  with liger-kernel installed, its fused linear JSD loss (CE + JSD against the teacher's full distribution:
         it takes the teacher's hidden states and head instead of a top-K), for scale.
Each (shape, implementation) runs in a fresh child process, so no allocation of one can hide in another's peak.
Peak memory is the most in use during one forward + backward above what was in use before it: on CUDA
torch.cuda.max_memory_allocated; on the CPU the process's peak resident set (VmHWM after resetting it through
/proc/self/clear_refs, as bench/loss_bench.py measures). Times are the median of --repeats runs after a warm-up:
wall-clock, and the process's CPU time (all its threads), which a machine shared with other work inflates less.
Results (with machine, versions and date) go to bench/results/.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rankkd  # noqa: E402
from loss_bench import _read_kib, _version, cpu_model  # noqa: E402
from rankkd.ops import _resolve_backend  # noqa: E402
from rankkd.training.config import OneLineParser  # noqa: E402

DEFAULT_SHAPES = "2048x32000x512,8192x32768x512,4096x128256x1024"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
IMPLS = ("fused", "plain", "liger")
# Float32 (tokens x V) tensors plain PyTorch holds at its peak (logits, log-softmax, their gradients), measured at
# 2048x32000x512 and rounded up; used only to skip shapes that cannot fit.
PLAIN_LOGIT_COPIES = 5


def parse_shapes(text):
    try:
        shapes = [tuple(int(d) for d in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"--shapes: expected tokens x vocabulary x hidden, like 2048x32000x512, got {text!r}")
    if not shapes or any(len(shape) != 3 or min(shape) < 1 for shape in shapes):
        raise SystemExit(f"--shapes: each shape is tokens x vocabulary x hidden, got {text!r}")
    return shapes


def make_inputs(tokens, vocab, dim, top_k, dtype, device):
    """The student's hidden states and head, targets (a tenth ignored) and the top-K of a random teacher head."""
    generator = torch.Generator(device).manual_seed(0)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=generator, device=device)).to(dtype)

    hidden = draw(tokens, dim).requires_grad_()
    weight = draw(vocab, dim, scale=2 / dim**0.5).requires_grad_()  # logits with a spread of about 2
    target = torch.randint(vocab, (tokens,), generator=generator, device=device)
    target[: tokens // 10] = -100
    teacher_hidden, teacher_weight = draw(tokens, dim), draw(vocab, dim, scale=2 / dim**0.5)
    teacher_ids, teacher_logits = rankkd.teacher_topk(teacher_hidden, teacher_weight, top_k)
    return hidden, weight, target, teacher_ids, teacher_logits, teacher_hidden, teacher_weight


def plain_loss(hidden, weight, target, teacher_ids, teacher_logits):
    logits = (hidden @ weight.T).float()
    log_probs = logits.log_softmax(-1)
    counted = target != -100
    ce = F.nll_loss(log_probs, target, ignore_index=-100, reduction="none")
    teacher_log_probs = teacher_logits.float().log_softmax(-1)
    kd = (teacher_log_probs.exp() * (teacher_log_probs - log_probs.gather(-1, teacher_ids))).sum(-1)
    rank = rankkd.kendall_rank_loss(logits.gather(-1, teacher_ids), teacher_logits.float(), reduction="none")
    return ((ce + kd + rank) * counted).sum() / counted.sum().clamp(min=1)


def liger_loss_fn():
    import inspect

    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5)
    takes_bias = "student_bias" in inspect.signature(loss_fn.forward).parameters
    return lambda hidden, weight, target, teacher_hidden, teacher_weight: loss_fn(
        student_input=hidden, student_weight=weight, teacher_input=teacher_hidden, teacher_weight=teacher_weight,
        true_labels=target, **({"student_bias": None, "teacher_bias": None} if takes_bias else {}))


def run_child(impl, shape, top_k, chunk_size, dtype, device, repeats):
    """One implementation at one shape in this process: {"ms", "cpu_ms", "peak_extra_mib", "loss"}."""
    hidden, weight, target, teacher_ids, teacher_logits, teacher_hidden, teacher_weight = make_inputs(
        *shape, top_k, dtype, device)
    if impl == "fused":
        step = lambda: rankkd.fused_linear_distill_loss(  # noqa: E731
            hidden, weight, target, teacher_ids=teacher_ids, teacher_logits=teacher_logits, chunk_size=chunk_size)
    elif impl == "plain":
        step = lambda: plain_loss(hidden, weight, target, teacher_ids, teacher_logits)  # noqa: E731
    else:
        liger = liger_loss_fn()
        step = lambda: liger(hidden, weight, target, teacher_hidden, teacher_weight)  # noqa: E731
    if impl != "liger":
        del teacher_hidden, teacher_weight

    def forward_backward():
        hidden.grad = weight.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets the peak resident set (Linux >= 4.0)
                clear_refs.write("5")
            base = _read_kib("/proc/self/status", "VmRSS") * 1024
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = _read_kib("/proc/self/status", "VmHWM") * 1024 - base
        return ((time.perf_counter() - start) * 1e3, (time.process_time() - cpu_start) * 1e3, max(peak, 0) / 2**20,
                loss.item())

    forward_backward()  # warm-up
    runs = [forward_backward() for _ in range(repeats)]
    return {"ms": statistics.median(run[0] for run in runs), "cpu_ms": statistics.median(run[1] for run in runs),
            "peak_extra_mib": max(run[2] for run in runs), "loss": runs[0][3]}


def estimated_mib(impl, shape, chunk_size, dtype):
    tokens, vocab, dim = shape
    head = 3 * vocab * dim * dtype.itemsize  # weight, its gradient, the teacher's head
    rows = tokens if impl != "fused" else min(tokens, chunk_size)
    return (head + PLAIN_LOGIT_COPIES * rows * vocab * 4) / 2**20


def available_mib(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**20
    return _read_kib("/proc/meminfo", "MemAvailable") / 1024


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated (default {DEFAULT_SHAPES})")
    parser.add_argument("--top-k", type=int, default=128, help="the teacher's K (default 128, verl's default)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 10 CUDA, 2 CPU)")
    parser.add_argument("--impls", default="fused,plain,liger",
                        help="comma-separated subset of fused, plain, liger (default all; liger when installed)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: bench/results/<auto>.json)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = getattr(torch, args.dtype)
    shapes = parse_shapes(args.shapes)
    repeats = args.repeats or (10 if device.type == "cuda" else 2)
    if args.child:
        print(json.dumps(run_child(args.child, shapes[0], args.top_k, args.chunk_size, dtype, device, repeats)))
        return
    impls = args.impls.split(",")
    if set(impls) - set(IMPLS):
        raise SystemExit(f"--impls: choose from {IMPLS}, got {args.impls!r}")
    if "liger" in impls:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            print("liger-kernel is not installed: its fused linear JSD is left out")
            impls.remove("liger")

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_model()}, {torch.get_num_threads()} threads")
    print(f"{device_name}, torch {torch.__version__}, {args.dtype}, top-K {args.top_k}, chunk {args.chunk_size}, "
          f"forward+backward, median of {repeats}")
    print(f"{'shape':>18} {'impl':>6} {'ms':>10} {'CPU ms':>10} {'peak MiB':>10} {'loss':>10}")
    load_before = os.getloadavg()[0]  # the machine may be shared: its load is recorded with the times
    results = []
    for shape in shapes:
        rows = []
        for impl in impls:
            need = estimated_mib(impl, shape, args.chunk_size, dtype)
            if need > 0.8 * available_mib(device):
                reason = f"needs ~{need:.0f} MiB, {available_mib(device):.0f} MiB available"
                print(f"{'x'.join(map(str, shape)):>18} {impl:>6}   skipped: {reason}")
                rows.append({"impl": impl, "skipped": reason})
                continue
            command = [sys.executable, __file__, "--child", impl, "--device", args.device, "--dtype", args.dtype,
                       "--shapes", "x".join(map(str, shape)), "--top-k", str(args.top_k), "--chunk-size",
                       str(args.chunk_size), "--repeats", str(repeats)]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                reason = f"failed (exit {child.returncode}): {child.stderr.strip().splitlines()[-1:]}"
                print(f"{'x'.join(map(str, shape)):>18} {impl:>6}   {reason}")
                rows.append({"impl": impl, "failed": reason})
                continue
            row = {"impl": impl, **json.loads(child.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{'x'.join(map(str, shape)):>18} {impl:>6} {row['ms']:>10.1f} {row['cpu_ms']:>10.1f} "
                  f"{row['peak_extra_mib']:>10.1f} {row['loss']:>10.5f}")
        by_impl = {row["impl"]: row for row in rows if "ms" in row}
        summary = {}
        if "fused" in by_impl and "plain" in by_impl:
            fused, plain = by_impl["fused"], by_impl["plain"]
            summary = {"time_vs_plain": fused["ms"] / plain["ms"],
                       "cpu_time_vs_plain": fused["cpu_ms"] / plain["cpu_ms"],
                       # None where plain PyTorch needed no new pages (tiny shapes)
                       "peak_vs_plain": (fused["peak_extra_mib"] / plain["peak_extra_mib"]
                                         if plain["peak_extra_mib"] else None),
                       "loss_rel_diff": abs(fused["loss"] - plain["loss"]) / abs(plain["loss"])}
            peak = "-" if summary["peak_vs_plain"] is None else f"{summary['peak_vs_plain']:.3f}x"
            print(f"{'':>18} fused / plain: time {summary['time_vs_plain']:.2f}x (CPU time "
                  f"{summary['cpu_time_vs_plain']:.2f}x), peak memory {peak}, loss differs by "
                  f"{summary['loss_rel_diff']:.1e} (relative)")
        results.append({"shape": {"tokens": shape[0], "vocab": shape[1], "hidden": shape[2]}, "results": rows,
                        **summary})

    stamp = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": stamp.isoformat(timespec="seconds"), "device": device_name, "device_type": device.type,
        "dtype": args.dtype, "top_k": args.top_k, "chunk_size": args.chunk_size, "repeats": repeats,
        "memory": "CUDA: max_memory_allocated above the allocated before; CPU: peak resident set (VmHWM) above the "
                  "resident set before, one child process per case",
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"), "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "load_average_before_after": [load_before, os.getloadavg()[0]],
        "rank_backend": _resolve_backend("auto", device),
        "shapes": results, "command": "python bench/fused_linear_bench.py " + " ".join(sys.argv[1:]),
    }
    path = args.json or RESULTS_DIR / f"fused_linear_{device.type}_{args.dtype}_{stamp:%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    print(f"saved {path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("fused_linear_bench.py: interrupted; nothing saved", file=sys.stderr)
        sys.exit(130)
