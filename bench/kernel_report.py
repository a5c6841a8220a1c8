"""Kernel cost read from machine code, without a GPU.

    python bench/kernel_report.py [--archs 80,89,90] [--out bench/results] [--no-write] [--tag NAME]
                                  [--update-docs] [--measured bench/results/loss_cuda_float32.json]

For each architecture (sm_80, sm_89, sm_90) and every pair-kernel variant (precision x teacher mode x gradients) of
the CUDA extension (the SASS inside the built rankkd/_C*.so) and of the Triton kernel (compiled for
GPUTarget("cuda", arch, 32) without a device), it reads registers, spills and shared memory, finds the pair loop and
counts its instructions per pair by class, bounds the loop per warp scheduler, plans each launch as the code would
and predicts its time beside the floor (2 MUFU tanh per unordered pair). Tools: cuobjdump from the installed triton
package (triton/backends/nvidia/bin). Writes bench/results/static-sm_<arch>-<date>.json and prints one table.

The model (per warp scheduler, from the CUDA programming guide's throughput table):
  issue  1 warp instruction per clock
  MUFU   16 lanes/clk/SM: 8 clocks per warp instruction (MUFU.TANH, EX2, RCP, ...)
  FMA    FP32 add/mul/fma: 1 clock (sm_89, sm_90: 128 lanes/clk/SM) or 2 (sm_80); IMAD: 2 (heavy FMA unit only)
  ALU    compare, select, logic, integer add/shift: 2 clocks (64 lanes/clk/SM)
  SHFL   4 clocks; LSU (loads, stores): 4 clocks; FP64: 4 (sm_80), 64 (sm_89), 2 (sm_90)
A loop iteration costs the largest of those; a warp's work is its loop iterations plus the code outside the loop once
per strip (CUDA) or panel (Triton), the diagonal tile included. Warps resident on an SM share its four schedulers; the
programs of a launch are dispatched in order to the first SM with a free slot (residency from registers and shared
memory). Every launch adds LAUNCH_US and the small kernels' memory traffic at DRAM_BYTES_PER_S. Not modelled:
latency (each warp has 32+ independent pairs per iteration to hide it), memory stalls of the pair kernels, clocks
below boost. The floor: 2 tanh per unordered pair at 16 MUFU lanes/clk/SM at the machine's clock.
"""
import argparse
import datetime
import heapq
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from rankkd.triton import kendall as triton_kendall  # noqa: E402

RESULTS_DIR = REPO / "bench" / "results"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ARCHS = (80, 89, 90)
SHAPES = ((64, 100), (128, 1000), (512, 1000), (64, 4096), (64, 32000))
LAUNCH_US = 2.0
DRAM_BYTES_PER_S = 2.5e12

# The machine each architecture is predicted on: SMs, boost clock (sm_90: the clock at which 132 SMs x 16 MUFU lanes
# give the 4.13 T tanh/s measured on an H100 SXM), and the per-SM limits that set residency.
MACHINES = {
    80: dict(name="A100 SXM", sms=108, clock_hz=1.41e9, max_warps=64, max_blocks=32, smem=164 * 1024,
             fma_clocks=2, fp64_clocks=4),
    89: dict(name="L40S", sms=142, clock_hz=2.52e9, max_warps=48, max_blocks=24, smem=100 * 1024,
             fma_clocks=1, fp64_clocks=64),
    90: dict(name="H100 SXM", sms=132, clock_hz=4.13e12 / (132 * 16), max_warps=64, max_blocks=32, smem=228 * 1024,
             fma_clocks=1, fp64_clocks=2),
}
REGISTERS_PER_SM = 65536
MUFU_CLOCKS = 8
FLOOR_CLOCKS_PER_PAIR = 2 * MUFU_CLOCKS / 32  # scheduler clocks per pair: 2 MUFU per pair, 32 lanes per instruction

CLASSES = ("mufu", "fp32", "fp64", "cmp_sel_logic", "integer", "shuffle", "load_store", "branch", "other")
_CLASS_OF = {}
for _cls, _ops in {
    "mufu": "MUFU",
    "fp32": "FFMA FADD FMUL FFMA32I FADD32I FMUL32I HFMA2 HADD2 HMUL2 FSWZADD",
    "fp64": "DFMA DADD DMUL DSETP DMNMX",
    "cmp_sel_logic": "FSETP ISETP FSEL SEL LOP3 LOP LOP32I PLOP3 FMNMX IMNMX PSETP P2R R2P FCHK VOTE VOTEU",
    "integer": "IADD3 IADD IADD32I IMAD IMAD32I IMUL LEA SHF SHL SHR IABS POPC FLO BREV I2F F2I I2FP F2FP F2F FRND "
               "I2I IDP",
    "shuffle": "SHFL",
    "load_store": "LDG STG LDS STS LD ST LDL STL ATOM ATOMS RED LDSM ATOMG LDGSTS",
    "branch": "BRA BRX JMP BSSY BSYNC EXIT RET CALL BAR WARPSYNC BMOV YIELD BPT",
}.items():
    _CLASS_OF.update((op, _cls) for op in _ops.split())
_ALU_INTEGER = {"IADD3", "IADD", "IADD32I", "LEA", "SHF", "SHL", "SHR", "IABS", "POPC", "FLO", "BREV", "I2FP", "F2FP"}
_FMA_INTEGER = {"IMAD", "IMAD32I", "IMUL", "IDP"}

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_CUDA_VARIANT = re.compile(r"kendall_pairs_kernelI([fd])LNS_9PrecisionE(\d)ELNS_11TeacherModeE(\d)ELb(\d)E")


def tool(name):
    path = TOOLS / name
    if not path.exists():
        raise SystemExit(f"kernel_report: {path} is missing (it ships with the triton package)")
    return str(path)


def run_tool(*args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def parse_sass(text):
    """{function: [(address, opcode, operands)]} from `cuobjdump -sass`."""
    functions, current = {}, None
    for line in text.splitlines():
        name = re.match(r"\s*Function : (\S+)", line)
        if name:
            current = functions.setdefault(name.group(1), [])
            continue
        match = _INSTRUCTION.search(line)
        if match and current is not None:
            current.append((int(match.group(1), 16), match.group(3), match.group(4).strip()))
    return functions


def parse_resources(text):
    """{function: {registers, stack, shared, local}} from `cuobjdump -res-usage`."""
    resources, current = {}, None
    for line in text.splitlines():
        name = re.match(r"\s*Function (\S+):", line)
        if name:
            current = name.group(1)
        elif current and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            resources[current] = dict(registers=int(fields["REG"]), stack=int(fields["STACK"]),
                                      shared=int(fields["SHARED"]), local=int(fields["LOCAL"]))
    return resources


def loops(instructions):
    """(first index, last index) of each backward branch's body; a branch to itself (the trap at the end) is not
    one."""
    index = {address: i for i, (address, _, _) in enumerate(instructions)}
    found = []
    for i, (address, opcode, operands) in enumerate(instructions):
        if opcode.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
                found.append((index[int(target.group(1), 16)], i))
    return found


def pair_loop(instructions):
    """The pair loop: the innermost loop holding MUFU instructions (the most of them, if several; the shortest of
    those)."""
    def mufu(span):
        return sum(op.startswith("MUFU") for _, op, _ in instructions[span[0]:span[1] + 1])
    candidates = [span for span in loops(instructions) if mufu(span)]
    innermost = [span for span in candidates
                 if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in candidates)]
    if not innermost:
        raise ValueError("no loop with MUFU instructions")
    # Equal MUFU counts: the shorter loop. The Triton fast kernel holds the pair loop twice, prescaled (every row whose
    # |k x| fits) and unscaled (2 FMUL more per pair, only for rows that would overflow); the prescaled one is the one
    # that runs.
    return max(innermost, key=lambda span: (mufu(span), -(span[1] - span[0])))


def classify(instructions):
    counts = dict.fromkeys(CLASSES, 0)
    mufu_ops = {}
    fma_integer = alu_integer = 0
    for _, opcode, _ in instructions:
        base = opcode.split(".")[0]
        cls = _CLASS_OF.get(base, "other")
        counts[cls] += 1
        if cls == "mufu":
            mufu_ops[opcode] = mufu_ops.get(opcode, 0) + 1
        fma_integer += base in _FMA_INTEGER
        alu_integer += base in _ALU_INTEGER
    return counts, mufu_ops, fma_integer, alu_integer


def pipe_clocks(instructions, machine):
    """Scheduler clocks of a straight run of instructions, per pipe, and the binding one."""
    counts, _, fma_integer, alu_integer = classify(instructions)
    fma_lanes = (counts["fp32"] + fma_integer) * machine["fma_clocks"]
    pipes = {
        "issue": len(instructions),
        "mufu": MUFU_CLOCKS * counts["mufu"],
        "fma": max(fma_lanes, 2 * fma_integer),
        "alu": 2 * (counts["cmp_sel_logic"] + alu_integer),
        "fp64": machine["fp64_clocks"] * counts["fp64"],
        "shuffle": 4 * counts["shuffle"],
        "lsu": 4 * counts["load_store"],
    }
    bound = max(pipes, key=pipes.get)
    return pipes, bound


def analyse(instructions, resources, pairs_per_iteration, machine):
    """Resources, the pair loop per pair by class, and the clocks of the code around it: once per trip of the loop
    that encloses it (a strip, a panel) and once per program."""
    first, last = pair_loop(instructions)
    body = instructions[first:last + 1]
    enclosing = [span for span in loops(instructions) if span[0] <= first and last <= span[1] and span != (first, last)]
    if enclosing:
        outer_first, outer_last = min(enclosing, key=lambda span: span[1] - span[0])
        per_trip = instructions[outer_first:first] + instructions[last + 1:outer_last + 1]
        skip = fallback_nests(instructions, (first, last), (outer_first, outer_last))
        per_program = [ins for i, ins in enumerate(instructions)
                       if not outer_first <= i <= outer_last and not any(a <= i <= b for a, b in skip)]
    else:
        per_trip, per_program = instructions[:first] + instructions[last + 1:], []
    counts, mufu_ops, _, _ = classify(body)
    pipes, bound = pipe_clocks(body, machine)
    def spills(code):
        return sum(op.split(".")[0] in ("LDL", "STL") for _, op, _ in code)
    loop_clocks = pipes[bound]
    return {
        **resources,
        "spill_instructions": spills(instructions),
        "loop_spill_instructions": spills(body),
        "pairs_per_lane_per_iteration": pairs_per_iteration,
        "loop_instructions": len(body),
        "per_pair": {cls: round(n / pairs_per_iteration, 3) for cls, n in counts.items()},
        "instructions_per_pair": round(len(body) / pairs_per_iteration, 3),
        "mufu_per_pair": {op: round(n / pairs_per_iteration, 3) for op, n in mufu_ops.items()},
        "loop_pipe_clocks": pipes,
        "loop_bound": bound,
        "loop_clocks": loop_clocks,
        "loop_vs_floor": round(loop_clocks / (FLOOR_CLOCKS_PER_PAIR * 32 * pairs_per_iteration), 4),
        "per_trip_instructions": len(per_trip),
        "per_trip_mufu_span_clocks": mufu_span_clocks(per_trip, machine),
        "per_trip_clocks": max(pipe_clocks(per_trip, machine)[0].values()),
        "per_program_clocks": max(pipe_clocks(per_program, machine)[0].values()) if per_program else 0,
    }


def fallback_nests(instructions, pair, outer):
    """Loop nests outside the pair loop's enclosing loop that hold at least as many MUFU instructions as the pair loop:
    a second copy of the loop nest (the Triton fast kernel's unscaled one, run only for rows where k x would
    overflow). Not part of a program's cost."""
    def mufu(span):
        return sum(op.startswith("MUFU") for _, op, _ in instructions[span[0]:span[1] + 1])
    need = mufu(pair)
    found = [span for span in loops(instructions)
             if (span[1] < outer[0] or span[0] > outer[1]) and mufu(span) >= need]
    return [span for span in found if not any(o != span and o[0] <= span[0] and span[1] <= o[1] for o in found)]


def mufu_span_clocks(code, machine):
    """Clocks of the code from its first to its last MUFU instruction: the pairs evaluated outside the pair loop (the
    CUDA kernel's diagonal tile pair)."""
    marks = [i for i, (_, op, _) in enumerate(code) if op.startswith("MUFU")]
    return max(pipe_clocks(code[marks[0]:marks[-1] + 1], machine)[0].values()) if marks else 0


def residency(registers, shared, warps, machine):
    """Programs (CTAs) of `warps` warps resident per SM: registers are allocated per warp in units of 256."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = REGISTERS_PER_SM // per_warp // warps
    by_shared = machine["smem"] // (shared + 1024)
    return max(1, min(by_registers, machine["max_warps"] // warps, machine["max_blocks"], by_shared))


def makespan(costs, warps, resident, sms):
    """Clocks until the last program ends: programs start in order on the first SM with a free slot (the first ones
    breadth-first); the warps on an SM share its four schedulers (each runs at min(1, 4 / warps resident) speed)."""
    queue = iter(costs)
    active = [[] for _ in range(sms)]  # own-clocks left of each program on the SM
    updated = [0.0] * sms
    version = [0] * sms
    events = []

    def rate(sm):
        return min(1.0, 4.0 / (warps * len(active[sm])))

    def schedule(sm, now):
        version[sm] += 1
        if active[sm]:
            heapq.heappush(events, (now + min(active[sm]) / rate(sm), sm, version[sm]))

    for _ in range(resident):
        for sm in range(sms):
            cost = next(queue, None)
            if cost is not None:
                active[sm].append(cost)
    for sm in range(sms):
        schedule(sm, 0.0)
    end = 0.0
    while events:
        now, sm, seen = heapq.heappop(events)
        if seen != version[sm]:
            continue
        progress = (now - updated[sm]) * rate(sm)
        updated[sm] = now
        left = [c - progress for c in active[sm]]
        active[sm] = [c for c in left if c > 1e-9 * max(1.0, now)]  # rounding left over from the finished
        for _ in range(len(left) - len(active[sm])):
            cost = next(queue, None)
            if cost is not None:
                active[sm].append(cost)
        end = now
        schedule(sm, now)
    return end


def floor_us(rows, num_classes, machine):
    pairs = rows * num_classes * (num_classes - 1) / 2
    return pairs * 2 / (16 * machine["sms"] * machine["clock_hz"]) * 1e6


def predict(costs, warps, resident, rows, num_classes, launches, small_kernel_bytes, kernel, machine):
    """Prediction for one launch plan: costs are the programs' clocks (per warp on its scheduler)."""
    sms = machine["sms"]
    useful = rows * num_classes * (num_classes - 1) / 2
    clocks = makespan(costs, warps, resident, sms)
    pair_us = clocks / machine["clock_hz"] * 1e6
    total_us = pair_us + launches * LAUNCH_US + small_kernel_bytes / DRAM_BYTES_PER_S * 1e6
    floor = floor_us(rows, num_classes, machine)
    work = sum(costs) * warps  # scheduler clocks over all warps
    return {
        "programs": len(costs),
        "warps_per_program": warps,
        "resident_per_sm": resident,
        "waves": round(len(costs) / (resident * sms), 3),
        "sms_used": min(len(costs), sms),
        "launches": launches,
        "work_vs_useful": round(work / (useful * FLOOR_CLOCKS_PER_PAIR), 4),
        "loop_vs_floor": kernel["loop_vs_floor"],
        "balance": round(clocks * sms * 4 / work, 4),
        "pair_kernel_us": round(pair_us, 3),
        "predicted_us": round(total_us, 3),
        "floor_us": round(floor, 3),
        "ratio": round(total_us / floor, 3),
    }


# ---- CUDA: the extension's SASS and its launch plan (mirrors csrc/kendall_cuda.cu) ----------------------------------

CUDA_TILE, CUDA_WARPS, CUDA_PAIRS_PER_LANE = 64, 4, 32
# The diagonal tile pair's column groups rotate over the warps (kendall_pairs.cuh), so each scheduler carries their
# mean, (2 + 4 + 6 + 8) / 4 of the 8 row slots that the straight-line SASS holds.
CUDA_DIAGONAL_SHARE = 5 / 8


def cuda_parts_per_row(rows, pairs_per_row, bytes_per_slice, sms):
    """parts_per_row of csrc/kendall_cuda.cu."""
    parts = max(1, -(-3 * sms // rows))
    for _ in range(64):
        ctas = rows * parts
        busiest = -(-ctas // sms)
        if 10 * ctas >= 9 * busiest * sms:
            break
        parts += 1
    parts = min(parts, pairs_per_row)
    parts = min(parts, max(1, (256 << 20) // max(1, rows * bytes_per_slice)))
    return max(1, min(parts, (2**31 - 1) // rows))


def cuda_strip_work(tiles, first, end):
    """(off-diagonal tile pairs, strips) of the tile-pair range [first, end) of a row (strip_containing)."""
    h = tiles // 2
    long_length = h + 1
    long_pairs = tiles * long_length if tiles % 2 else h * long_length
    off_diagonal = strips = 0
    idx = first
    while idx < end:
        if idx < long_pairs:
            strip_first, length = idx // long_length * long_length, long_length
        else:
            strip_first, length = long_pairs + (idx - long_pairs) // h * h, h
        d0 = idx - strip_first
        d1 = min(d0 + end - idx, length)
        off_diagonal += d1 - max(d0, 1)
        strips += 1
        idx = strip_first + d1
    return off_diagonal, strips


def cuda_plan(kernel, rows, num_classes, grad_teacher, double, machine):
    tiles = -(-num_classes // CUDA_TILE)
    pairs_per_row = tiles * (tiles + 1) // 2
    size = 8 if double else 4
    parts = cuda_parts_per_row(rows, pairs_per_row, num_classes * size * (2 if grad_teacher else 1), machine["sms"])
    costs = []
    per_part = []
    per_strip = kernel["per_trip_clocks"] - (1 - CUDA_DIAGONAL_SHARE) * kernel["per_trip_mufu_span_clocks"]
    for part in range(parts):
        off_diagonal, strips = cuda_strip_work(tiles, part * pairs_per_row // parts,
                                               (part + 1) * pairs_per_row // parts)
        per_part.append(off_diagonal * kernel["loop_clocks"] + strips * per_strip
                        + kernel["per_program_clocks"])
    for _ in range(rows):
        costs.extend(per_part)
    grads = 2 if grad_teacher else 1
    # prepare reads both inputs and writes both padded rows; finalize reads the parts' slices and writes the outputs.
    small = (rows * (2 * num_classes * 4 + 2 * tiles * CUDA_TILE * size)
             + rows * num_classes * size * grads * (parts + 1))
    resident = residency(kernel["registers"], kernel["shared"], CUDA_WARPS, machine)
    return predict(costs, CUDA_WARPS, resident, rows, num_classes, 3, small, kernel, machine) | {"parts": parts}


def cuda_kernels(arch, workdir):
    """{variant: (instructions, resources)} of the extension's pair kernels for sm_<arch>."""
    cubins = list(workdir.glob(f"*.sm_{arch}.cubin"))
    if not cubins:
        return {}
    found = {}
    for cubin in cubins:
        sass = parse_sass(run_tool(tool("cuobjdump"), "-sass", str(cubin)))
        resources = parse_resources(run_tool(tool("cuobjdump"), "-res-usage", str(cubin)))
        for name, instructions in sass.items():
            match = _CUDA_VARIANT.search(name)
            if not match:
                continue
            dtype, precision, mode, grad_t = match.groups()
            variant = "-".join(("float32" if dtype == "f" else "float64", ("fast", "exact")[int(precision)],
                                ("tanh", "sign")[int(mode)], "grad_st" if grad_t == "1" else "grad_s"))
            found[variant] = (instructions, resources[name])
    return found


# ---- Triton: compiled without a device, launch plan from rankkd/triton/kendall.py ------------------------------------

TRITON_VARIANTS = [  # (precision, teacher mode, grad_s, grad_t)
    ("fast", "tanh", True, False), ("fast", "tanh", True, True), ("fast", "sign", True, False),
    ("exact", "tanh", True, False), ("exact", "tanh", True, True), ("exact", "sign", True, False),
]


def triton_compile(arch, precision, mode, grad_s, grad_t):
    fn = triton_kendall._kendall_pairs_kernel
    fast = precision == "fast"
    block_i = triton_kendall.BLOCK_I_FAST if fast else triton_kendall.BLOCK_I_EXACT
    num_warps = triton_kendall.NUM_WARPS
    block_j = 32 * num_warps
    signature = {name: "*fp32" for name in fn.arg_names[:5]}
    signature.update(num_classes="i32", loss_base="fp32", k_hi="fp32", k_lo="fp32")
    constants = dict(TEACHER_MODE_SIGN=mode == "sign", GRAD_S=grad_s, GRAD_T=grad_t, PRECISION_FAST=fast,
                     PRESCALE=fast, BLOCK_I=block_i, BLOCK_J=block_j)
    signature.update(dict.fromkeys(constants, "constexpr"))
    # torch's allocations are 16-byte aligned: the launcher specializes the pointers on it.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": 1})
    return compiled.asm["cubin"], block_i, block_j, num_warps


def triton_plan(kernel, rows, num_classes, grad_s, grad_t, block_i, block_j, num_warps, machine):
    resident = residency(kernel["registers"], kernel["shared"], num_warps, machine)
    parts = triton_kendall.num_parts(rows, num_classes, block_i, num_warps, machine["sms"])
    n_panels = -(-num_classes // block_i)
    costs = [float(kernel["per_program_clocks"])] * parts
    for part in range(parts):
        for deal in range(-(-n_panels // parts)):
            panel = deal * parts + (part if deal % 2 == 0 else parts - 1 - part)
            if panel >= n_panels:
                continue
            # The diagonal block is per-trip code; the loop runs the blocks after it, the one crossing C included.
            loop_blocks = -(-(num_classes - panel * block_i) // block_j) - 1
            costs[part] += loop_blocks * kernel["loop_clocks"] + kernel["per_trip_clocks"]
    grads = int(grad_s) + int(grad_t)
    small = 0 if parts == 1 else rows * num_classes * 4 * grads * (parts + 1)
    programs = [costs[part] for part in range(parts) for _ in range(rows)]  # grid (rows, parts): rows fastest
    return predict(programs, num_warps, resident, rows, num_classes, 1 + (parts > 1), small, kernel, machine) | {
        "parts": parts}


# ---- the report -----------------------------------------------------------------------------------------------------

def extension_path():
    found = sorted((REPO / "rankkd").glob("_C*.so"))
    return found[0] if found else None


def report_arch(arch, workdir):
    machine = MACHINES[arch]
    kernels = {}
    for variant, (instructions, resources) in sorted(cuda_kernels(arch, workdir).items()):
        kernel = analyse(instructions, resources, CUDA_PAIRS_PER_LANE, machine)
        grad_t, double = variant.endswith("grad_st"), variant.startswith("float64")
        kernel["shapes"] = {f"{r}x{c}": cuda_plan(kernel, r, c, grad_t, double, machine) for r, c in SHAPES}
        kernels[f"cuda-{variant}"] = kernel
    for precision, mode, grad_s, grad_t in TRITON_VARIANTS:
        cubin, block_i, block_j, num_warps = triton_compile(arch, precision, mode, grad_s, grad_t)
        path = workdir / f"triton-{arch}.cubin"
        path.write_bytes(cubin)
        (name, instructions), = parse_sass(run_tool(tool("cuobjdump"), "-sass", str(path))).items()
        resources = parse_resources(run_tool(tool("cuobjdump"), "-res-usage", str(path)))[name]
        kernel = analyse(instructions, resources, block_i * block_j // (32 * num_warps), machine)
        kernel["launch"] = dict(block_i=block_i, block_j=block_j, num_warps=num_warps)
        kernel["shapes"] = {f"{r}x{c}": triton_plan(kernel, r, c, grad_s, grad_t, block_i, block_j, num_warps, machine)
                            for r, c in SHAPES}
        variant = f"float32-{precision}-{mode}-" + ("grad_st" if grad_t else "grad_s")
        kernels[f"triton-{variant}"] = kernel
    return {"arch": f"sm_{arch}", "machine": machine | {"floor": "2 MUFU tanh per unordered pair"},
            "kernels": kernels}


def build_report(archs=ARCHS):
    """{arch: report} for the given architectures; CUDA kernels only when the extension holds their SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        extension = extension_path()
        if extension is not None:
            subprocess.run([tool("cuobjdump"), "-xelf", "all", str(extension)], cwd=workdir, check=True,
                           capture_output=True)
        return {arch: report_arch(arch, workdir) for arch in archs}


def table(reports):
    shapes = [f"{r}x{c}" for r, c in SHAPES]
    header = (f"{'arch':6} {'kernel':38} {'reg':>4} {'spill':>6} {'smem':>5} {'ins/pr':>6} {'mufu/pr':>7} "
              f"{'bound':>6} {'loop':>5} " + " ".join(f"{s:>9}" for s in shapes))
    lines = [header, "-" * len(header)]
    for arch, report in reports.items():
        for name, kernel in report["kernels"].items():
            mufu = sum(kernel["mufu_per_pair"].values())
            spill = f"{kernel['loop_spill_instructions']}/{kernel['spill_instructions']}"
            lines.append(
                f"sm_{arch:<3} {name:38} {kernel['registers']:>4} {spill:>6} "
                f"{kernel['shared']:>5} {kernel['instructions_per_pair']:>6.2f} {mufu:>7.2f} {kernel['loop_bound']:>6} "
                f"{kernel['loop_vs_floor']:>5.2f} "
                + " ".join(f"{kernel['shapes'][s]['ratio']:>8.2f}x" for s in shapes))
    lines.append("spill: spill instructions in the pair loop / in the kernel; ins/pr: pair-loop instructions per pair; "
                 "loop: its bound over the 2-MUFU floor; shapes: predicted time over the floor (launches included)")
    return "\n".join(lines)


DOC_BEGIN, DOC_END = "<!-- kernel_report:begin -->", "<!-- kernel_report:end -->"
DOCS = (REPO / "bench" / "NOTES.md", REPO / "docs" / "design.md")


def markdown(report, date):
    """The sm_90 table that bench/NOTES.md and docs/design.md hold between DOC_BEGIN and DOC_END."""
    shapes = [f"{r}x{c}" for r, c in SHAPES[1:4]]
    lines = [f"Generated by `python bench/kernel_report.py --update-docs` ({report['arch']}, "
             f"{report['machine']['name']} model, {date});",
             "predicted, not measured. spills: in the pair loop / in the kernel. Per pair: pair-loop instructions,",
             "MUFU, FP32 and compare/select/logic; /SM: programs resident per SM; loop: the loop's bound over the",
             "floor; shapes: predicted time over the floor, launches included; all float32.", "",
             "| kernel | reg | spills | /SM | ins/pair | MUFU | FP32 | cmp/sel | bound | loop | "
             + " | ".join(shapes) + " |",
             "|---" * (10 + len(shapes)) + "|"]
    for name, kernel in report["kernels"].items():
        if name.startswith("cuda-float64"):
            continue
        per_pair, plan = kernel["per_pair"], kernel["shapes"]
        lines.append(
            f"| {name.replace('-float32', '')} | {kernel['registers']} | "
            f"{kernel['loop_spill_instructions']}/{kernel['spill_instructions']} | "
            f"{plan[shapes[0]]['resident_per_sm']} | {kernel['instructions_per_pair']:.2f} | "
            f"{sum(kernel['mufu_per_pair'].values()):.2f} | {per_pair['fp32']:.2f} | {per_pair['cmp_sel_logic']:.2f} | "
            f"{kernel['loop_bound']} | {kernel['loop_vs_floor']:.2f} | "
            + " | ".join(f"{plan[s]['ratio']:.2f}x" for s in shapes) + " |")
    return "\n".join(lines)


def update_docs(report, date):
    for path in DOCS:
        text = path.read_text()
        if DOC_BEGIN not in text:
            continue
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        path.write_text(f"{head}{DOC_BEGIN}\n{markdown(report, date)}\n{DOC_END}{tail}")
        print(f"updated {path.relative_to(REPO)}")


def beside_measured(reports, measured_path):
    """Rows of (arch, shape, backend, measured ms and x floor, predicted ms and x floor) for the shapes that
    bench/loss_bench.py measured (fast tanh teacher, student gradient: what the benchmark times)."""
    measured = json.loads(Path(measured_path).read_text())
    rows = []
    for arch, report in reports.items():
        for entry in measured["shapes"]:
            if len(entry["shape"]) != 2:
                continue
            shape = "x".join(map(str, entry["shape"]))
            for result in entry["results"]:
                kernel = report["kernels"].get(f"{result['backend']}-float32-{measured['precision']}-tanh-grad_s")
                if kernel is None or "ms" not in result:
                    continue
                plan = kernel["shapes"].get(shape) or (
                    triton_or_cuda_plan(kernel, result["backend"], *entry["shape"], MACHINES[arch]))
                rows.append({"arch": f"sm_{arch}", "shape": shape, "backend": result["backend"],
                             "measured_ms": result["ms"], "measured_x_floor": result.get("x_floor"),
                             "predicted_ms": plan["predicted_us"] / 1e3, "predicted_x_floor": plan["ratio"]})
    return rows


def triton_or_cuda_plan(kernel, backend, rows, num_classes, machine):
    if backend == "cuda":
        return cuda_plan(kernel, rows, num_classes, False, False, machine)
    launch = kernel["launch"]
    return triton_plan(kernel, rows, num_classes, True, False, launch["block_i"], launch["block_j"],
                       launch["num_warps"], machine)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the file names (e.g. before)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the generated sm_90 table in bench/NOTES.md and docs/design.md")
    parser.add_argument("--measured", type=Path, default=None,
                        help="a bench/loss_bench.py --json file: the predictions go beside its times")
    args = parser.parse_args(argv)
    begin = time.time()
    reports = build_report(tuple(int(a) for a in args.archs.split(",")))
    print(table(reports))
    compared = beside_measured(reports, args.measured) if args.measured else None
    for row in compared or ():
        print(f"{row['arch']} {row['shape']:>10} {row['backend']:>7}: measured {row['measured_ms']:.4f} ms "
              f"({row['measured_x_floor'] or float('nan'):.2f}x floor), predicted {row['predicted_ms']:.4f} ms "
              f"({row['predicted_x_floor']:.2f}x)")
    if not args.no_write:
        date = datetime.date.today().strftime("%Y%m%d")
        meta = {"date": date, "triton": triton.__version__, "extension": str(extension_path()),
                "model": {"launch_us": LAUNCH_US, "dram_bytes_per_s": DRAM_BYTES_PER_S}}
        for arch, report in reports.items():
            path = args.out / f"static-sm_{arch}-{date}{'-' + args.tag if args.tag else ''}.json"
            extra = {"measured": [r for r in compared if r["arch"] == f"sm_{arch}"]} if compared is not None else {}
            path.write_text(json.dumps(meta | report | extra, indent=1) + "\n")
            print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if args.update_docs and 90 in reports:
        update_docs(reports[90], datetime.date.today().isoformat())
    print(f"{time.time() - begin:.0f} s")


if __name__ == "__main__":
    main()
