"""The Triton kernel at one shape with a row split into 1, 2, 3, ... parts, timed side by side on a GPU.

    python bench/triton_parts.py [--shape 512x1000] [--parts 1,2,3] [--json FILE] [--profile]

Parts set how many one-warp programs share the GPU's warp schedulers: at 512 x 1000 one part gives each scheduler
about one warp, which cannot hide the special-function unit's latency on its own, two or three give it more warps at
the cost of a second launch that adds the parts' sums. bench/kernel_report.py's latency model predicts this trade;
this script measures it (fp32, precision "fast", tanh teacher, student gradient: the training configuration), next to
the 2-tanh floor at the tanh rate measured on the same GPU. --profile launches each setting twice and times nothing,
for ncu: the first launches compile, the next len(parts) pair-kernel launches are the ones to profile
(bench/gpu_check.sh runs `ncu --launch-skip 3 --launch-count 3` on it when ncu is installed, for the issue stalls
and the special-function unit's utilisation)."""
import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from rankkd.triton import kendall as triton_kendall  # noqa: E402
from loss_bench import measure_tanh_rate  # noqa: E402


def runners(rows, num_classes, parts_list):
    g = torch.Generator(device="cuda").manual_seed(0)
    student = 3 * torch.randn(rows, num_classes, device="cuda", generator=g)
    teacher = 3 * torch.randn(rows, num_classes, device="cuda", generator=g)
    return {parts: (lambda parts=parts: triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "fast", True, False,
                                                                    parts=parts))
            for parts in parts_list}


def time_parts(rows, num_classes, parts_list, repeats):
    import triton.testing

    return [{"parts": parts, "ms": triton.testing.do_bench(run, warmup=25, rep=repeats, return_mode="median")}
            for parts, run in runners(rows, num_classes, parts_list).items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="512x1000", help="rows x classes (default 512x1000)")
    parser.add_argument("--parts", default="1,2,3", help="comma-separated parts per row (default 1,2,3)")
    parser.add_argument("--repeats", type=int, default=200, help="milliseconds of timed runs per case (default 200)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: print only)")
    parser.add_argument("--profile", action="store_true", help="launch each setting twice, time nothing (for ncu)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("triton_parts.py needs a CUDA GPU")
    try:
        rows, num_classes = (int(v) for v in args.shape.lower().split("x"))
        parts_list = [int(v) for v in args.parts.split(",")]
    except ValueError:
        raise SystemExit(f"--shape takes ROWSxCLASSES and --parts integers, got {args.shape!r}, {args.parts!r}")
    if args.profile:
        launches = runners(rows, num_classes, parts_list)
        for run in [*launches.values(), *launches.values()]:
            run()
        torch.cuda.synchronize()
        return
    tanh_rate = measure_tanh_rate(torch.device("cuda"))
    floor_ms = rows * num_classes * (num_classes - 1) / tanh_rate * 1e3  # 2 tanh per unordered pair
    results = time_parts(rows, num_classes, parts_list, args.repeats)
    default_parts = triton_kendall.num_parts(rows, num_classes, triton_kendall.BLOCK_I_FAST, triton_kendall.NUM_WARPS,
                                             triton_kendall._num_sms(torch.device("cuda")))
    print(f"{torch.cuda.get_device_name()}, {rows}x{num_classes}, fp32 fast, tanh teacher, student gradient; "
          f"2-tanh floor {floor_ms * 1e3:.1f} us at {tanh_rate / 1e12:.2f} T tanh/s; num_parts picks {default_parts}")
    for result in results:
        result["x_floor"] = result["ms"] / floor_ms
        print(f"  parts {result['parts']}: {result['ms'] * 1e3:8.1f} us  {result['x_floor']:.2f}x floor")
    if args.json:
        args.json.write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [rows, num_classes],
            "tanh_per_s": tanh_rate, "floor_ms": floor_ms, "num_parts_default": default_parts, "results": results,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
