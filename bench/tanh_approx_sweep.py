"""The hardware tanh (tanh.approx.f32, MUFU.TANH) over every float32, on a GPU.

    python bench/tanh_approx_sweep.py [--json bench/results/tanh_approx_<gpu>.json]

The fast path takes sech^2 = 1 - tanh^2 from this instruction, which the PTX ISA specifies only to a relative error
(2^-10.99). Three properties it relies on, or could drop a guard for, that no specification promises:
  - range: |tanh.approx(x)| <= 1 for every x, so that 1 - tanh^2 is never negative;
  - monotonic: x < y gives tanh.approx(x) <= tanh.approx(y), so that the sign of every pair survives;
  - saturation: the smallest x from which the result is exactly 1 (and -1 for -x). At or below 9.02, where float32 tanh
    itself rounds to 1, the kernels' pin (tanh_approx<kPin> in csrc/kendall_tanh.cuh, _tanh(PIN) in Triton) is never
    needed.
All 2^32 bit patterns are evaluated by the Triton kernels' own _tanh, in chunks of consecutive patterns (consecutive
non-negative patterns are increasing floats, consecutive negative ones decreasing), a few seconds on one GPU. Also
reports the largest relative error against float64 tanh over the normal floats of [2^-10, 20]."""
import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from rankkd.triton.kendall import _tanh  # noqa: E402

CHUNK = 1 << 26
LARGEST_FINITE = 0x7F7FFFFF


@triton.jit
def _tanh_of_bits(bits_start, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = (bits_start + offsets).to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offsets, _tanh(x, True, False), mask=offsets < n)


def tanh_of_patterns(first, count, device):
    """(x, tanh.approx(x)) for the float32 bit patterns first .. first + count - 1 (as int64, below 2^32)."""
    out = torch.empty(count, dtype=torch.float32, device=device)
    # Patterns from 2^31 on are the negative floats: pass them as the int32 they are.
    start = first - (1 << 32) if first >= 1 << 31 else first
    _tanh_of_bits[(triton.cdiv(count, 1024),)](start, out, count, BLOCK=1024)
    bits = torch.arange(first, first + count, dtype=torch.int64, device=device)
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    return x, out


def sweep(device="cuda"):
    """The properties above over every finite float32 (NaN and inf patterns skipped), as a dict."""
    largest_magnitude = 0.0
    non_monotonic = 0
    not_saturated_above = {1: 0.0, -1: 0.0}  # per sign: the largest |x| whose result is not exactly +-1
    worst_error, worst_error_at = 0.0, None
    for sign_bit, direction in ((0, 1), (1 << 31, -1)):
        previous = None
        for first in range(sign_bit, sign_bit + LARGEST_FINITE + 1, CHUNK):
            count = min(CHUNK, sign_bit + LARGEST_FINITE + 1 - first)
            x, y = tanh_of_patterns(first, count, device)
            largest_magnitude = max(largest_magnitude, y.abs().max().item())
            steps = y[1:] - y[:-1] if previous is None else torch.diff(y, prepend=previous)
            non_monotonic += int((direction * steps < 0).sum().item())
            previous = y[-1:]
            unsaturated = y != direction
            if unsaturated.any():
                not_saturated_above[direction] = max(not_saturated_above[direction],
                                                     x[unsaturated].abs().max().item())
            normal = (x.abs() >= 2.0 ** -10) & (x.abs() <= 20.0)
            if normal.any():
                exact = torch.tanh(x[normal].double())
                error = ((y[normal].double() - exact) / exact).abs()
                at = int(error.argmax())
                if error[at].item() > worst_error:
                    worst_error, worst_error_at = error[at].item(), x[normal][at].item()
    saturation = {sign: float(torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))))
                  for sign, v in not_saturated_above.items()}
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__,
        "largest_magnitude": largest_magnitude,
        "within_unit_interval": largest_magnitude <= 1.0,
        "non_monotonic_steps": non_monotonic,
        "saturated_from": saturation[1],
        "saturated_from_negative": -saturation[-1],
        "pin_needed": max(saturation.values()) > 9.02,
        "max_relative_error_2e-10_to_20": worst_error,
        "max_relative_error_at": worst_error_at,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="results file (default: print only)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tanh_approx_sweep.py needs a CUDA GPU: tanh.approx.f32 is a GPU instruction")
    result = sweep()
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
