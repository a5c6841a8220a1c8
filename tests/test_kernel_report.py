"""bench/kernel_report.py: the kernels' cost read from their machine code, so that a change that costs speed fails on a
machine without a GPU. The goals are sm_90, fast precision, predicted by the report's latency model (not timed)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))
kernel_report = pytest.importorskip("kernel_report")

if not (kernel_report.TOOLS / "cuobjdump").exists():
    pytest.skip("this triton package ships no cuobjdump", allow_module_level=True)

# The report runs in full for sm_90, the goals' architecture; the others have their machine code checked
# (machine_code), to keep this file's time.
REPORTED_ARCHS = (90,)

# Predicted time over the 2-MUFU floor, sm_90, fast precision, tanh teacher, student gradient: the upper end of the
# latency model's range (pessimistic latencies, the slower warp-selection policy). Issue 27's goals for it: CUDA <= 1.25
# (512x1000) and <= 1.10 (64x4096), Triton <= 1.30 at both; reached (2026-12-07): CUDA 1.35-1.58 / 1.16-1.34, Triton
# 1.26-1.51 / 1.13-1.36. Each bound is what is reached plus ~3 %. What the model blames is in bench/NOTES.md.
GOALS = {
    ("cuda", "512x1000"): 1.63, ("cuda", "128x1000"): 1.89, ("cuda", "64x4096"): 1.39,
    ("triton", "512x1000"): 1.56, ("triton", "128x1000"): 1.82, ("triton", "64x4096"): 1.40,
}


@pytest.fixture(scope="module")
def machine_code(tmp_path_factory):
    """The report's JSON for REPORTED_ARCHS, and {arch: {kernel: its SASS}} for the other architectures: Triton's fast
    kernel (tanh teacher, student gradient) compiled for each, and the extension's pair kernels for each it holds.
    The report and the compiles run in their own processes, side by side: the compiler needs real JIT functions, and
    tests on a machine without a GPU import triton with its interpreter switched on (conftest.py)."""
    out = tmp_path_factory.mktemp("machine_code")
    archs = sorted(set(kernel_report.ARCHS) - set(REPORTED_ARCHS))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import kernel_report as r\n"
              f"for arch in {archs!r}:\n"
              f"    cubin = r.triton_compile(arch, 'fast', 'tanh', True, False)[0]\n"
              f"    open(f'{out}/triton-{{arch}}.cubin', 'wb').write(cubin)")
    jobs = [subprocess.Popen([sys.executable, str(BENCH / "kernel_report.py"), "--out", str(out),
                              "--archs", ",".join(map(str, REPORTED_ARCHS))], env=env),
            subprocess.Popen([sys.executable, "-c", script], env=env)]
    others = {arch: {} for arch in archs}
    extension = kernel_report.extension_path()
    if extension is not None:
        subprocess.run([kernel_report.tool("cuobjdump"), "-xelf", "all", str(extension)], cwd=out, check=True,
                       capture_output=True)
        for arch in archs:
            for variant, (instructions, _) in kernel_report.cuda_kernels(arch, out).items():
                others[arch][f"cuda-{variant}"] = instructions
    codes = [job.wait() for job in jobs]
    assert codes == [0, 0], codes
    for arch in archs:
        dump = kernel_report.run_tool(kernel_report.tool("cuobjdump"), "-sass", str(out / f"triton-{arch}.cubin"))
        (_, instructions), = kernel_report.parse_sass(dump).items()
        others[arch]["triton-float32-fast-tanh-grad_s"] = instructions
    reports = {int(path.name.split("-")[1].removeprefix("sm_")): json.loads(path.read_text())
               for path in out.glob("static-sm_*.json")}
    return reports, others


@pytest.fixture(scope="module")
def reports(machine_code):
    return machine_code[0]


def cuda_expected():
    return os.environ.get("RANKKD_EXPECT_CUDA_KERNEL") == "1"


def kernels(reports, backend):
    found = {(arch, name): kernel for arch, report in reports.items() for name, kernel in report["kernels"].items()
             if name.startswith(backend + "-")}
    if not found:
        if backend == "cuda" and not cuda_expected():
            pytest.skip("rankkd._C holds no CUDA kernels (built without CUDA)")
        pytest.fail(f"no {backend} kernels in the report")
    return found


def goal_kernel(reports, backend):
    return kernels(reports, backend)[(90, f"{backend}-float32-fast-tanh-grad_s")]


def test_every_variant_on_every_reported_arch(reports):
    assert set(reports) == set(REPORTED_ARCHS)
    for report in reports.values():
        assert {name for name in report["kernels"] if name.startswith("triton-")} == {
            f"triton-float32-{p}-{m}-{'grad_st' if t else 'grad_s'}" for p, m, _, t in kernel_report.TRITON_VARIANTS}
        cuda = {name for name in report["kernels"] if name.startswith("cuda-")}
        if cuda or cuda_expected():
            assert len(cuda) == 9  # float32: 2 precisions x (tanh, tanh + teacher grad, sign); float64: 3 modes


def test_every_other_arch(machine_code):
    # Each compiles Triton's fast kernel, and the extension holds every pair kernel for it (where it was built with
    # CUDA): no spills in a pair loop, 2 MUFU.TANH per pair on the fast path, none on the exact one.
    for arch, found in machine_code[1].items():
        cuda = [name for name in found if name.startswith("cuda-")]
        assert not (cuda or cuda_expected()) or len(cuda) == 9, (arch, cuda)
        for name, instructions in found.items():
            first, last = kernel_report.pair_loop(instructions)
            _, mufu, _, _ = kernel_report.classify(instructions[first:last + 1])
            pairs = 32  # per lane per trip: CUDA's 8 x 4 slots, Triton's 32-row blocks
            assert not any(ins.opcode.startswith(("LDL", "STL")) for ins in instructions[first:last + 1]), (arch, name)
            if "-fast-" in name:
                assert mufu == {"MUFU.TANH": pairs * (1 if "-sign-" in name else 2)}, (arch, name, mufu)
            else:
                assert "MUFU.TANH" not in mufu, (arch, name, mufu)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_spills_in_pair_loops(reports, backend):
    for (arch, name), kernel in kernels(reports, backend).items():
        assert kernel["loop_spill_instructions"] == 0, (arch, name)
        assert kernel["registers"] <= 255


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tanh_count_per_pair(reports, backend):
    for (arch, name), kernel in kernels(reports, backend).items():
        mufu = kernel["mufu_per_pair"]
        if "-fast-" in name:
            assert mufu == {"MUFU.TANH": 1.0 if "-sign-" in name else 2.0}, (arch, name, mufu)
        else:
            assert "MUFU.TANH" not in mufu, (arch, name, mufu)


@pytest.mark.parametrize("backend,shape", sorted(GOALS))
def test_predicted_ratio_within_goal(reports, backend, shape):
    plan = goal_kernel(reports, backend)["shapes"][shape]
    optimistic, pessimistic = plan["new"]["ratio"]
    assert 1.0 <= optimistic <= pessimistic <= GOALS[(backend, shape)], plan["new"]
    assert plan["old"]["ratio"] <= pessimistic  # the throughput model counts no latency: never slower


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_the_launch_plan_is_the_one_the_model_likes(reports, backend):
    # Against the parts near it (a quarter to four times), the library's choice is within 3 % of the best at both ends
    # of the range, at every shape of the report.
    for shape, plan in goal_kernel(reports, backend)["shapes"].items():
        sweep = plan["parts_sweep"]
        for end in (0, 1):
            best = min(ratios[end] for ratios in sweep.values())
            assert sweep[str(plan["parts"])][end] <= 1.03 * best, (shape, plan["parts"], sweep)


def test_launch_plans_stay_bounded():
    # Any shape: at most two launches' worth of parts, partial sums within budget, warps within the SM's share.
    triton_kendall, sms = kernel_report.triton_kendall, 132
    for rows in (1, 2, 3, 7, 64, 100, 128, 511, 512, 1024, 5000):
        for num_classes in (2, 31, 32, 100, 1000, 4096, 32000, 250000):
            parts = triton_kendall.num_parts(rows, num_classes, 32, 1, sms)
            assert 1 <= parts <= max(1, min(triton_kendall.MAX_PARTS, -(-num_classes // 32) // 2))
            assert parts == 1 or rows * parts <= triton_kendall._WARPS_PER_SM * sms
            assert parts == 1 or rows * parts * num_classes <= triton_kendall._PARTIAL_ELEMENTS
            tiles = -(-num_classes // kernel_report.CUDA_TILE)
            cuda = kernel_report.cuda_parts_per_row(rows, tiles * (tiles + 1) // 2, num_classes * 4, sms)
            assert 1 <= cuda <= tiles * (tiles + 1) // 2
            assert cuda == 1 or (rows * cuda <= kernel_report.CUDA_MAX_CTAS_PER_SM * sms
                                 and rows * cuda * num_classes * 4 <= 256 << 20)


def test_cuda_launch_plan_mirrors_the_extension():
    # kernel_report.cuda_parts_per_row restates parts_per_row of csrc/kendall_cuda.cu: the same CTAs per SM.
    source = (REPO / "csrc" / "kendall_cuda.cu").read_text()
    assert int(re.search(r"kMaxCtasPerSm = (\d+);", source).group(1)) == kernel_report.CUDA_MAX_CTAS_PER_SM


# ---- the latency simulator on streams whose answer is known ------------------------------------------------------

def sass(*lines):
    text = "Function : kernel\n" + "\n".join(f"/*{16 * i:04x}*/ {line} ;" for i, line in enumerate(lines))
    (_, instructions), = kernel_report.parse_sass(text).items()
    return instructions


ASSUMPTION = dict(kernel_report.LATENCY_ASSUMPTIONS["optimistic"], mufu=20, mio_queue=2)


@pytest.mark.parametrize("policy", kernel_report.POLICIES)
@pytest.mark.parametrize("warps,per_warp", [(1, 20), (2, 20), (4, 32), (5, 40)])
def test_dependent_mufu_chain(policy, warps, per_warp):
    # Each MUFU reads the one before (across trips too): one warp waits the 20-clock latency per instruction; more
    # warps overlap their chains until the unit's 8 clocks per instruction bind (4 warps: 32, 5: 40).
    code = kernel_report.decode(sass(*["MUFU.TANH R1, R1"] * 7), kernel_report.MACHINES[90])
    result = kernel_report.simulate(code, warps, ASSUMPTION, policy, loop=True)
    assert result["clocks"] == pytest.approx(7 * per_warp, rel=0.01)


def test_independent_fp32_issues_one_per_clock_or_per_half_rate_unit():
    code = sass(*[f"FADD R{i}, R100, R101" for i in range(30)])
    for arch, clocks in ((90, 30), (80, 60)):  # sm_80: one 16-lane FP32 unit per scheduler, 2 clocks each
        decoded = kernel_report.decode(code, kernel_report.MACHINES[arch])
        assert kernel_report.simulate(decoded, 1, ASSUMPTION, "gto", loop=True)["clocks"] == pytest.approx(clocks)


def test_straight_code_chain_queue_and_barrier():
    machine = kernel_report.MACHINES[90]
    chain = kernel_report.decode(sass(*["FFMA R1, R1, R2, R3"] * 10), machine)
    assert kernel_report.simulate(chain, 1, ASSUMPTION, "gto", loop=False)["clocks"] == 9 * ASSUMPTION["fma"] + 1
    # Ten independent MUFU: the MIO queue lets the warp issue 2 ahead of the unit, which starts one per 8 clocks.
    burst = kernel_report.decode(sass(*[f"MUFU.EX2 R{i}, R20" for i in range(10)]), machine)
    result = kernel_report.simulate(burst, 1, ASSUMPTION, "gto", loop=False)
    assert result["clocks"] == 8 * 7 + 1 and result["stalls"] == {"queue_xu": 8 * 7 + 1 - 10}
    barrier = kernel_report.decode(sass("BAR.SYNC.DEFER_BLOCKING 0x0", "FADD R1, R2, R3"), machine)
    assert kernel_report.simulate(barrier, 1, ASSUMPTION, "gto", loop=False)["clocks"] == ASSUMPTION["barrier"] + 1


@pytest.mark.parametrize("line,written,read", [
    ("ISETP.GE.AND P0, PT, R3, UR15, PT", ["P0"], ["R3", "UR15"]),
    ("SHFL.BFLY PT, R2, R11, 0x10, 0x1f", ["R2"], ["R11"]),
    ("@!P3 LDG.E.64 R14, desc[UR18][R2.64]", ["R14", "R15"], ["P3", "R2", "R3", "UR18"]),
    ("STG.E.128 desc[UR18][R2.64+0x10], R4", [], ["R2", "R3", "R4", "R5", "R6", "R7", "UR18"]),
    ("IMAD.WIDE R2, R19, 0x4, R74", ["R2", "R3"], ["R19", "R74", "R75"]),
    ("LEA.HI.X.SX32 R3, R3, UR14, 0x2, P6", ["R3"], ["P6", "R3", "UR14"]),
    ("IADD3 R4, P0, R2, R5, RZ", ["R4", "P0"], ["R2", "R5"]),
    ("FSEL R5, |R98|, -R99.reuse, !P4", ["R5"], ["P4", "R98", "R99"]),
])
def test_operand_registers(line, written, read):
    def slots(names):
        return sorted(kernel_report._registers(name, 1)[0] for name in names)

    got_written, got_read = kernel_report.operand_registers(sass(line)[0])
    assert sorted(got_written) == slots(written) and sorted(got_read) == slots(read)


# ---- finding the loops ----------------------------------------------------------------------------------------------

SASS = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   MUFU.TANH R4, R2 ;
        /*0030*/                   FFMA R5, R4, R4, R5 ;
        /*0040*/               @P0 BRA 0x10 ;
        /*0050*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*0060*/               @P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
"""


def test_pair_loop_is_the_innermost_loop_with_mufu():
    (name, instructions), = kernel_report.parse_sass(SASS).items()
    assert name == "kernel" and len(instructions) == 9 and instructions[4].guard == "@P0"
    assert kernel_report.pair_loop(instructions) == (1, 4)  # not the enclosing loop (1, 6), not the trap at 0x80
    machine = kernel_report.MACHINES[90]
    result, model = kernel_report.analyse(instructions, dict(registers=8, stack=0, shared=0, local=0), 1, machine)
    assert result["per_pair"]["mufu"] == 1 and result["per_pair"]["fp32"] == 2 and result["per_pair"]["branch"] == 1
    assert result["loop_bound"] == "mufu" and result["loop_clocks"] == 8
    assert result["per_trip_instructions"] == 2  # SHFL and the outer branch: once per trip of the enclosing loop
    # One warp: the tanh waits for the FADD, the FFMA for the tanh, the next trip's FADD issues after the branch;
    # the floor is 16 clocks for the 32 lanes' one MUFU.
    latency = kernel_report.LATENCY_ASSUMPTIONS
    assert result["loop_latency_vs_floor"][1] == [(latency[side]["fma"] + latency[side]["mufu"] + 2) / 16
                                                   for side in kernel_report.SIDES]
    assert len(model.parts["trip"][0]) == 2


TWO_LOOPS = """
        Function : kernel
        /*0000*/                   FADD R2, R2, R3 ;
        /*0010*/                   FMUL R2, R2, R7 ;
        /*0020*/                   MUFU.TANH R4, R2 ;
        /*0030*/               @P0 BRA 0x0 ;
        /*0040*/                   FADD R2, R2, R3 ;
        /*0050*/                   MUFU.TANH R4, R2 ;
        /*0060*/               @P0 BRA 0x40 ;
        /*0070*/                   EXIT ;
"""


def test_pair_loop_is_the_shorter_of_equal_mufu_loops():
    # The Triton fast kernel holds its pair loop twice: prescaled (what runs) and unscaled (a multiply more per tanh,
    # for rows where k x would overflow). Equal MUFU counts: the shorter one is the pair loop.
    (_, instructions), = kernel_report.parse_sass(TWO_LOOPS).items()
    assert kernel_report.pair_loop(instructions) == (4, 6)


TWO_NESTS = """
        Function : kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IADD3 R9, R9, 0x40, RZ ;
        /*0020*/                   STG.E desc[UR4][R8.64], RZ ;
        /*0030*/                   STG.E desc[UR4][R8.64+0x80], RZ ;
        /*0040*/               @P3 BRA 0x10 ;
        /*0050*/                   FADD R2, R2, R3 ;
        /*0060*/                   MUFU.TANH R4, R2 ;
        /*0070*/               @P0 BRA 0x50 ;
        /*0080*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*0090*/               @P1 BRA 0x50 ;
        /*00a0*/               @P2 BRA 0x130 ;
        /*00b0*/                   FADD R2, R2, R3 ;
        /*00c0*/                   FMUL R2, R2, R7 ;
        /*00d0*/                   MUFU.TANH R4, R2 ;
        /*00e0*/               @P0 BRA 0xb0 ;
        /*00f0*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*0100*/               @P1 BRA 0xb0 ;
        /*0110*/                   FADD R8, R8, R9 ;
        /*0120*/                   EXIT ;
"""


def test_program_parts_leave_out_the_unscaled_copy_and_count_the_row_loop():
    # The unscaled copy (0xb0-0x100) runs only for rows whose k x would overflow; the loop at 0x10 sweeps the row,
    # two columns per lane and trip (two stores).
    (_, instructions), = kernel_report.parse_sass(TWO_NESTS).items()
    result, model = kernel_report.analyse(instructions, dict(registers=8, stack=0, shared=0, local=0), 1,
                                          kernel_report.MACHINES[90])
    assert result["loop_instructions"] == 3 and result["per_trip_instructions"] == 2
    assert result["per_program_clocks"] == 8  # the throughput model: 8 instructions as straight code, 2 STG
    assert [ins.opcode for ins in model.parts["program"][0]] == ["MOV", "BRA", "FADD", "EXIT"]
    assert model.row_loops == {"row_loop_0": 2}
    assert model.row_loop_counts(1000, 1) == {"row_loop_0": -(-1000 // 64)}


# ---- launches -------------------------------------------------------------------------------------------------------

def test_makespan_shares_schedulers_and_fills_sms_breadth_first():
    def rate(costs):
        return lambda program, warps_on_sm: min(1.0, 4.0 / warps_on_sm) / costs[program]

    # Two 4-warp programs on one SM share its four schedulers: each runs at half speed.
    assert kernel_report.makespan([0, 1], 4, 2, 1, rate([100.0, 100.0])) == pytest.approx(200.0)
    # Breadth-first: two programs on two SMs run side by side.
    assert kernel_report.makespan([0, 1], 4, 2, 2, rate([100.0, 100.0])) == pytest.approx(100.0)
    # A third program waits for a free slot (one resident per SM).
    assert kernel_report.makespan([0, 1, 2], 4, 1, 2, rate([100.0, 50.0, 30.0])) == pytest.approx(100.0)
    assert kernel_report.makespan([0, 1, 2], 4, 1, 2, rate([100.0, 50.0, 80.0])) == pytest.approx(130.0)
    # Programs of one kind started together finish together (grouped), and the next ones start then.
    assert kernel_report.makespan([0] * 6, 1, 3, 1, rate([30.0])) == pytest.approx(60.0)


def test_residency_from_registers():
    machine = kernel_report.MACHINES[90]
    assert kernel_report.residency(72, 3104, 4, machine) == 7  # 72 x 32 = 2304 per warp: 28 warps
    assert kernel_report.residency(199, 1024, 2, machine) == 5  # 200 x 32 = 6400: 10 warps
    assert kernel_report.residency(255, 0, 2, machine) == 4
    assert kernel_report.residency(40, 0, 4, kernel_report.MACHINES[120]) == 12  # 48 warps per SM on sm_120


def test_tools_ship_with_triton():
    assert str(kernel_report.TOOLS).startswith(str(Path(importlib.util.find_spec("triton").origin).parent))
