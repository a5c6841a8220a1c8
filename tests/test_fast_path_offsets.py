"""The fast path's accuracy does not depend on where the logits sit, only on their spread.

Both GPU kernels' fast paths scale the logits once per element instead of once per pair. Scaling k x directly and
subtracting two such products leaves an error of about ulp(k x), so a common offset of a row (language-model and
detection logits carry large ones) would spoil a loss that is exactly shift-invariant. The kernels scale k (x - m),
m the midpoint of the row, which bounds the error by ulp(k spread). Checked here without a GPU on two stand-ins for
the kernels' float32 arithmetic, and on a GPU against the kernels themselves:
  - the Triton kernel's own code in the interpreter with prescale=True (its fast path's scaling, with the exact tanh);
  - a numpy port of the CUDA fast path's float32 operations (csrc/kendall_rows.cuh's prepare, csrc/kendall_pairs.cuh's
    tile_pair), with tanh exact and rounded to float32 in place of MUFU.TANH, so that the scaling's error is seen
    alone."""
import functools

import numpy as np
import pytest
import torch

import rankkd
from conftest import rel_err
from rankkd import reference

triton_kendall = pytest.importorskip("rankkd.triton.kendall")

# Offsets and spreads of the logits, and steepness k: (offset + spread * N(0, 1)) logits.
OFFSETS = [1e2, 1e4, 3e4, -3e4]
SPREADS = [1e-2, 1.0, 10.0]
KS = [1.0, 10.0, 100.0]
CASES = [(offset, spread, k) for offset in OFFSETS for spread in SPREADS for k in KS]
CASE_IDS = [f"offset{o:g}-spread{s:g}-k{k:g}" for o, s, k in CASES]
# The scaling alone (exact tanh): float32 rounding of arguments k (x_i - x_j) whose absolute error is at most about
# 2^-24 k spread. The fast path's bound (tanh.approx included) is 2e-3 on gradients (docs/design.md).
EMULATED_TOL = 1e-4
FAST_GRAD_TOL, FAST_LOSS_TOL = 2e-3, 2e-4


def offset_logits(offset, spread, k, rows=2, num_classes=256, device="cpu"):
    seed = hash((offset, spread, k)) % 2**31
    g = torch.Generator().manual_seed(seed)
    def draw():
        return (offset + spread * torch.randn(rows, num_classes, generator=g, dtype=torch.float64)).float()
    return draw().to(device), draw().to(device)


def float64_outputs(student, teacher, k):
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = reference.row_losses(s, t, k, "tanh")
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (s, t))
    return loss.detach(), grad_s, grad_t


def check(outputs, expected, loss_tol, grad_tol):
    for name, out, ref, tol in zip(("loss", "grad_student", "grad_teacher"), outputs, expected,
                                   (loss_tol, grad_tol, grad_tol)):
        assert out.shape == ref.shape
        assert rel_err(out, ref) <= tol, f"{name}: {rel_err(out, ref):.2e} > {tol:.0e}"


def _fma32(a, b, c):
    """fma(a, b, c) in float32: the product of two float32 is exact in float64, the sum rounds once (the second
    rounding to float32 differs from a true FMA only in double-rounding ties, far below what is checked)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _prepare(x, k, shift):
    """kendall_prepare_kernel for the fast path: k (x - m), m = lo / 2 + hi / 2 of the row, all in float32. shift=False
    is the arithmetic before the reference was introduced (k x), kept to show that these cases tell the two apart."""
    k = np.float32(k)
    if not shift:
        return k * x
    m = x.min(-1, keepdims=True) / np.float32(2) + x.max(-1, keepdims=True) / np.float32(2)
    return k * (x - m)


def cuda_fast_path_emulated(student, teacher, k, shift=True):
    """Loss and both gradients per row from the CUDA fast path's float32 operations: differences
    fma(x_i, m_j, -x_j) = x_i - x_j of the prepared logits, tanh of each, p = a b, the student term fma(-a, p, b)
    and the teacher term fma(-b, p, a); sums (whose order the kernel fixes) in float64."""
    s = _prepare(student.numpy().astype(np.float32), k, shift)
    t = _prepare(teacher.numpy().astype(np.float32), k, shift)
    a = np.tanh((s[:, :, None] - s[:, None, :]).astype(np.float64)).astype(np.float32)
    b = np.tanh((t[:, :, None] - t[:, None, :]).astype(np.float64)).astype(np.float32)
    p = a * b
    term_s = _fma32(-a, p, b)  # sech^2(k ds) g(dt), odd in (i, j): the kernel adds it to i and takes it from j
    term_t = _fma32(-b, p, a)
    n = s.shape[-1]
    pair_scale = 2.0 / (n * (n - 1))
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    loss = 1.0 - pair_scale * (p.astype(np.float64) * upper).sum((-1, -2))
    grad_scale = -pair_scale * k
    grad_s = grad_scale * term_s.astype(np.float64).sum(-1)
    grad_t = grad_scale * term_t.astype(np.float64).sum(-1)
    return tuple(torch.from_numpy(x) for x in (loss, grad_s, grad_t))


@pytest.mark.parametrize("offset,spread,k", CASES, ids=CASE_IDS)
def test_cuda_fast_arithmetic_emulated_is_offset_free(offset, spread, k):
    student, teacher = offset_logits(offset, spread, k)
    check(cuda_fast_path_emulated(student, teacher, k), float64_outputs(student, teacher, k), EMULATED_TOL / 10,
          EMULATED_TOL)


def test_offset_cases_tell_the_unshifted_scaling_apart():
    # The cases are sharp enough to see the bug they guard against: k x scaled without the reference.
    student, teacher = offset_logits(3e4, 1.0, 10.0)
    _, grad_s, _ = cuda_fast_path_emulated(student, teacher, 10.0, shift=False)
    assert rel_err(grad_s, float64_outputs(student, teacher, 10.0)[1]) > 10 * EMULATED_TOL


@pytest.mark.parametrize("offset,spread,k", CASES, ids=CASE_IDS)
def test_triton_fast_scaling_is_offset_free(offset, spread, k):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in rankkd.available_backends(device):
        pytest.skip("Triton cannot run here (not installed, or CPU without TRITON_INTERPRET=1)")
    student, teacher = offset_logits(offset, spread, k, device=device)
    # On a GPU, prescale=True with precision "exact" runs the same scaling with the exact tanh.
    out = triton_kendall.kendall_rank(student, teacher, k, "tanh", "exact", True, True, prescale=True)
    check(out, float64_outputs(student.cpu(), teacher.cpu(), k), EMULATED_TOL / 10, EMULATED_TOL)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("offset,spread,k", CASES, ids=CASE_IDS)
def test_gpu_fast_path_is_offset_free(backend, offset, spread, k):
    if backend not in rankkd.available_backends("cuda"):
        pytest.fail(f"backend {backend!r} is not available on this GPU machine")
    student, teacher = offset_logits(offset, spread, k, device="cuda")
    op = functools.partial(rankkd.kendall_rank_loss, k=k, reduction="none", backend=backend)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    loss = op(s, t)
    grad_s, grad_t = torch.autograd.grad(loss.sum(), (s, t))
    check((loss, grad_s, grad_t), float64_outputs(student.cpu(), teacher.cpu(), k), FAST_LOSS_TOL, FAST_GRAD_TOL)
