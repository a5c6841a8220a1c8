"""Kernel cost read from machine code, without a GPU.

    python bench/kernel_report.py [--archs 80,89,90,100,120] [--out bench/results] [--no-write] [--tag NAME]
                                  [--update-docs] [--measured bench/results/loss_cuda_float32.json]

For each architecture and every pair-kernel variant (precision x teacher mode x gradients) of the CUDA extension (the
SASS inside the built rankkd/_C*.so, for each architecture it holds) and of the Triton kernel (compiled for
GPUTarget("cuda", arch, 32) without a device), it reads registers, spills and shared memory, finds the pair loop and
counts its instructions per pair by class, plans each launch as the code would and predicts its time beside the floor
(2 MUFU tanh per unordered pair) with two models. Tools: cuobjdump from the installed triton package
(triton/backends/nvidia/bin). Writes bench/results/static-sm_<arch>-<date>.json and prints one table.

Each architecture is modelled on one GPU (MACHINES): SM count and clock of that product, per-SM residency limits and
instruction throughputs of its compute capability.

The throughput model ("old": issue 22's, kept for comparison). Per warp scheduler, from the throughput table:
  issue  1 warp instruction per clock
  MUFU   16 lanes/clk/SM: 8 clocks per warp instruction (MUFU.TANH, EX2, RCP, ...)
  FMA    FP32 add/mul/fma: 1 clock (128 lanes/clk/SM) or 2 (sm_80); IMAD: 2 (heavy FMA unit only)
  ALU    compare, select, logic, integer add/shift: 2 clocks (64 lanes/clk/SM)
  SHFL   4 clocks; LSU (loads, stores): 4 clocks; FP64: 128 / (its lanes per SM)
A loop iteration costs the largest of those; a warp's work is its loop iterations plus the code outside the loop once
per strip (CUDA) or panel (Triton), the diagonal tile included. The warps resident on an SM share its four schedulers,
each at full rate while it holds one warp or fewer (latency not counted).

The latency model ("new"). One warp scheduler issues, in order, the real instruction stream of each part of a program
(the pair loop, the code around it once per strip or panel, the code once per program and the loops in it, each loop
with its trip count from C), for the number of warps the launch plan places on it, interleaved: at most one
instruction per clock from any warp whose next instruction is ready. An instruction is ready when the registers and
predicates it reads (from its SASS operands) have been written, i.e. its producers' latencies have passed, and its unit
takes it: the FMA pipe's two 16-lane halves (one on sm_80; IMAD only on the heavy half), the ALU, the FP64 unit and the
uniform datapath start one instruction per their throughput; MUFU (and conversions), shuffles and loads/stores wait in
the MIO queue (at most `mio_queue` issued and not started) for their unit. BAR.SYNC holds its warp for `barrier`
clocks. Steady state is measured for loops (warps spread evenly over the body, as warps that arrived at different times
are), straight code is run once. A program's time at n warps per scheduler is the sum of its parts' times; an SM's
programs run at the rate its warp count gives, in the same dispatch as the old model. What a GPU does and this cannot
know are parameters, LATENCY_ASSUMPTIONS (clocks):

                     fma  alu  mufu  fp64  shuffle  shared  global_load  barrier  mio_queue
    optimistic        4    4    16     8     23       23        35          20        8
    pessimistic       5    6    24    16     32       33       300          40        2

(fma, alu: the compiler's own stall counts between dependent FP32 and integer instructions show 4-5 clocks; mufu:
16-24; shuffle, shared: a shuffle's and a shared-memory load's round trip; global_load: a hit in L1 to a hit in L2, the
rows being re-read by every panel and part.) Each is run with both warp-selection policies, greedy then oldest ("gto")
and least recently issued ("lrr"): the optimistic time is the faster of the two at the optimistic latencies, the
pessimistic the slower at the pessimistic ones. The prediction is that range. Beyond SIMULATED_WARPS warps per
scheduler a part keeps the clocks per warp it has there. Per shape the JSON also says what the model blames: the share
of the busiest program's time in each part, and in the pair loop the MUFU's busy share and the scheduler's clocks
without an issue by stall reason (wait_<latency class>, queue_<unit> for a full MIO queue, busy_<unit>, barrier); on
GOAL_ARCH the fast kernels' plans are predicted for the parts near the library's choice too (parts_sweep).

Both models: programs of a launch are dispatched in order to the first SM with a free slot (residency from registers,
shared memory, warps and blocks per SM); every launch adds LAUNCH_US and the small kernels' memory traffic at
DRAM_BYTES_PER_S. Not modelled: instruction cache, register bank conflicts, memory bandwidth of the pair kernels,
clocks below boost; in the latency model, that the MIO units share one queue in order (each starts its own
instructions), that a barrier waits for the CTA's other warps (it holds its own warp a fixed time), and warps of one
scheduler in different parts of their programs (a program's time is the sum of its parts, each run by all the warps).
The floor: 2 tanh per unordered pair at 16 MUFU lanes/clk/SM at the machine's clock.
"""
import argparse
import bisect
import collections
import concurrent.futures
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
ARCHS = (80, 89, 90, 100, 120)
SHAPES = ((64, 100), (128, 1000), (512, 1000), (64, 4096), (64, 32000))
LAUNCH_US = 2.0
DRAM_BYTES_PER_S = 2.5e12

# The GPU each architecture is predicted on. Per SM, by compute capability, from the CUDA C++ Programming Guide:
# max_warps, max_blocks, smem (resident warps, resident blocks, shared memory per SM; 65536 32-bit registers per SM on
# all of them) from its table "Technical Specifications per Compute Capability"; fp32, fp64, mufu, alu, imad, shuffle
# (results per clock per SM of 32-bit floating-point add/multiply/multiply-add, 64-bit floating point, the special
# functions (reciprocal, square root, log2, exp2, sine, cosine: the MUFU unit, which also runs tanh.approx), 32-bit
# integer add/compare/logic, 32-bit integer multiply-add, warp shuffle) from its table "Throughput of Native Arithmetic
# Instructions". Per GPU: sms from NVIDIA's product specifications, and the boost clock (sm_90: the clock at which
# 132 SMs x 16 MUFU lanes give the 4.13 T tanh/s measured on an H100 SXM; B200: as spec listings give it, NVIDIA
# publishing none). The clock scales a GPU's times and floor alike: no ratio depends on it.
MACHINES = {
    80: dict(name="A100 SXM", sms=108, clock_hz=1.41e9, max_warps=64, max_blocks=32, smem=164 * 1024,
             fp32=64, fp64=32, mufu=16, alu=64, imad=64, shuffle=32),
    89: dict(name="L40S", sms=142, clock_hz=2.52e9, max_warps=48, max_blocks=24, smem=100 * 1024,
             fp32=128, fp64=2, mufu=16, alu=64, imad=64, shuffle=32),
    90: dict(name="H100 SXM", sms=132, clock_hz=4.13e12 / (132 * 16), max_warps=64, max_blocks=32, smem=228 * 1024,
             fp32=128, fp64=64, mufu=16, alu=64, imad=64, shuffle=32),
    100: dict(name="B200", sms=148, clock_hz=1.965e9, max_warps=64, max_blocks=32, smem=228 * 1024,
              fp32=128, fp64=64, mufu=16, alu=64, imad=64, shuffle=32),
    120: dict(name="RTX 5090", sms=170, clock_hz=2.407e9, max_warps=48, max_blocks=32, smem=100 * 1024,
              fp32=128, fp64=2, mufu=16, alu=64, imad=64, shuffle=32),
}
for _machine in MACHINES.values():  # clocks per warp instruction on one of the SM's four schedulers
    _machine.update(fma_clocks=128 // _machine["fp32"], fp64_clocks=128 // _machine["fp64"],
                    mufu_clocks=128 // _machine["mufu"])
REGISTERS_PER_SM = 65536
MUFU_CLOCKS = 8
FLOOR_CLOCKS_PER_PAIR = 2 * MUFU_CLOCKS / 32  # scheduler clocks per pair: 2 MUFU per pair, 32 lanes per instruction

# The latency model's unknowns (the module docstring says where each range comes from).
LATENCY_ASSUMPTIONS = {
    "optimistic": dict(fma=4, alu=4, mufu=16, fp64=8, shuffle=23, shared=23, global_load=35, barrier=20, mio_queue=8),
    "pessimistic": dict(fma=5, alu=6, mufu=24, fp64=16, shuffle=32, shared=33, global_load=300, barrier=40,
                        mio_queue=2),
}
POLICIES = ("gto", "lrr")
SIMULATED_WARPS = 4  # warps per scheduler simulated; more keep the clocks per warp that 4 have
SIDES = tuple(LATENCY_ASSUMPTIONS)

CLASSES = ("mufu", "fp32", "fp64", "cmp_sel_logic", "integer", "shuffle", "load_store", "branch", "other")
_CLASS_OF = {}
for _cls, _ops in {
    "mufu": "MUFU",
    "fp32": "FFMA FADD FMUL FFMA32I FADD32I FMUL32I HFMA2 HADD2 HMUL2 FSWZADD FFMA2 FADD2 FMUL2",
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

Instruction = collections.namedtuple("Instruction", "address opcode operands guard")
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
    """{function: [Instruction(address, opcode, operands, guard)]} from `cuobjdump -sass`."""
    functions, current = {}, None
    for line in text.splitlines():
        name = re.match(r"\s*Function : (\S+)", line)
        if name:
            current = functions.setdefault(name.group(1), [])
            continue
        match = _INSTRUCTION.search(line)
        if match and current is not None:
            current.append(Instruction(int(match.group(1), 16), match.group(3), match.group(4).strip(),
                                       (match.group(2) or "").strip()))
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
    index = {ins.address: i for i, ins in enumerate(instructions)}
    found = []
    for i, ins in enumerate(instructions):
        if ins.opcode.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", ins.operands)
            if target and int(target.group(1), 16) < ins.address and int(target.group(1), 16) in index:
                found.append((index[int(target.group(1), 16)], i))
    return found


def _mufu_count(instructions, span):
    return sum(ins.opcode.startswith("MUFU") for ins in instructions[span[0]:span[1] + 1])


def pair_loop(instructions):
    """The pair loop: the innermost loop holding MUFU instructions (the most of them, if several; the shortest of
    those)."""
    candidates = [span for span in loops(instructions) if _mufu_count(instructions, span)]
    innermost = [span for span in candidates
                 if not any(o != span and span[0] <= o[0] and o[1] <= span[1] for o in candidates)]
    if not innermost:
        raise ValueError("no loop with MUFU instructions")
    # Equal MUFU counts: the shorter loop. The Triton fast kernel holds the pair loop twice, prescaled (every row whose
    # |k x| fits) and unscaled (2 FMUL more per pair, only for rows that would overflow); the prescaled one is the one
    # that runs.
    return max(innermost, key=lambda span: (_mufu_count(instructions, span), -(span[1] - span[0])))


def fallback_nests(instructions, pair, outer):
    """Loop nests outside the pair loop's enclosing loop that hold at least as many MUFU instructions as the pair loop:
    a second copy of the loop nest (the Triton fast kernel's unscaled one, run only for rows where k x would
    overflow). Not part of a program's cost."""
    need = _mufu_count(instructions, pair)
    found = [span for span in loops(instructions)
             if (span[1] < outer[0] or span[0] > outer[1]) and _mufu_count(instructions, span) >= need]
    return [span for span in found if not any(o != span and o[0] <= span[0] and span[1] <= o[1] for o in found)]


def classify(instructions):
    counts = dict.fromkeys(CLASSES, 0)
    mufu_ops = {}
    fma_integer = alu_integer = 0
    for ins in instructions:
        base = ins.opcode.split(".")[0]
        cls = _CLASS_OF.get(base, "other")
        counts[cls] += 1
        if cls == "mufu":
            mufu_ops[ins.opcode] = mufu_ops.get(ins.opcode, 0) + 1
        fma_integer += base in _FMA_INTEGER
        alu_integer += base in _ALU_INTEGER
    return counts, mufu_ops, fma_integer, alu_integer


def pipe_clocks(instructions, machine):
    """The throughput model: scheduler clocks of a straight run of instructions, per pipe, and the binding one."""
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


def mufu_span(code):
    """(first, last) index of the MUFU instructions of straight code, or None: the pairs evaluated outside the pair
    loop (the CUDA kernel's diagonal tile pair)."""
    marks = [i for i, ins in enumerate(code) if ins.opcode.startswith("MUFU")]
    return (marks[0], marks[-1]) if marks else None


def row_columns(body):
    """Columns of the row one trip of a loop over it covers per lane: each global load or store handles one 4-byte
    element per lane, four with .128 and two with .64 (a loop that touches two arrays per column counts each trip
    twice)."""
    columns = 0
    for ins in body:
        if ins.opcode.split(".")[0] in ("LDG", "STG", "LD", "ST"):
            suffixes = ins.opcode.split(".")
            columns += 4 if "128" in suffixes else 2 if "64" in suffixes else 1
    return columns


# ---- the latency model ----------------------------------------------------------------------------------------------

# Register slots of one warp: R0-R255, P0-P6, UR0-UR63, UP0-UP6 (RZ, PT, URZ, UPT are constants, not registers).
_REGISTER = re.compile(r"(?<![A-Za-z_])(UR|R|UP|P)(\d+)(\.64)?")
_REGISTER_BASE = {"R": 0, "P": 256, "UR": 264, "UP": 328}
_REGISTER_SLOTS = 336
_PREDICATE = re.compile(r"!?U?P(\d+|T)$")
_NO_DESTINATION = set("ST STG STS STL STSM RED REDG BRA BRX JMP JMX CALL RET EXIT BAR BSSY BSYNC WARPSYNC NOP YIELD "
                      "BPT MEMBAR FENCE ERRBAR CCTL DEPBAR KILL ENDCOLLECTIVE BMOV".split())
_TWO_DESTINATIONS = set("ISETP FSETP DSETP HSETP2 PSETP PLOP3 UISETP UFSETP UPLOP3 SHFL LOP3 ULOP3".split())
_CARRY_OUT = set("IADD3 UIADD3 LEA ULEA IMAD UIMAD IADD IADD32I".split())
_FP64 = set("DFMA DADD DMUL DMNMX DSETP".split())
# unit and latency class per opcode; units: the FMA pipe (either half), its heavy half, the ALU, FP64, the uniform
# datapath (started directly), the XU (MUFU, conversions), shuffle and LSU (through the MIO queue)
_UNIT_OF = {}
for (_unit, _latency), _ops in {
    ("xu", "mufu"): "MUFU I2F F2I F2F FRND POPC FLO BREV",
    ("fma", "fma"): "FFMA FADD FMUL FFMA32I FADD32I FMUL32I HFMA2 HADD2 HMUL2 FSWZADD",
    ("fma2", "fma"): "FFMA2 FADD2 FMUL2",
    ("fma_heavy", "fma"): "IMAD IMAD32I IMUL IMUL32I IDP",
    ("fp64", "fp64"): "DFMA DADD DMUL DMNMX DSETP",
    ("shuffle", "shuffle"): "SHFL",
    ("lsu", "shared"): "LDS LDSM ATOMS",
    ("lsu", "global_load"): "LDG LD LDL ATOM ATOMG",
    ("lsu", None): "STS STSM STG ST STL RED REDG LDGSTS",
    ("barrier", None): "BAR",
    (None, "shared"): "LDC ULDC LDCU S2R S2UR R2UR REDUX CREDUX",
}.items():
    _UNIT_OF.update((op, (_unit, _latency)) for op in _ops.split())
_MIO_UNITS = ("xu", "shuffle", "lsu")


def _registers(token, width):
    if token.lstrip("!") == "PR":  # P2R / R2P: every predicate
        return list(range(256, 263))
    found = []
    for kind, number, wide in _REGISTER.findall(token):
        count = 2 if wide else (width if kind in ("R", "UR") else 1)
        found.extend(_REGISTER_BASE[kind] + int(number) + i for i in range(count))
    return found


def operand_registers(ins):
    """(registers written, registers read) of an instruction, from its operands: the leading operand(s) are written
    (two for compares, shuffles and predicate logic, carry-out predicates after integer adds), the rest and the guard
    are read; .64 / .128 operations and FP64 read and write register pairs and quads."""
    base = ins.opcode.split(".")[0]
    operands = [o.strip() for o in ins.operands.split(",")] if ins.operands else []
    if base in _NO_DESTINATION or not operands:
        count = 0
    elif _PREDICATE.match(operands[0]) or operands[0] == "PR":
        count = 2 if base in _TWO_DESTINATIONS else 1
    else:
        count = 1
        if base in _CARRY_OUT:
            while count < len(operands) and _PREDICATE.match(operands[count]) and operands[count][0] != "!":
                count += 1
    suffixes = ins.opcode.split(".")
    wide = 4 if "128" in suffixes else 2 if ("64" in suffixes or base in _FP64 or ins.opcode.startswith("IMAD.WIDE")
                                             or (base == "CS2R" and "32" not in suffixes)) else 1
    written = [r for o in operands[:count] for r in _registers(o, wide)]
    read = _registers(ins.guard, 1)
    for k, operand in enumerate(operands[count:]):
        width = 1
        if base in _FP64 or (base in _NO_DESTINATION and not operand.startswith(("[", "desc"))):
            width = wide  # FP64 sources; the data register of a wide store
        elif ins.opcode.startswith("IMAD.WIDE") and k == 2:
            width = 2  # the 64-bit addend
        read.extend(_registers(operand, width))
    return tuple(written), tuple(sorted(set(read)))


def decode(instructions, machine):
    """Per instruction: (unit, clocks it holds the unit, latency class, registers written, registers read)."""
    holds = {"xu": machine["mufu_clocks"], "fma": 2, "fma2": 4, "fma_heavy": 128 // machine["imad"],
             "fp64": machine["fp64_clocks"], "shuffle": 128 // machine["shuffle"], "lsu": 4,
             "alu": 128 // machine["alu"], "uniform": 1, "barrier": 0, None: 0}
    decoded = []
    for ins in instructions:
        base = ins.opcode.split(".")[0]
        unit, latency = _UNIT_OF.get(base, ("uniform" if base.startswith("U") else "alu", "alu"))
        if base in _NO_DESTINATION and base != "BAR" and unit == "alu":
            unit, latency = None, None  # branches and other control: an issue slot
        if unit == "fma" and machine["fp32"] == 64:
            unit = "fma_heavy"  # one 16-lane FP32 unit per scheduler
        decoded.append((unit, holds[unit], latency, *operand_registers(ins)))
    return decoded


_RESOURCES = ("fma_heavy", "fma_lite", "alu", "fp64", "uniform", *_MIO_UNITS)
# per unit: what admits an instruction: 0 nothing, 1 either FMA half, 2 the heavy half, 3-5 that unit, 6 the MIO queue
_GATE = {None: 0, "barrier": 0, "fma": 1, "fma2": 1, "fma_heavy": 2, "alu": 3, "fp64": 4, "uniform": 5,
         **dict.fromkeys(_MIO_UNITS, 6)}


def simulate(code, warps, assumption, policy, loop, issues=2000):
    """One warp scheduler issuing decoded `code` for `warps` warps, in order per warp, at most one instruction per
    clock. loop: the warps run the code over and over, started evenly spread over it; returns the clocks one
    iteration takes per warp in steady state (measured over whole trips after the first, at least one and about
    `issues` instructions per warp in all). Otherwise every warp
    runs it once from the start; returns the clocks until the last one issued its last instruction. Also the clocks
    each unit was busy and the clocks without an issue by what held the warp that issued next (stall reasons: the
    latency class it waited on, the MIO queue of its unit, its unit, a barrier)."""
    length = len(code)
    units = [unit for unit, *_ in code]
    gates = [_GATE[unit] for unit in units]
    resource = [_RESOURCES.index(unit) if unit in _RESOURCES else -1 for unit in units]
    holds = [h for _, h, *_ in code]
    latency = {**assumption, None: 0}
    result_latency = [latency[cls] for _, _, cls, _, _ in code]
    classes = [cls for _, _, cls, _, _ in code]
    written = [w for *_, w, _ in code]
    read = [r for *_, r in code]
    depth = assumption["mio_queue"]
    hold_barrier = assumption["barrier"]
    free = [0] * len(_RESOURCES)
    busy = collections.Counter()
    stalls = collections.Counter()
    queued = []  # start times of the latest MIO instructions issued, ascending
    ready = [[0] * _REGISTER_SLOTS for _ in range(warps)]
    producer = [[None] * _REGISTER_SLOTS for _ in range(warps)]
    pc = [w * length // warps if loop else 0 for w in range(warps)]  # index into code
    warm, stop = length * warps, max(2, -(-issues // length)) * length * warps  # loop: the window, in issues
    next_ok = [0] * warps
    last_issue = [-1] * warps
    operands_ready = [0] * warps
    waited_on = [None] * warps
    earliest = [0] * warps
    left = [length] * warps
    clock = issued = window = 0
    last = -1
    active = list(range(warps))
    gto = policy == "gto"

    def fetch(w):
        registers, best, why = ready[w], 0, None
        for r in read[pc[w]]:
            if registers[r] > best:
                best, why = registers[r], r
        operands_ready[w] = best
        waited_on[w] = producer[w][why] if why is not None else None

    for w in active:
        fetch(w)
    while active:
        gate = (0, min(free[0], free[1]), free[0], free[2], free[3], free[4],
                queued[-depth] if len(queued) >= depth else 0)
        first = None
        for w in active:
            e = next_ok[w]
            if operands_ready[w] > e:
                e = operands_ready[w]
            g = gate[gates[pc[w]]]
            if g > e:
                e = g
            earliest[w] = e
            if first is None or e < first:
                first = e
        t = first if first > clock else clock
        if gto:
            w = last if last >= 0 and last in active and earliest[last] <= t else next(
                w for w in active if earliest[w] <= t)
        else:
            w = min((w for w in active if earliest[w] <= t), key=last_issue.__getitem__)
        k = pc[w]
        unit = units[k]
        if t > clock:
            if operands_ready[w] >= earliest[w]:
                stalls[f"wait_{waited_on[w]}"] += t - clock
            elif next_ok[w] >= earliest[w]:
                stalls["barrier"] += t - clock
            else:
                stalls[f"queue_{unit}" if gates[k] == 6 else f"busy_{unit}"] += t - clock
        start = t
        gate_kind = gates[k]
        if gate_kind == 6:
            r = resource[k]
            start = max(t, free[r])
            free[r] = start + holds[k]
            bisect.insort(queued, start)
            del queued[:-depth]
        elif gate_kind == 1:
            free[0 if free[0] <= free[1] else 1] = t + holds[k]
        elif gate_kind:
            free[resource[k]] = t + holds[k]
        if holds[k]:
            busy["fma" if unit.startswith("fma") else unit] += holds[k]
        value = start + result_latency[k]
        registers, producers, cls = ready[w], producer[w], classes[k]
        for r in written[k]:
            registers[r] = value
            producers[r] = cls
        next_ok[w] = t + hold_barrier if unit == "barrier" else t + 1
        last_issue[w] = t
        last = w
        clock = t + 1
        issued += 1
        pc[w] = k + 1 if k + 1 < length else 0
        if loop:
            if issued == warm:
                window = clock
                stalls.clear()
                busy.clear()
            elif issued == stop:
                break
        else:
            left[w] -= 1
            if not left[w]:
                active.remove(w)
                continue
        fetch(w)
    span = clock - window
    result = dict(busy=dict(busy), stalls=dict(stalls), span=span)
    if loop:
        return dict(result, clocks=span * warps * length / (stop - warm))
    return dict(result, clocks=span)


# ---- a kernel: its parts, their cost in each model ------------------------------------------------------------------

class KernelModel:
    """The parts of a kernel's programs, each with its code, its clocks in the throughput model and (simulated on
    demand, per warps per scheduler) in the latency model:
      loop      one trip of the pair loop
      trip      once per trip of the loop around it (a CUDA strip, a Triton panel), less the diagonal
      diagonal  the pairs evaluated outside the pair loop on a CUDA strip's diagonal tile pair (from its first to its
                last MUFU instruction); part of trip for Triton, whose diagonal block always runs whole
      program   once per program: the code outside the loop nest, less the loops and the unscaled copy of the nest
      row_loop_<i>  a loop before the nest over the row (the zero fill, the row pass; row_columns says how far a trip
                goes)
    Loops after the nest rewrite a row with NaN, which only a non-finite logit does, and loops holding MUFU
    instructions outside it evaluate rows that scaling would overflow: left out. The remainder loop of an unrolled one
    (a few trips at most) is counted as if it swept the row too, and so is each copy of a loop the compiler duplicated
    onto two paths (the CUDA kernel's zero fill): a few dozen clocks per program at most."""

    def __init__(self, instructions, machine, split_diagonal):
        first, last = pair_loop(instructions)
        self.pair = (first, last)
        all_loops = loops(instructions)
        enclosing = [span for span in all_loops if span[0] <= first and last <= span[1] and span != (first, last)]
        outer = min(enclosing, key=lambda span: span[1] - span[0]) if enclosing else None
        body = instructions[first:last + 1]
        if outer:
            trip = instructions[outer[0]:first] + instructions[last + 1:outer[1] + 1]
            skip = fallback_nests(instructions, (first, last), outer)
            program = [ins for i, ins in enumerate(instructions)
                       if not outer[0] <= i <= outer[1] and not any(a <= i <= b for a, b in skip)]
            nest = outer
        else:
            trip, program, skip, nest = instructions[:first] + instructions[last + 1:], [], [], (first, last)
        self.old_trip_code, self.old_program_code = trip, program
        span = mufu_span(trip) if outer and split_diagonal else None
        diagonal = trip[span[0]:span[1] + 1] if span else []
        trip_rest = trip[:span[0]] + trip[span[1] + 1:] if span else trip
        # The program's own loops: outside the nest, none holding MUFU instructions or inside a loop that does (the
        # CUDA kernel's unscaled rows, the Triton kernel's unscaled nest).
        outside = [s for s in all_loops if s[1] < nest[0] or s[0] > nest[1]]
        rare = [s for s in outside if _mufu_count(instructions, s)]
        own = [s for s in outside if not any(a <= s[0] and s[1] <= b for a, b in rare)]
        outermost = [s for s in own if not any(o != s and o[0] <= s[0] and s[1] <= o[1] for o in own)]
        in_loops = {i for a, b in outside for i in range(a, b + 1)}
        straight = ([ins for i, ins in enumerate(instructions)
                     if not nest[0] <= i <= nest[1] and i not in in_loops and not any(a <= i <= b for a, b in skip)]
                    if outer else [])
        self.parts = {"loop": (body, True), "trip": (trip_rest, False), "diagonal": (diagonal, False),
                      "program": (straight, False)}
        self.row_loops = {}  # name: columns per lane per trip
        for i, (a, b) in enumerate(sorted(s for s in outermost if s[1] < nest[0])):
            name = f"row_loop_{i}"
            self.parts[name] = (instructions[a:b + 1], True)
            self.row_loops[name] = row_columns(instructions[a:b + 1])
        self.decoded = {name: decode(code, machine) for name, (code, _) in self.parts.items()}
        self.bound = {name: max(pipe_clocks(code, machine)[0].values()) if code else 0
                      for name, (code, _) in self.parts.items()}
        self.cache = {}

    def clocks(self, name, warps, side):
        """Clocks for `warps` warps on one scheduler to each run part `name` once (a loop: one trip, steady state):
        the faster policy at the optimistic latencies, the slower at the pessimistic ones. Beyond SIMULATED_WARPS a
        part keeps the clocks per warp it has there (the pipes are as busy as the code lets them be)."""
        if warps > SIMULATED_WARPS:
            result = self.clocks(name, SIMULATED_WARPS, side)
            return dict(result, clocks=result["clocks"] * warps / SIMULATED_WARPS)
        key = (name, warps, side)
        if key not in self.cache:
            code, is_loop = self.parts[name]
            if not code:
                self.cache[key] = dict(clocks=0.0, busy={}, stalls={}, span=0)
            else:
                issues = 2000 if name == "loop" else 200
                runs = [simulate(self.decoded[name], warps, LATENCY_ASSUMPTIONS[side], policy, is_loop, issues)
                        for policy in POLICIES]
                pick = min if side == "optimistic" else max
                result = pick(runs, key=lambda run: run["clocks"])
                # Warps issue unevenly within a window: it can come out a few clocks under the pipes' bound.
                self.cache[key] = dict(result, clocks=max(result["clocks"], warps * self.bound[name]))
        return self.cache[key]

    def program_clocks(self, counts, warps, side):
        return sum(n * self.clocks(name, warps, side)["clocks"] for name, n in counts.items() if n)

    def row_loop_counts(self, num_classes, warps_per_program):
        """Trips of each loop over a row of C channels (one trip where the loop touches no global memory)."""
        return {name: -(-num_classes // (32 * warps_per_program * columns)) if columns else 1
                for name, columns in self.row_loops.items()}


def analyse(instructions, resources, pairs_per_iteration, machine, split_diagonal=False):
    """Resources, the pair loop per pair by class and the throughput model's clocks of the code around it (once per
    trip of the loop that encloses it, once per program); and the KernelModel both models plan launches with
    (split_diagonal: see KernelModel)."""
    model = KernelModel(instructions, machine, split_diagonal)
    first, last = model.pair
    body = instructions[first:last + 1]
    counts, mufu_ops, _, _ = classify(body)
    pipes, bound = pipe_clocks(body, machine)

    def spills(code):
        return sum(ins.opcode.split(".")[0] in ("LDL", "STL") for ins in code)

    loop_clocks = pipes[bound]
    per_trip = max(pipe_clocks(model.old_trip_code, machine)[0].values())
    diagonal = model.bound["diagonal"]
    per_program = max(pipe_clocks(model.old_program_code, machine)[0].values()) if model.old_program_code else 0
    floor_clocks = FLOOR_CLOCKS_PER_PAIR * 32 * pairs_per_iteration
    summary = {
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
        "loop_vs_floor": round(loop_clocks / floor_clocks, 4),
        "per_trip_instructions": len(model.old_trip_code),
        "per_trip_mufu_span_clocks": diagonal,
        "per_trip_clocks": per_trip,
        "per_program_clocks": per_program,
        "parts": {name: {"instructions": len(code), "loop": is_loop, "throughput_clocks": model.bound[name],
                         **({"columns_per_lane": model.row_loops[name]} if name in model.row_loops else {})}
                  for name, (code, is_loop) in model.parts.items()},
        # the pair loop alone with 1 and 2 warps per scheduler, the latency model's range over the floor
        "loop_latency_vs_floor": {
            warps: [round(model.clocks("loop", warps, side)["clocks"] / (warps * floor_clocks), 4) for side in SIDES]
            for warps in (1, 2)},
    }
    return summary, model


def residency(registers, shared, warps, machine):
    """Programs (CTAs) of `warps` warps resident per SM: registers are allocated per warp in units of 256."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = REGISTERS_PER_SM // per_warp // warps
    by_shared = machine["smem"] // (shared + 1024)
    return max(1, min(by_registers, machine["max_warps"] // warps, machine["max_blocks"], by_shared))


def makespan(programs, warps, resident, sms, rate):
    """Clocks until the last program ends: programs start in order on the first SM with a free slot (the first ones
    breadth-first). rate(program, warps on its SM): the share of the program done per clock while the SM holds that
    many warps."""
    queue = iter(programs)
    active = [[] for _ in range(sms)]  # [program, share left, how many] of the programs on the SM, started alike
    count = [0] * sms  # programs on the SM
    updated = [0.0] * sms
    version = [0] * sms
    events = []
    rates = {}

    def start(sm, how_many):
        for _ in range(how_many):
            program = next(queue, None)
            if program is None:
                return
            count[sm] += 1
            for group in active[sm]:
                if group[0] == program and group[1] == 1.0:
                    group[2] += 1
                    break
            else:
                active[sm].append([program, 1.0, 1])

    def rates_on(sm):
        key = warps * count[sm]
        return {p: rates[p, key] if (p, key) in rates else rates.setdefault((p, key), rate(p, key))
                for p, _, _ in active[sm]}

    def schedule(sm, now):
        version[sm] += 1
        if active[sm]:
            rate_of = rates_on(sm)
            heapq.heappush(events, (now + min(left / rate_of[p] for p, left, _ in active[sm]), sm, version[sm]))

    for _ in range(resident):
        for sm in range(sms):
            start(sm, 1)
    for sm in range(sms):
        schedule(sm, 0.0)
    end = 0.0
    while events:
        now, sm, seen = heapq.heappop(events)
        if seen != version[sm]:
            continue
        rate_of = rates_on(sm)
        elapsed = now - updated[sm]
        updated[sm] = now
        running = []
        for group in active[sm]:
            group[1] -= elapsed * rate_of[group[0]]
            if group[1] > 1e-9:  # else finished, up to rounding
                running.append(group)
            else:
                count[sm] -= group[2]
        finished = sum(g[2] for g in active[sm]) - sum(g[2] for g in running)
        active[sm] = running
        start(sm, finished)
        end = now
        schedule(sm, now)
    return end


def per_scheduler(warps_on_sm):
    """Warps on each of an SM's four schedulers, as evenly as they go."""
    return [warps_on_sm // 4 + (s < warps_on_sm % 4) for s in range(4)]


def floor_us(rows, num_classes, machine):
    pairs = rows * num_classes * (num_classes - 1) / 2
    return pairs * 2 / (16 * machine["sms"] * machine["clock_hz"]) * 1e6


def predict(model, kinds, old_costs, programs, warps, resident, rows, num_classes, launches, small_kernel_bytes,
            machine, full=True):
    """Both models' prediction for one launch plan (full=False: the latency model's range alone). kinds: the distinct
    programs, as {part: times run}, and their clocks in the throughput model; programs: the launch's programs in
    dispatch order, as indices into kinds."""
    sms = machine["sms"]
    floor = floor_us(rows, num_classes, machine)
    extra_us = launches * LAUNCH_US + small_kernel_bytes / DRAM_BYTES_PER_S * 1e6
    useful = rows * num_classes * (num_classes - 1) / 2
    first_wave = min(resident, -(-len(programs) // sms)) * warps  # warps on an SM while the launch fills the GPU
    plan = {
        "programs": len(programs),
        "warps_per_program": warps,
        "resident_per_sm": resident,
        "warps_per_scheduler": round(first_wave / 4, 2),
        "waves": round(len(programs) / (resident * sms), 3),
        "sms_used": min(len(programs), sms),
        "launches": launches,
        "floor_us": round(floor, 3),
    }
    if full:
        old_cost = [max(1.0, cost) for cost in old_costs]

        def old_rate(p, on_sm):
            return min(1.0, 4.0 / on_sm) / old_cost[p]

        clocks = makespan(programs, warps, resident, sms, old_rate)
        work = sum(old_cost[p] for p in programs) * warps  # scheduler clocks over all warps
        old_us = clocks / machine["clock_hz"] * 1e6
        plan["old"] = {
            "work_vs_useful": round(work / (useful * FLOOR_CLOCKS_PER_PAIR), 4),
            "balance": round(clocks * sms * 4 / work, 4),
            "pair_kernel_us": round(old_us, 3),
            "predicted_us": round(old_us + extra_us, 3),
            "ratio": round((old_us + extra_us) / floor, 3),
        }
    new = {"pair_kernel_us": [], "predicted_us": [], "ratio": []}
    for side in SIDES:
        times = {}

        def new_rate(p, on_sm):
            if (p, on_sm) not in times:
                # the program's warps are on every scheduler alike: the mean of the warps' rates
                times[p, on_sm] = sum(n / on_sm / model.program_clocks(kinds[p], n, side)
                                      for n in per_scheduler(on_sm) if n)
            return times[p, on_sm]

        us = makespan(programs, warps, resident, sms, new_rate) / machine["clock_hz"] * 1e6
        new["pair_kernel_us"].append(round(us, 3))
        new["predicted_us"].append(round(us + extra_us, 3))
        new["ratio"].append(round((us + extra_us) / floor, 3))
    plan["new"] = new | (explain(model, kinds, programs, first_wave) if full else {})
    return plan


def explain(model, kinds, programs, first_wave):
    """What the latency model blames, at the warps per scheduler of the launch's first wave: the share of the
    busiest program's time in each part (pessimistic), and in the pair loop the MUFU unit's busy share and the clocks
    without an issue by stall reason (share of the loop's clocks)."""
    warps = max(1, round(first_wave / 4))
    side = "pessimistic"
    busiest = max(set(programs), key=lambda p: model.program_clocks(kinds[p], warps, side))
    total = model.program_clocks(kinds[busiest], warps, side)
    loop = {s: model.clocks("loop", warps, s) for s in SIDES}
    stalls = loop[side]["stalls"]
    return {
        "at_warps_per_scheduler": warps,
        "time_in_part": {name: round(n * model.clocks(name, warps, side)["clocks"] / total, 3)
                         for name, n in kinds[busiest].items() if n},
        "loop_mufu_busy": [round(loop[s]["busy"].get("xu", 0) / loop[s]["span"], 3) for s in SIDES],
        "loop_stalls": {reason: round(clocks / loop[side]["span"], 3)
                        for reason, clocks in sorted(stalls.items(), key=lambda kv: -kv[1]) if clocks},
    }


# ---- CUDA: the extension's SASS and its launch plan (mirrors csrc/kendall_cuda.cu) ----------------------------------

CUDA_TILE, CUDA_WARPS, CUDA_PAIRS_PER_LANE = 64, 4, 32
# The diagonal tile pair's column groups rotate over the warps (kendall_pairs.cuh), so each scheduler carries their
# mean, (2 + 4 + 6 + 8) / 4 of the 8 row slots that the straight-line SASS holds.
CUDA_DIAGONAL_SHARE = 5 / 8
CUDA_MAX_CTAS_PER_SM = 4  # kMaxCtasPerSm of parts_per_row


def cuda_parts_per_row(rows, pairs_per_row, bytes_per_slice, sms):
    """parts_per_row of csrc/kendall_cuda.cu."""
    parts = max(1, CUDA_MAX_CTAS_PER_SM * sms // rows)
    parts = min(parts, pairs_per_row)
    parts = min(parts, max(1, (256 << 20) // max(1, rows * bytes_per_slice)))
    return max(1, min(parts, (2**31 - 1) // rows))


def cuda_strip_work(tiles, first, end):
    """(off-diagonal tile pairs, strips, diagonal tile pairs) of the tile-pair range [first, end) of a row
    (strip_containing): a strip's diagonal tile pair runs where the range holds its first tile pair."""
    h = tiles // 2
    long_length = h + 1
    long_pairs = tiles * long_length if tiles % 2 else h * long_length
    off_diagonal = strips = diagonals = 0
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
        diagonals += d0 == 0
        idx = strip_first + d1
    return off_diagonal, strips, diagonals


def cuda_plan(summary, model, rows, num_classes, grad_teacher, double, machine, parts=None, full=True):
    tiles = -(-num_classes // CUDA_TILE)
    pairs_per_row = tiles * (tiles + 1) // 2
    size = 8 if double else 4
    if parts is None:
        parts = cuda_parts_per_row(rows, pairs_per_row, num_classes * size * (2 if grad_teacher else 1),
                                   machine["sms"])
    # the throughput model charges every strip the diagonal's mean share, as it always has
    per_strip = summary["per_trip_clocks"] - (1 - CUDA_DIAGONAL_SHARE) * summary["per_trip_mufu_span_clocks"]
    row_loops = model.row_loop_counts(num_classes, CUDA_WARPS)
    kinds, old_costs = [], []
    for part in range(parts):
        off_diagonal, strips, diagonals = cuda_strip_work(tiles, part * pairs_per_row // parts,
                                                          (part + 1) * pairs_per_row // parts)
        kinds.append(dict(loop=off_diagonal, trip=strips, diagonal=diagonals * CUDA_DIAGONAL_SHARE, program=1,
                          **row_loops))
        old_costs.append(off_diagonal * summary["loop_clocks"] + strips * per_strip + summary["per_program_clocks"])
    programs = [part for _ in range(rows) for part in range(parts)]  # CTA = row * parts + part
    grads = 2 if grad_teacher else 1
    # prepare reads both inputs and writes both padded rows; finalize reads the parts' slices and writes the outputs.
    small = (rows * (2 * num_classes * 4 + 2 * tiles * CUDA_TILE * size)
             + rows * num_classes * size * grads * (parts + 1))
    resident = residency(summary["registers"], summary["shared"], CUDA_WARPS, machine)
    return {"parts": parts} | predict(model, kinds, old_costs, programs, CUDA_WARPS, resident, rows, num_classes, 3,
                                      small, machine, full)


def cuda_kernels(arch, workdir):
    """{variant: (instructions, resources)} of the extension's pair kernels for sm_<arch>."""
    found = {}
    for cubin in workdir.glob("*.cubin"):
        if not re.search(rf"\.sm_{arch}a?\.cubin$", cubin.name):
            continue
        dump = run_tool(tool("cuobjdump"), "-res-usage", "-sass", str(cubin))
        sass, resources = parse_sass(dump), parse_resources(dump)
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


def triton_plan(summary, model, rows, num_classes, grad_s, grad_t, block_i, block_j, num_warps, machine, parts=None,
                full=True):
    resident = residency(summary["registers"], summary["shared"], num_warps, machine)
    if parts is None:
        parts = triton_kendall.num_parts(rows, num_classes, block_i, num_warps, machine["sms"])
    n_panels = -(-num_classes // block_i)
    row_loops = model.row_loop_counts(num_classes, num_warps)
    kinds, old_costs = [], []
    for part in range(parts):
        loop_blocks = panels = 0
        for deal in range(-(-n_panels // parts)):
            panel = deal * parts + (part if deal % 2 == 0 else parts - 1 - part)
            if panel < n_panels:
                # The diagonal block is per-trip code; the loop runs the blocks after it, the one crossing C included.
                loop_blocks += -(-(num_classes - panel * block_i) // block_j) - 1
                panels += 1
        kinds.append(dict(loop=loop_blocks, trip=panels, program=1, **row_loops))
        old_costs.append(summary["per_program_clocks"] + loop_blocks * summary["loop_clocks"]
                         + panels * summary["per_trip_clocks"])
    grads = int(grad_s) + int(grad_t)
    small = 0 if parts == 1 else rows * num_classes * 4 * grads * (parts + 1)
    programs = [part for part in range(parts) for _ in range(rows)]  # grid (rows, parts): rows fastest
    return {"parts": parts} | predict(model, kinds, old_costs, programs, num_warps, resident, rows, num_classes,
                                      1 + (parts > 1), small, machine, full)


# ---- the report -----------------------------------------------------------------------------------------------------

GOAL_KERNELS = ("cuda-float32-fast-tanh-grad_s", "triton-float32-fast-tanh-grad_s")
GOAL_ARCH = 90
SWEEP_PARTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def extension_path():
    found = sorted((REPO / "rankkd").glob("_C*.so"))
    return found[0] if found else None


def extension_archs(extension):
    """The SASS and PTX architectures the built extension holds (cuobjdump -lelf / -lptx)."""
    if extension is None:
        return {"sass": [], "ptx": []}
    listed = {kind: run_tool(tool("cuobjdump"), f"-l{kind}", str(extension)) for kind in ("elf", "ptx")}
    return {"sass": sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.cubin", listed["elf"])}),
            "ptx": sorted({int(a) for a in re.findall(r"\.sm_(\d+)a?\.ptx", listed["ptx"])})}


def sweep(plan, chosen, limit):
    """The latency model's range over the floor for the numbers of parts near the one the launch takes (from a
    quarter to four times it; the goal kernels on GOAL_ARCH): whether the library's choice is the one the model
    likes."""
    candidates = sorted({p for p in SWEEP_PARTS if chosen / 4 <= p <= min(limit, 4 * chosen)} | {chosen})
    return {str(p): plan(p)["new"]["ratio"] for p in candidates}


def report_arch(arch, workdir, shapes=SHAPES):
    machine = MACHINES[arch]
    kernels = {}
    for variant, (instructions, resources) in sorted(cuda_kernels(arch, workdir).items()):
        summary, model = analyse(instructions, resources, CUDA_PAIRS_PER_LANE, machine, split_diagonal=True)
        grad_t, double = variant.endswith("grad_st"), variant.startswith("float64")
        summary["shapes"] = {f"{r}x{c}": cuda_plan(summary, model, r, c, grad_t, double, machine) for r, c in shapes}
        name = f"cuda-{variant}"
        if name in GOAL_KERNELS and arch == GOAL_ARCH:
            for r, c in SHAPES:
                tiles = -(-c // CUDA_TILE)
                shape = summary["shapes"][f"{r}x{c}"]
                shape["parts_sweep"] = sweep(
                    lambda p: cuda_plan(summary, model, r, c, grad_t, double, machine, p, full=False),
                    shape["parts"], tiles * (tiles + 1) // 2)
        kernels[name] = summary
    for precision, mode, grad_s, grad_t in TRITON_VARIANTS:
        cubin, block_i, block_j, num_warps = triton_compile(arch, precision, mode, grad_s, grad_t)
        path = workdir / f"triton-{arch}.cubin"
        path.write_bytes(cubin)
        dump = run_tool(tool("cuobjdump"), "-res-usage", "-sass", str(path))
        (name, instructions), = parse_sass(dump).items()
        resources = parse_resources(dump)[name]
        summary, model = analyse(instructions, resources, block_i * block_j // (32 * num_warps), machine)
        summary["launch"] = dict(block_i=block_i, block_j=block_j, num_warps=num_warps)

        def plan(r, c, parts=None, full=True):
            return triton_plan(summary, model, r, c, grad_s, grad_t, block_i, block_j, num_warps, machine, parts,
                               full)

        summary["shapes"] = {f"{r}x{c}": plan(r, c) for r, c in shapes}
        name = f"triton-float32-{precision}-{mode}-" + ("grad_st" if grad_t else "grad_s")
        if name in GOAL_KERNELS and arch == GOAL_ARCH:
            for r, c in SHAPES:
                shape = summary["shapes"][f"{r}x{c}"]
                limit = max(1, min(triton_kendall.MAX_PARTS, -(-c // block_i) // 2))
                shape["parts_sweep"] = sweep(lambda p: plan(r, c, p, full=False), shape["parts"], limit)
        kernels[name] = summary
    return {"arch": f"sm_{arch}", "machine": machine | {"floor": "2 MUFU tanh per unordered pair"},
            "kernels": kernels}


def build_report(archs=ARCHS, shapes=SHAPES):
    """{arch: report} for the given architectures and shapes (SHAPES and more), one process per architecture (two at a
    time); CUDA kernels only where the extension holds their SASS."""
    unknown = [arch for arch in archs if arch not in MACHINES]
    if unknown:
        raise SystemExit(f"kernel_report: no machine model for sm_{unknown[0]}; known: "
                         + ", ".join(f"sm_{arch}" for arch in MACHINES))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        extension = extension_path()
        if extension is not None:
            subprocess.run([tool("cuobjdump"), "-xelf", "all", str(extension)], cwd=workdir, check=True,
                           capture_output=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=min(2, len(archs))) as pool:
            jobs = {arch: pool.submit(report_arch, arch, workdir, shapes) for arch in archs}
            return {arch: job.result() for arch, job in jobs.items()}


def _ratios(plan):
    low, high = plan["new"]["ratio"]
    return f"{plan['old']['ratio']:.2f} {low:.2f}-{high:.2f}"


def table(reports):
    shapes = [f"{r}x{c}" for r, c in SHAPES]
    header = (f"{'arch':6} {'kernel':33} {'reg':>4} {'spill':>6} {'smem':>5} {'ins/pr':>6} {'mufu':>4} "
              f"{'bound':>6} {'loop':>4} {'1 warp':>9} " + " ".join(f"{s:>14}" for s in shapes))
    lines = [header, "-" * len(header)]
    for arch, report in reports.items():
        for name, kernel in report["kernels"].items():
            mufu = sum(kernel["mufu_per_pair"].values())
            spill = f"{kernel['loop_spill_instructions']}/{kernel['spill_instructions']}"
            one_warp = "{:.2f}-{:.2f}".format(*kernel["loop_latency_vs_floor"][1])
            lines.append(
                f"sm_{arch:<3} {name.replace('-float32', ''):33} {kernel['registers']:>4} {spill:>6} "
                f"{kernel['shared']:>5} {kernel['instructions_per_pair']:>6.2f} {mufu:>4.1f} {kernel['loop_bound']:>6} "
                f"{kernel['loop_vs_floor']:>4.2f} {one_warp:>9} "
                + " ".join(f"{_ratios(kernel['shapes'][s]):>14}" for s in shapes))
    lines.append("spill: in the pair loop / in the kernel; ins/pr: pair-loop instructions per pair; loop: the "
                 "throughput model's bound over the 2-MUFU floor; 1 warp: the latency model's with one warp per "
                 "scheduler; shapes: predicted time over the floor, launches included, throughput model then the "
                 "latency model's range")
    return "\n".join(lines)


DOC_BEGIN, DOC_END = "<!-- kernel_report:begin -->", "<!-- kernel_report:end -->"
DOCS = (REPO / "bench" / "NOTES.md", REPO / "docs" / "design.md")


def markdown(reports, date):
    """The tables that bench/NOTES.md and docs/design.md hold between DOC_BEGIN and DOC_END: every float32 kernel on
    sm_90, and the fast kernels (tanh teacher, student gradient) on every architecture."""
    shapes = [f"{r}x{c}" for r, c in SHAPES[1:4]]
    archs = ", ".join(f"sm_{arch} {report['machine']['name']}" for arch, report in reports.items())
    lines = [f"Generated by `python bench/kernel_report.py --update-docs` ({date}) for", f"{archs};",
             "predicted, not measured. Times over the 2-MUFU floor, launches included: the throughput model's, then",
             "the latency model's range (optimistic-pessimistic). spills: in the pair loop / in the kernel. Per pair:",
             "pair-loop instructions, MUFU, FP32 and compare/select/logic; /SM: programs resident per SM; loop: its",
             "bound over the floor (throughput model; latency model with one warp per scheduler); all float32.", ""]
    if 90 in reports:
        report = reports[90]
        lines += [f"sm_90 ({report['machine']['name']}):", "",
                  "| kernel | reg | spills | /SM | ins/pair | MUFU | FP32 | cmp/sel | bound | loop | 1 warp | "
                  + " | ".join(shapes) + " |",
                  "|---" * (11 + len(shapes)) + "|"]
        for name, kernel in report["kernels"].items():
            if name.startswith("cuda-float64"):
                continue
            per_pair, plan = kernel["per_pair"], kernel["shapes"]
            lines.append(
                f"| {name.replace('-float32', '')} | {kernel['registers']} | "
                f"{kernel['loop_spill_instructions']}/{kernel['spill_instructions']} | "
                f"{plan[shapes[0]]['resident_per_sm']} | {kernel['instructions_per_pair']:.2f} | "
                f"{sum(kernel['mufu_per_pair'].values()):.2f} | {per_pair['fp32']:.2f} | "
                f"{per_pair['cmp_sel_logic']:.2f} | {kernel['loop_bound']} | {kernel['loop_vs_floor']:.2f} | "
                + "{:.2f}-{:.2f} | ".format(*kernel["loop_latency_vs_floor"][1])
                + " | ".join(_ratios(plan[s]).replace(" ", " / ") for s in shapes) + " |")
        lines.append("")
    lines += ["Fast precision, tanh teacher, student gradient, per architecture (parts per row / warps per scheduler):",
              "", "| arch | GPU | kernel | " + " | ".join(shapes) + " |", "|---" * (3 + len(shapes)) + "|"]
    for arch, report in reports.items():
        for name in GOAL_KERNELS:
            kernel = report["kernels"].get(name)
            if kernel is None:
                continue
            cells = [f"{_ratios(kernel['shapes'][s]).replace(' ', ' / ')} ({kernel['shapes'][s]['parts']} / "
                     f"{kernel['shapes'][s]['warps_per_scheduler']:g})" for s in shapes]
            lines.append(f"| sm_{arch} | {report['machine']['name']} | {name.split('-')[0]} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_docs(reports, date):
    for path in DOCS:
        text = path.read_text()
        if DOC_BEGIN not in text:
            continue
        head, rest = text.split(DOC_BEGIN, 1)
        _, tail = rest.split(DOC_END, 1)
        path.write_text(f"{head}{DOC_BEGIN}\n{markdown(reports, date)}\n{DOC_END}{tail}")
        print(f"updated {path.relative_to(REPO)}")


def beside_measured(reports, measured_path):
    """Rows of (arch, shape, backend, measured ms and x floor, both models' predicted ms and x floor) for the shapes
    that bench/loss_bench.py measured (fast tanh teacher, student gradient: what the benchmark times)."""
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
                plan = kernel["shapes"][shape]
                rows.append({"arch": f"sm_{arch}", "shape": shape, "backend": result["backend"],
                             "measured_ms": result["ms"], "measured_x_floor": result.get("x_floor"),
                             "predicted_ms": plan["old"]["predicted_us"] / 1e3,
                             "predicted_x_floor": plan["old"]["ratio"],
                             "latency_model_ms": [round(us / 1e3, 6) for us in plan["new"]["predicted_us"]],
                             "latency_model_x_floor": plan["new"]["ratio"]})
    return rows


def measured_shapes(measured_path):
    """The (rows, C) shapes a bench/loss_bench.py --json file timed."""
    measured = json.loads(Path(measured_path).read_text())
    return tuple(tuple(entry["shape"]) for entry in measured["shapes"] if len(entry["shape"]) == 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--tag", default="", help="appended to the file names (e.g. before)")
    parser.add_argument("--update-docs", action="store_true",
                        help="rewrite the generated tables in bench/NOTES.md and docs/design.md")
    parser.add_argument("--measured", type=Path, default=None,
                        help="a bench/loss_bench.py --json file: the predictions go beside its times")
    args = parser.parse_args(argv)
    begin = time.time()
    try:
        archs = tuple(int(a) for a in args.archs.split(","))
    except ValueError:
        raise SystemExit(f"kernel_report: --archs takes comma-separated integers such as 90,100, got {args.archs!r}")
    extra = measured_shapes(args.measured) if args.measured else ()
    reports = build_report(archs, SHAPES + tuple(s for s in extra if s not in SHAPES))
    print(table(reports))
    compared = beside_measured(reports, args.measured) if args.measured else None
    for row in compared or ():
        print(f"{row['arch']} {row['shape']:>10} {row['backend']:>7}: measured {row['measured_ms']:.4f} ms "
              f"({row['measured_x_floor'] or float('nan'):.2f}x floor), predicted {row['predicted_ms']:.4f} ms "
              f"({row['predicted_x_floor']:.2f}x; latency model {row['latency_model_x_floor'][0]:.2f}-"
              f"{row['latency_model_x_floor'][1]:.2f}x)")
    if not args.no_write:
        date = datetime.date.today().strftime("%Y%m%d")
        extension = extension_path()
        meta = {"date": date, "triton": triton.__version__, "extension": str(extension),
                "extension_archs": extension_archs(extension),
                "model": {"launch_us": LAUNCH_US, "dram_bytes_per_s": DRAM_BYTES_PER_S,
                          "latency_assumptions": LATENCY_ASSUMPTIONS, "policies": POLICIES}}
        for arch, report in reports.items():
            path = args.out / f"static-sm_{arch}-{date}{'-' + args.tag if args.tag else ''}.json"
            extra_rows = ({"measured": [r for r in compared if r["arch"] == f"sm_{arch}"]}
                          if compared is not None else {})
            path.write_text(json.dumps(meta | report | extra_rows, indent=1) + "\n")
            print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    if args.update_docs:
        update_docs(reports, datetime.date.today().isoformat())
    print(f"{time.time() - begin:.0f} s")


if __name__ == "__main__":
    main()
