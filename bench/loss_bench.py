"""Speed and memory of every rankkd.kendall_rank_loss backend against the plain PyTorch reference.

    python bench/loss_bench.py [--device cpu|cuda] [--dtype float32|bfloat16|float16] [--shapes 64x100,128x1000]
                               [--topk K] [--precision fast|exact] [--repeats N] [--backends cuda,triton,...]
                               [--json PATH]

Times forward+backward (median over repeats) of each available backend, of rankkd.reference eagerly, and of
torch.compile(rankkd.reference); reports the peak extra memory of each and its speedup over both baselines. On CUDA
it also measures the chip's tanh throughput (tanh.approx.f32) in the same run and gives each time as a multiple of
the floor: 2 tanh per unordered pair. Results (with device, versions and date) go to bench/results/.

--precision is the op's precision argument: "fast" (default) lets the GPU backends use the hardware tanh, "exact" asks
for full float32 math; the CPU kernel and the reference are always exact. The report records it.
"""
import argparse
import datetime
import json
import logging
import platform
import sys
import statistics
import time
from pathlib import Path

import torch

import rankkd
from rankkd import reference
from rankkd.ops import PRECISIONS
from rankkd.training.config import OneLineParser

DEFAULT_SHAPES = "64x100,128x1000,512x1000,64x4096,32x8x1000"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Bytes the reference's autograd graph holds per (row, i, j) entry: about five float32 C x C tensors
# (the two pairwise differences, their tanh, and their product) -- checked against the measured peaks.
REFERENCE_BYTES_PER_PAIR_ENTRY = 5 * 4


def parse_shapes(text):
    try:
        shapes = [tuple(int(d) for d in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        raise SystemExit(f"--shapes: expected comma-separated shapes like 64x100,32x8x1000, got {text!r}")
    if not shapes or any(len(shape) < 2 or min(shape) < 1 or shape[-1] < 2 for shape in shapes):
        raise SystemExit(f"--shapes: each shape needs a rows dim and C >= 2, got {text!r}")
    return shapes


def rows_and_classes(shape):
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows, shape[-1]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fwd_bwd(loss_fn, student, teacher):
    student.grad = None
    loss_fn(student, teacher).backward()


def median_ms(loss_fn, student, teacher, device, repeats):
    if device.type == "cuda":
        import triton.testing  # its do_bench flushes L2 between calls and reports a median

        return triton.testing.do_bench(lambda: fwd_bwd(loss_fn, student, teacher), warmup=25, rep=max(repeats, 100),
                                       return_mode="median")
    fwd_bwd(loss_fn, student, teacher)  # warm-up (and compilation, for torch.compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fwd_bwd(loss_fn, student, teacher)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _read_kib(path, field):
    """A "Field: N kB" line of /proc/self/status or /proc/meminfo."""
    with open(path) as lines:
        for line in lines:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in {path}")


def peak_extra_mib(loss_fn, student, teacher, device):
    """Peak memory above what was in use before one forward+backward."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd(loss_fn, student, teacher)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # CPU: writing "5" to clear_refs resets the process's peak resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    base = _read_kib("/proc/self/status", "VmRSS")
    fwd_bwd(loss_fn, student, teacher)
    return max(_read_kib("/proc/self/status", "VmHWM") - base, 0) / 1024


def available_mib(device):
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free / 2**20
    return _read_kib("/proc/meminfo", "MemAvailable") / 1024


def cpu_model():
    """The CPU's model name and the widest vector ISA the CPU kernel's clones can use on it (AVX-512, AVX2, FMA):
    CPU timings differ several-fold between machines, and the ISA is most of why."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return platform.machine() + " CPU"
    isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("fma", "FMA")) if flag in flags),
               "no AVX2/FMA")
    return f"{model} ({isa})"


def measure_tanh_rate(device):
    """tanh.approx.f32 per second on this GPU, from a Triton kernel of independent tanh chains (None without Triton)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def tanh_chains(out_ptr, iterations, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x0 = offsets.to(tl.float32) * 1e-7
        x1, x2, x3 = x0 + 0.1, x0 + 0.2, x0 + 0.3
        for _ in range(iterations):  # four independent chains hide the special-function unit's latency
            x0 = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x0], dtype=tl.float32, is_pure=True,
                                           pack=1)
            x1 = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x1], dtype=tl.float32, is_pure=True,
                                           pack=1)
            x2 = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x2], dtype=tl.float32, is_pure=True,
                                           pack=1)
            x3 = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x3], dtype=tl.float32, is_pure=True,
                                           pack=1)
        tl.store(out_ptr + offsets, x0 + x1 + x2 + x3)

    block, iterations = 1024, 4096
    programs = torch.cuda.get_device_properties(device).multi_processor_count * 8
    out = torch.empty(programs * block, device=device)
    launch = lambda: tanh_chains[(programs,)](out, iterations, BLOCK=block, num_warps=8)  # noqa: E731
    ms = triton.testing.do_bench(launch, warmup=10, rep=200, return_mode="median")
    return 4 * iterations * programs * block / (ms * 1e-3)


def main():
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated (default {DEFAULT_SHAPES})")
    parser.add_argument("--topk", type=int, default=None)
    parser.add_argument("--precision", default="fast", choices=PRECISIONS,
                        help="the op's precision for the fused backends (default fast)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 20 CUDA, 5 CPU)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of the fused backends and reference, reference+compile "
                             "(default: all available)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: bench/results/<auto>.json)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if not torch.cuda.is_available():
        # torch.compile's C++ toolchain set-up warns that a CPU-only machine has no CUDA runtime: true, and not news.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    dtype = getattr(torch, args.dtype)
    shapes = parse_shapes(args.shapes)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{cpu_model()}, {torch.get_num_threads()} threads")

    tanh_rate = measure_tanh_rate(device) if device.type == "cuda" else None
    if tanh_rate:
        print(f"tanh.approx.f32 throughput: {tanh_rate / 1e12:.2f} T/s")

    fused = [name for name in rankkd.available_backends(device) if name != "reference"]
    compiled_reference = torch.compile(reference.kendall_rank_loss, dynamic=False)
    candidates = {name: (lambda s, t, name=name: rankkd.kendall_rank_loss(s, t, topk=args.topk,
                                                                          precision=args.precision, backend=name))
                  for name in fused}
    candidates["reference"] = lambda s, t: reference.kendall_rank_loss(s, t, topk=args.topk)
    candidates["reference+compile"] = lambda s, t: compiled_reference(s, t, topk=args.topk)
    if args.backends:
        wanted = args.backends.split(",")
        unknown = sorted(set(wanted) - set(candidates))
        if unknown:
            raise SystemExit(f"--backends: {unknown} not available here; choose from {sorted(candidates)}")
        candidates = {name: fn for name, fn in candidates.items() if name in wanted}

    results = []
    header = f"{'shape':>12} {'backend':>18} {'ms':>10} {'peak MiB':>10} {'x eager':>8} {'x compile':>9} {'x floor':>8}"
    print(f"{device_name}, torch {torch.__version__}, {args.dtype}, precision {args.precision}, forward+backward, "
          f"median of {repeats}")
    print(header)
    for shape in shapes:
        rows, num_classes = rows_and_classes(shape)
        n = args.topk or num_classes
        pairs = rows * n * (n - 1) / 2
        floor_ms = 2 * pairs / tanh_rate * 1e3 if tanh_rate else None
        generator = torch.Generator().manual_seed(0)
        student = (3 * torch.randn(shape, generator=generator)).to(device, dtype).requires_grad_()
        teacher = (3 * torch.randn(shape, generator=generator)).to(device, dtype)
        reference_mib = rows * n * n * REFERENCE_BYTES_PER_PAIR_ENTRY / 2**20
        rows_out = []
        for name, loss_fn in candidates.items():
            if name.startswith("reference") and reference_mib > 0.6 * available_mib(device):
                print(f"{'x'.join(map(str, shape)):>12} {name:>18}   skipped: needs ~{reference_mib:.0f} MiB, "
                      f"{available_mib(device):.0f} MiB free")
                rows_out.append({"backend": name, "skipped": f"needs ~{reference_mib:.0f} MiB"})
                continue
            ms = median_ms(loss_fn, student, teacher, device, repeats)
            rows_out.append({"backend": name, "ms": ms, "peak_extra_mib": peak_extra_mib(loss_fn, student, teacher,
                                                                                            device)})
        baseline = {r["backend"]: r.get("ms") for r in rows_out}
        for r in rows_out:
            if "ms" not in r:
                continue
            r["speedup_vs_eager"] = baseline["reference"] / r["ms"] if baseline.get("reference") else None
            r["speedup_vs_compile"] = (baseline["reference+compile"] / r["ms"]
                                       if baseline.get("reference+compile") else None)
            r["x_floor"] = r["ms"] / floor_ms if floor_ms else None
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            print(f"{'x'.join(map(str, shape)):>12} {r['backend']:>18} {r['ms']:>10.3f} "
                  f"{r['peak_extra_mib']:>10.1f} {fmt(r['speedup_vs_eager'], '>8.1f')} "
                  f"{fmt(r['speedup_vs_compile'], '>9.1f')} {fmt(r['x_floor'], '>8.2f')}")
        results.append({"shape": list(shape), "pairs": pairs, "floor_ms": floor_ms, "results": rows_out})

    stamp = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "date": stamp.isoformat(timespec="seconds"), "device": device_name, "device_type": device.type,
        "dtype": args.dtype, "precision": args.precision, "topk": args.topk, "repeats": repeats,
        "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": _version("triton"), "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(), "tanh_per_s": tanh_rate, "shapes": results,
        "command": "python bench/loss_bench.py " + " ".join(sys.argv[1:]),
    }
    path = args.json or RESULTS_DIR / f"loss_{device.type}_{args.dtype}_{args.precision}_{stamp:%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(path)
    print(f"saved {path}")


def _version(package):
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("loss_bench.py: interrupted; nothing saved", file=sys.stderr)
        sys.exit(130)
