"""bench/kernel_report.py: the kernels' cost read from their machine code, so that a change that costs speed fails on a
machine without a GPU. The goals are sm_90, fast precision, predicted by the report's model (not timed)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
kernel_report = pytest.importorskip("kernel_report")

if not (kernel_report.TOOLS / "cuobjdump").exists():
    pytest.skip("this triton package ships no cuobjdump", allow_module_level=True)

# Predicted time over the 2-MUFU floor, sm_90, fast precision, tanh teacher, student gradient. Issue 22's goals: CUDA
# <= 1.15 (512x1000, 128x1000) and <= 1.05 (64x4096), Triton <= 1.35 (512x1000) and <= 1.25 (64x4096). Each bound is
# what the tuning reached plus ~2 %, or the goal where that is lower. CUDA's are not reached yet (it still runs
# three launches and pays per-strip code and 64-wide padding). Reached (2026-12-04): CUDA 1.274 / 1.516 / 1.108,
# Triton 1.155 / 1.075 (both within their goals; what is left is the masked diagonal block and the row exchange per
# panel). They include the guards that keep the fast path exact for any k in the op's range (a row whose k x would
# overflow is evaluated unscaled): ~0.5 % of per-program code.
GOALS = {
    ("cuda", "512x1000"): 1.30, ("cuda", "128x1000"): 1.55, ("cuda", "64x4096"): 1.13,
    ("triton", "512x1000"): 1.18, ("triton", "64x4096"): 1.10,
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    # Its own process: the compiler needs real JIT functions, and tests on a machine without a GPU import triton with
    # its interpreter switched on (conftest.py).
    out = tmp_path_factory.mktemp("static")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(BENCH / "kernel_report.py"), "--out", str(out)], env=env, check=True)
    return {int(path.name.split("-")[1].removeprefix("sm_")): json.loads(path.read_text())
            for path in out.glob("static-sm_*.json")}


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


def test_every_variant_on_every_arch(reports):
    assert set(reports) == set(kernel_report.ARCHS)
    for report in reports.values():
        assert {name for name in report["kernels"] if name.startswith("triton-")} == {
            f"triton-float32-{p}-{m}-{'grad_st' if t else 'grad_s'}" for p, m, _, t in kernel_report.TRITON_VARIANTS}
        cuda = {name for name in report["kernels"] if name.startswith("cuda-")}
        if cuda or cuda_expected():
            assert len(cuda) == 9  # float32: 2 precisions x (tanh, tanh + teacher grad, sign); float64: 3 modes


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
    kernel = kernels(reports, backend)[(90, f"{backend}-float32-fast-tanh-grad_s")]
    assert kernel["shapes"][shape]["ratio"] <= GOALS[(backend, shape)], kernel["shapes"][shape]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_small_batch_fills_the_gpu_or_is_one_launch(reports, backend):
    plan = kernels(reports, backend)[(90, f"{backend}-float32-fast-tanh-grad_s")]["shapes"]["64x100"]
    assert plan["launches"] == 1 or plan["sms_used"] == kernel_report.MACHINES[90]["sms"], plan


def test_triton_num_parts_matches_the_reported_plan(reports):
    # The report plans the Triton launch with the library's own num_parts: a fixed sm_90 example pins it down.
    plan = reports[90]["kernels"]["triton-float32-fast-tanh-grad_s"]["shapes"]
    assert plan["512x1000"]["parts"] == 1 and plan["512x1000"]["launches"] == 1
    # 64 rows do not fill the GPU: parts until the warps keep 95 % of the schedulers (four per SM) busy.
    warps = plan["64x4096"]["programs"] * plan["64x4096"]["warps_per_program"]
    assert warps >= 0.95 * 4 * kernel_report.MACHINES[90]["sms"]


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
    assert name == "kernel" and len(instructions) == 9
    assert kernel_report.pair_loop(instructions) == (1, 4)  # not the enclosing loop (1, 6), not the trap at 0x80
    machine = kernel_report.MACHINES[90]
    result = kernel_report.analyse(instructions, dict(registers=8, stack=0, shared=0, local=0), 1, machine)
    assert result["per_pair"]["mufu"] == 1 and result["per_pair"]["fp32"] == 2 and result["per_pair"]["branch"] == 1
    assert result["loop_bound"] == "mufu" and result["loop_clocks"] == 8
    assert result["per_trip_instructions"] == 2  # SHFL and the outer branch: once per trip of the enclosing loop


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
        /*0010*/                   FADD R2, R2, R3 ;
        /*0020*/                   MUFU.TANH R4, R2 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*0050*/               @P1 BRA 0x10 ;
        /*0060*/               @P2 BRA 0xf0 ;
        /*0070*/                   FADD R2, R2, R3 ;
        /*0080*/                   FMUL R2, R2, R7 ;
        /*0090*/                   MUFU.TANH R4, R2 ;
        /*00a0*/               @P0 BRA 0x70 ;
        /*00b0*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;
        /*00c0*/               @P1 BRA 0x70 ;
        /*00d0*/                   FADD R8, R8, R9 ;
        /*00e0*/                   EXIT ;
"""


def test_the_second_copy_of_the_loop_nest_is_not_program_cost():
    # The unscaled copy (0x70-0xc0) runs only for rows whose k x would overflow: the per-program code is the rest.
    (_, instructions), = kernel_report.parse_sass(TWO_NESTS).items()
    result = kernel_report.analyse(instructions, dict(registers=8, stack=0, shared=0, local=0), 1,
                                   kernel_report.MACHINES[90])
    assert result["loop_instructions"] == 3 and result["per_trip_instructions"] == 2
    assert result["per_program_clocks"] == 4  # MOV, the branch at 0x60, FADD, EXIT


def test_makespan_shares_schedulers_and_fills_sms_breadth_first():
    # Two 4-warp programs on one SM share its four schedulers: each runs at half speed.
    assert kernel_report.makespan([100.0, 100.0], warps=4, resident=2, sms=1) == pytest.approx(200.0)
    # Breadth-first: two programs on two SMs run side by side.
    assert kernel_report.makespan([100.0, 100.0], warps=4, resident=2, sms=2) == pytest.approx(100.0)
    # A third program waits for a free slot (one resident per SM).
    assert kernel_report.makespan([100.0, 50.0, 30.0], warps=4, resident=1, sms=2) == pytest.approx(100.0)
    assert kernel_report.makespan([100.0, 50.0, 80.0], warps=4, resident=1, sms=2) == pytest.approx(130.0)


def test_residency_from_registers():
    machine = kernel_report.MACHINES[90]
    assert kernel_report.residency(72, 3104, 4, machine) == 7  # 72 x 32 = 2304 per warp: 28 warps
    assert kernel_report.residency(199, 1024, 2, machine) == 5  # 200 x 32 = 6400: 10 warps
    assert kernel_report.residency(255, 0, 2, machine) == 4


def test_tools_ship_with_triton():
    assert str(kernel_report.TOOLS).startswith(str(Path(importlib.util.find_spec("triton").origin).parent))
