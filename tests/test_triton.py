"""What is specific to the Triton kernel (rankkd/triton/kendall.py): the panel/block tiling and the split of a row
into parts at small tile sizes (in the interpreter, on CPU tensors, when there is no GPU), its NaN and determinism
guarantees, and on a GPU both precisions ("fast": tanh.approx.f32, "exact"), large C, half inputs, torch.compile and
opcheck. The shared contract of every backend is tested in test_kendall.py."""
import functools
import sys
from pathlib import Path

import pytest
import torch

import rankkd
from closed_form import closed_form_outputs
from conftest import logits as any_logits
from conftest import rel_err
from rankkd import reference

triton_kendall = pytest.importorskip("rankkd.triton.kendall")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in rankkd.available_backends(DEVICE),
                                reason="Triton cannot run here (not installed, or CPU without TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


logits = functools.partial(any_logits, dtype=torch.float32, device=DEVICE)


def reference_outputs(student, teacher, k, teacher_mode):
    """Per-row loss and per-row gradients from rankkd.reference in float64 (rows are independent, so the gradient
    of the sum of the rows' losses holds each row's own gradient)."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = reference.row_losses(s, t, k, teacher_mode)
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (s, t), allow_unused=True)
    return loss.detach(), grad_s, grad_t


def analytic_outputs(student, teacher, k, teacher_mode, chunk=256):
    """closed_form_outputs shaped like the op's outputs (an empty teacher gradient in sign mode)."""
    loss, grad_s, grad_t = closed_form_outputs(student, teacher, k, teacher_mode, chunk)
    return loss, grad_s, grad_s.new_empty(0) if teacher_mode == "sign" else grad_t


def check_close(outputs, expected, tol, grad_student=True, grad_teacher=True):
    loss, grad_s, grad_t = outputs
    ref_loss, ref_grad_s, ref_grad_t = expected
    assert loss.shape == ref_loss.shape and rel_err(loss, ref_loss) <= tol
    if grad_student:
        assert grad_s.shape == ref_grad_s.shape and rel_err(grad_s, ref_grad_s) <= tol
    else:
        assert grad_s.shape == (0,)
    if grad_teacher:
        assert grad_t.shape == ref_grad_t.shape and rel_err(grad_t, ref_grad_t) <= tol
    else:
        assert grad_t.shape == (0,)


# (C, block_i, block_j, parts): one partial block; more parts than panels; full blocks plus a ragged last block, on
# one part and snake-dealt over three; block_i == block_j with C a multiple of both; longer sweeps over many parts.
# On a GPU each tiling and dtype is a compilation of its own: there a subset, and the GPU tests use the real tiles.
TILINGS = [(2, 4, 8, 1), (3, 4, 8, 2), (37, 8, 16, 1), (37, 8, 16, 3), (64, 16, 16, 2), (130, 16, 32, 4),
           (300, 32, 64, 3)]
TILING_DTYPES = [torch.float32, torch.float64]
if DEVICE == "cuda":
    TILINGS, TILING_DTYPES = [(37, 8, 16, 3), (300, 32, 64, 3)], [torch.float32]


@pytest.mark.parametrize("n,block_i,block_j,parts", TILINGS, ids=[f"C{t[0]}-{t[1]}x{t[2]}-p{t[3]}" for t in TILINGS])
@pytest.mark.parametrize("dtype", TILING_DTYPES)
def test_tilings_match_reference(n, block_i, block_j, parts, dtype):
    student, teacher = logits(3, n, dtype=dtype), logits(3, n, dtype=dtype)
    for teacher_mode in ("tanh", "sign"):
        out = triton_kendall.kendall_rank(student, teacher, 0.8, teacher_mode, "exact", True, teacher_mode == "tanh",
                                          block_i=block_i, block_j=block_j, parts=parts)
        assert all(x.dtype == dtype for x in out)
        check_close(out, reference_outputs(student, teacher, 0.8, teacher_mode), 1e-5 if dtype == torch.float32 else
                    1e-12, grad_teacher=teacher_mode == "tanh")


@pytest.mark.parametrize("grad_student,grad_teacher", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("parts", [1, 3])
def test_each_gradient_alone(grad_student, grad_teacher, parts):
    student, teacher = logits(2, 45), logits(2, 45)
    out = triton_kendall.kendall_rank(student, teacher, 1.3, "tanh", "exact", grad_student, grad_teacher, block_i=8,
                                      block_j=16, parts=parts)
    check_close(out, reference_outputs(student, teacher, 1.3, "tanh"), 1e-5, grad_student, grad_teacher)


def test_analytic_helper_matches_reference():
    # analytic_outputs checks the kernel at C where the reference cannot go; here it is checked itself.
    student, teacher = any_logits(2, 50), any_logits(2, 50)
    for teacher_mode in ("tanh", "sign"):
        expected = reference_outputs(student, teacher, 0.9, teacher_mode)
        check_close(analytic_outputs(student, teacher, 0.9, teacher_mode, chunk=16), expected, 1e-12,
                    grad_teacher=teacher_mode == "tanh")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    student, teacher = logits(3, 40, dtype=dtype), logits(3, 40, dtype=dtype)
    out = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True, block_i=8, block_j=16,
                                      parts=2)
    assert all(x.dtype == torch.float32 for x in out)
    # Half logits are exact in float64: the reference sees the very same inputs.
    check_close(out, reference_outputs(student, teacher, 1.0, "tanh"), 1e-5)


@pytest.mark.parametrize("parts", [1, 3])
def test_non_finite_rows_give_nan(parts):
    student, teacher = logits(5, 40), logits(5, 40)
    student[1, 3] = float("inf")
    teacher[2, 39] = float("nan")  # in the last panel, which three parts deal to part 1
    student[3, 20] = -float("inf")
    loss, grad_s, grad_t = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True, block_i=8,
                                                       block_j=16, parts=parts)
    bad = torch.tensor([False, True, True, True, False], device=student.device)
    assert loss[bad].isnan().all() and grad_s[bad].isnan().all() and grad_t[bad].isnan().all()
    assert not loss[~bad].isnan().any() and not grad_s[~bad].isnan().any() and not grad_t[~bad].isnan().any()
    good = (loss[~bad], grad_s[~bad], grad_t[~bad])
    check_close(good, reference_outputs(student[~bad], teacher[~bad], 1.0, "tanh"), 1e-5)


@pytest.mark.parametrize("parts", [1, 4])
def test_deterministic(parts):
    student, teacher = logits(3, 150), logits(3, 150)
    first = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True, block_i=16, block_j=32,
                                        parts=parts)
    second = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True, block_i=16, block_j=32,
                                         parts=parts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    check_close(first, reference_outputs(student, teacher, 1.0, "tanh"), 1e-5)


@pytest.mark.parametrize("precision,tol", [("fast", 2e-3 if DEVICE == "cuda" else 1e-5), ("exact", 1e-5)])
def test_default_launch_matches_reference(precision, tol):
    # The op's own choice of tiles and parts; the interpreter runs "fast" as "exact" (no inline assembly there).
    student, teacher = logits(4, 70), logits(4, 70)
    out = torch.ops.rankkd.kendall_rank_triton(student, teacher, 1.1, "tanh", precision, True, True)
    check_close(out, reference_outputs(student, teacher, 1.1, "tanh"), tol)


def test_num_parts_fills_the_schedulers():
    # An H100's 132 SMs, one-warp programs of 32-row panels: up to eight warps per SM (two per scheduler), 1056.
    assert triton_kendall.num_parts(64, 100, 32, 1, 132) == 2  # 4 panels: two per part
    assert triton_kendall.num_parts(512, 1000, 32, 1, 132) == 2  # 1024 warps
    assert triton_kendall.num_parts(1024, 1000, 32, 1, 132) == 1  # the rows fill the SMs: one launch
    assert triton_kendall.num_parts(64, 4096, 32, 1, 132) == 16
    assert triton_kendall.num_parts(200, 1000, 32, 1, 132) == 5
    assert triton_kendall.num_parts(64, 4096, 32, 2, 132) == 8  # two-warp programs: half the parts
    assert triton_kendall.num_parts(64, 32000, 32, 1, 132) == 16  # partial sums: at most 2^25 elements
    assert triton_kendall.num_parts(2, 100000, 32, 1, 132) == triton_kendall.MAX_PARTS


@pytest.mark.parametrize("call,message", [
    (lambda s, t: torch.ops.rankkd.kendall_rank_triton(s, t[:, :-1], 1.0, "tanh", "fast", True, True), "shape"),
    (lambda s, t: torch.ops.rankkd.kendall_rank_triton(s, t.double(), 1.0, "tanh", "fast", True, True), "dtype"),
    (lambda s, t: torch.ops.rankkd.kendall_rank_triton(s[:, :1], t[:, :1], 1.0, "tanh", "fast", True, True),
     "2 classes"),
    (lambda s, t: torch.ops.rankkd.kendall_rank_triton(s, t, 0.0, "tanh", "fast", True, True), "k .* must"),
    (lambda s, t: torch.ops.rankkd.kendall_rank_triton(s, t, 1.0, "sign", "fast", True, True), "sign"),
    (lambda s, t: torch.ops.rankkd.kendall_rank_triton(s, t, 1.0, "tanh", "approx", True, True), "precision"),
    (lambda s, t: triton_kendall.kendall_rank(s, t, 1.0, "tanh", "fast", True, True, block_i=32, block_j=16),
     "block_j"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call(logits(2, 10), logits(2, 10))


@pytest.mark.parametrize("flags", [("tanh", True, True), ("tanh", True, False), ("sign", True, False),
                                   ("tanh", False, False)])
@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_opcheck(flags, precision):
    teacher_mode, grad_student, grad_teacher = flags
    student = logits(3, 19).requires_grad_(grad_student)
    teacher = logits(3, 19).requires_grad_(grad_teacher)
    torch.library.opcheck(torch.ops.rankkd.kendall_rank_triton.default,
                          (student, teacher, 1.3, teacher_mode, precision, grad_student, grad_teacher))


def test_compile_fullgraph_matches_eager():
    def step(student, teacher):
        return rankkd.kendall_rank_loss(student, teacher, k=1.5, topk=20, backend="triton")

    # Under the interpreter the op is opaque to the compiler, and aot_eager is enough; on a GPU inductor schedules the
    # Triton kernels itself.
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    student, teacher = logits(6, 50), logits(6, 50)
    results = []
    for fn in (step, compiled):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = fn(s, t)
        loss.backward()
        results.append((loss, s.grad, t.grad))
    for eager, compiled_out in zip(*results):
        torch.testing.assert_close(compiled_out, eager)


# GPU only: the compiled kernels, at the sizes and speeds they are for.

@needs_cuda
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
@pytest.mark.parametrize("precision,tol", [("fast", 2e-3), ("exact", 1e-5)])  # docs/design.md's bound for each
def test_precision_accuracy(teacher_mode, precision, tol):
    student, teacher = logits(64, 1000), logits(64, 1000)
    out = triton_kendall.kendall_rank(student, teacher, 1.0, teacher_mode, precision, True, teacher_mode == "tanh")
    check_close(out, reference_outputs(student, teacher, 1.0, teacher_mode), tol, grad_teacher=teacher_mode == "tanh")


@needs_cuda
@pytest.mark.parametrize("rows,n", [(8, 4096), (2, 32768)])
def test_large_c(rows, n):
    student, teacher = logits(rows, n), logits(rows, n)
    expected = analytic_outputs(student, teacher, 1.0, "tanh")
    check_close(triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True), expected, 1e-5)
    first = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "fast", True, True)
    check_close(first, expected, 2e-3)
    second = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "fast", True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("parts", [1, 7])
def test_gpu_parts_match_reference_and_repeat_exactly(parts):
    student, teacher = logits(16, 777), logits(16, 777)
    first = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True, parts=parts)
    check_close(first, reference_outputs(student, teacher, 1.0, "tanh"), 1e-5)
    second = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "exact", True, True, parts=parts)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
def test_memory_is_linear_in_c():
    rows, n = 4, 16384
    student, teacher = logits(rows, n), logits(rows, n)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "fast", True, True)
    torch.cuda.synchronize()
    # Outputs plus at most MAX_PARTS partial slices per gradient, in float32; a rows x C x C tensor would be 4 GiB.
    assert torch.cuda.max_memory_allocated() - before <= (2 * triton_kendall.MAX_PARTS + 4) * rows * n * 4


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_inputs(dtype):
    student, teacher = logits(64, 1000, dtype=dtype), logits(64, 1000, dtype=dtype)
    out = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "fast", True, False)
    assert all(x.dtype == torch.float32 for x in out)
    check_close(out, reference_outputs(student, teacher, 1.0, "tanh"), 2e-3, grad_teacher=False)


# ---- the fast path's scaling (logits times k at load), in the interpreter too ------------------------------------
# The interpreter cannot run tanh.approx, but prescale=True runs the fast path's scaling (and its per-row fallback to
# k (x_i - x_j) where k x would overflow) with the exact tanh, so these cases exercise that code everywhere. On a GPU
# the same cases also run the real fast path (precision "fast", default prescale).

def extreme_case(name, device=DEVICE):
    """(student, teacher, k, teacher modes) of a case at the edges of the op's contract, float32 (3, 37) logits."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    def randn(scale):
        return (scale * torch.randn(3, 37, generator=g, dtype=torch.float64)).float()
    if name == "k_max":  # every distinct pair saturated: loss = Kendall's tau of the signs, gradients exactly 0
        s, t, k, modes = randn(3.0), randn(3.0), 3.4e38, ("tanh", "sign")
    elif name == "k_huge_tiny_logits":  # k x ~ 3: unsaturated pairs at k = 1e33 (logits stay normal floats)
        s, t, k, modes = randn(3e-33), randn(3e-33), 1e33, ("tanh", "sign")
    elif name == "k_min_huge_logits":  # k = 2^-126 with k x ~ 3: the loss is meaningful, the gradients ~1e-40
        s, t, k, modes = randn(3e36), randn(3e36), 2.0 ** -126, ("tanh", "sign")
    elif name == "absurd_logits":  # row 1 holds logits whose k x overflows: two of one sign must not tie
        s, t, k, modes = randn(3.0), randn(3.0), 1.0, ("tanh", "sign")
        s[1, :4] = torch.tensor([3e38, 2e38, -2e38, -3e38])
        t[1, 5:9] = torch.tensor([3e38, 2.5e38, -2e38, -3e38])
    elif name == "sign_teacher_underflow":  # k t would underflow and round distinct teacher logits into ties
        s = randn(3e30)
        t = 1e-10 * torch.randint(0, 6, (3, 37), generator=g).float() * (1 + 1e-6 * torch.randint(0, 2, (3, 37),
                                                                                                     generator=g))
        k, modes = 1e-30, ("sign",)
    elif name == "ties":  # exact ties in both, +0.0 against -0.0: sign(0) = 0, tanh(0) = 0
        s = torch.randint(-2, 3, (3, 37), generator=g).float()
        t = torch.randint(-2, 3, (3, 37), generator=g).float()
        t[t == 0] = torch.where(torch.arange(37) % 2 == 0, 0.0, -0.0).expand(3, 37)[t == 0]
        k, modes = 0.7, ("tanh", "sign")
    else:
        raise ValueError(name)
    return s.to(device), t.to(device), k, modes


EXTREME_CASES = ["k_max", "k_huge_tiny_logits", "k_min_huge_logits", "absurd_logits", "sign_teacher_underflow",
                 "ties"]
EXTREME = [(name, mode) for name in EXTREME_CASES for mode in extreme_case(name, "cpu")[3]]


def check_extreme(outputs, expected, loss_tol, grad_tol, grad_teacher):
    """check_close, where a float64 gradient below 1e-30 (k = 2^-126: float32 holds it as a subnormal or 0) only
    needs a result as small, and a zero one (every pair saturated) an exact zero."""
    loss, grad_s, grad_t = outputs
    ref_loss, ref_grad_s, ref_grad_t = expected
    assert torch.isfinite(loss).all() and rel_err(loss, ref_loss) <= loss_tol
    for grad, ref in ((grad_s, ref_grad_s),) + (((grad_t, ref_grad_t),) if grad_teacher else ()):
        assert grad.shape == ref.shape and torch.isfinite(grad).all()
        if ref.norm() == 0:
            assert torch.equal(grad, torch.zeros_like(grad))
        elif ref.abs().max() < 1e-30:
            assert grad.abs().max() < 1e-30
        else:
            assert rel_err(grad, ref) <= grad_tol


@pytest.mark.parametrize("name,teacher_mode", EXTREME, ids=[f"{n}-{m}" for n, m in EXTREME])
@pytest.mark.parametrize("parts", [1, 2])
def test_prescaled_path_keeps_the_contract_at_extreme_k(name, teacher_mode, parts):
    student, teacher, k, _ = extreme_case(name)
    grad_teacher = teacher_mode == "tanh"
    out = triton_kendall.kendall_rank(student, teacher, k, teacher_mode, "fast", True, grad_teacher, parts=parts,
                                      prescale=True, block_i=8, block_j=16)
    tol = 2e-3 if DEVICE == "cuda" else 1e-4  # the GPU's "fast" runs tanh.approx
    check_extreme(out, reference_outputs(student, teacher, k, teacher_mode), tol / 10, tol, grad_teacher)


@pytest.mark.parametrize("n", [2, 3, 37, 1001])
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_prescaled_path_padding_adds_nothing(n, teacher_mode):
    # Channels past C in the last panel and block (C = 2, 3: one partial block; 1001: ragged) must add exactly zero.
    student, teacher = logits(2, n), logits(2, n)
    grad_teacher = teacher_mode == "tanh"
    out = triton_kendall.kendall_rank(student, teacher, 1.3, teacher_mode, "fast", True, grad_teacher, prescale=True,
                                      parts=1 if n < 37 else 3)
    tol = 2e-3 if DEVICE == "cuda" else 1e-4
    check_close(out, reference_outputs(student, teacher, 1.3, teacher_mode), tol, grad_teacher=grad_teacher)


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_fully_saturated_rows_have_exactly_zero_gradients(precision):
    # Logits 100 apart at k = 1: sech^2 is 0 in float32 for every pair (exact path: exp(-200) = 0; fast: the pin).
    base = 100.0 * torch.arange(40, dtype=torch.float32)
    student = base[torch.randperm(40)].repeat(2, 1).to(DEVICE)
    teacher = base[torch.randperm(40)].repeat(2, 1).to(DEVICE)
    for mode in ("tanh", "sign"):
        _, grad_s, grad_t = triton_kendall.kendall_rank(student, teacher, 1.0, mode, precision, True, mode == "tanh",
                                                        prescale=precision == "fast")
        assert torch.equal(grad_s, torch.zeros_like(grad_s))
        if mode == "tanh":
            assert torch.equal(grad_t, torch.zeros_like(grad_t))


def test_prescaled_path_non_finite_rows_give_nan():
    student, teacher, _, _ = extreme_case("absurd_logits")
    student[1, 10] = float("nan")  # the row that would also take the unscaled fallback
    teacher[2, 3] = float("inf")
    loss, grad_s, grad_t = triton_kendall.kendall_rank(student, teacher, 1.0, "tanh", "fast", True, True, parts=2,
                                                       prescale=True, block_i=8, block_j=16)
    assert torch.isnan(loss[1:]).all() and torch.isnan(grad_s[1:]).all() and torch.isnan(grad_t[1:]).all()
    assert torch.isfinite(loss[0]) and torch.isfinite(grad_s[0]).all() and torch.isfinite(grad_t[0]).all()


@needs_cuda
@pytest.mark.parametrize("name,teacher_mode", EXTREME, ids=[f"{n}-{m}" for n, m in EXTREME])
def test_gpu_fast_default_launch_at_extreme_k(name, teacher_mode):
    # The shipped fast path (tanh.approx, default tiles and parts) on the same cases.
    student, teacher, k, _ = extreme_case(name)
    grad_teacher = teacher_mode == "tanh"
    out = triton_kendall.kendall_rank(student, teacher, k, teacher_mode, "fast", True, grad_teacher)
    check_extreme(out, reference_outputs(student, teacher, k, teacher_mode), 2e-4, 2e-3, grad_teacher)


@needs_cuda
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_gpu_fast_saturated_rows_have_exactly_zero_gradients(teacher_mode):
    # Every |k (x_i - x_j)| >= 10: the pinned tanh must give exactly zero gradients (1 - tanh^2 of an unpinned
    # tanh.approx could stop short of 0). Wide enough (300 channels) to take several panels and parts.
    base = 10.0 * torch.arange(300, dtype=torch.float32, device="cuda")
    student = base[torch.randperm(300, device="cuda")].repeat(3, 1)
    teacher = base[torch.randperm(300, device="cuda")].repeat(3, 1)
    for parts in (1, 5):
        _, grad_s, grad_t = triton_kendall.kendall_rank(student, teacher, 1.0, teacher_mode, "fast", True,
                                                        teacher_mode == "tanh", parts=parts)
        assert torch.equal(grad_s, torch.zeros_like(grad_s))
        if teacher_mode == "tanh":
            assert torch.equal(grad_t, torch.zeros_like(grad_t))


@needs_cuda
def test_gpu_tanh_approx_stays_in_unit_interval_and_is_monotonic():
    # sech^2 = 1 - tanh^2 is never negative and every pair keeps its sign only if the hardware tanh, over every float32,
    # stays within [-1, 1] and never decreases; the PTX ISA promises neither (bench/tanh_approx_sweep.py).
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from tanh_approx_sweep import sweep

    result = sweep()
    assert result["within_unit_interval"], result
    assert result["non_monotonic_steps"] == 0, result
