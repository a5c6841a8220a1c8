"""What is specific to the CUDA kernel (csrc/kendall_cuda.cu): its variants (RANKKD_CUDA_VARIANT = approx, the default,
mixed or exact) against float64, large C, the split of a row over several CTAs, NaN rows, determinism, fully written
outputs and opcheck on CUDA tensors; and, without a GPU, that a FORCE_CUDA build registered the
kernel. The shared contract of every backend is tested in test_kendall.py.

The variant is read once per process, so the tests named test_variant_* run here for the variant this process runs
and, through test_other_variant, in a child pytest process for each other one."""
import os
import subprocess
import sys

import pytest
import torch

import rankkd
from closed_form import closed_form_outputs
from rankkd import reference

VARIANTS = ("approx", "mixed", "exact")
ACTIVE = os.environ.get("RANKKD_CUDA_VARIANT") or "approx"
# Relative norm error against float64 for float32 math (DESIGN.md): exact paths 1e-5; the fast tanh paths 2e-3 on
# gradients (MUFU.TANH is good to about 1e-5 relative, tanh_poly to 5e-5) and, for the loss, a tenth of that.
LOSS_TOL = {"exact": 1e-5, "approx": 2e-4, "mixed": 2e-4}[ACTIVE]
GRAD_TOL = {"exact": 1e-5, "approx": 2e-3, "mixed": 2e-3}[ACTIVE]

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in rankkd.available_backends("cuda"),
    reason="needs a CUDA GPU and rankkd._C built with its CUDA kernel")


def logits(rows, n, dtype=torch.float32, scale=3.0):
    return (scale * torch.randn(rows, n, dtype=torch.float64)).to(device="cuda", dtype=dtype)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def kendall_rank(student, teacher, k=1.0, sign_teacher=False, grad_student=True, grad_teacher=True):
    return torch.ops.rankkd.kendall_rank(student, teacher, k, sign_teacher, grad_student, grad_teacher)


def expected_outputs(student, teacher, k, sign_teacher, chunk=256):
    """Per-row loss and gradients in float64, shaped like the op's outputs. Up to C = 4096 from rankkd.reference and
    autograd (rows are independent, so the gradient of the summed rows holds each row's own); beyond, from the closed
    forms of DESIGN.md chunked over i, which never builds a rows x C x C tensor."""
    s, t = student.detach().double(), teacher.detach().double()
    n = s.shape[1]
    if n <= 4096:
        s.requires_grad_()
        t.requires_grad_(not sign_teacher)
        loss = reference.row_losses(s, t, k, "sign" if sign_teacher else "tanh")
        grads = torch.autograd.grad(loss.sum(), (s, t) if not sign_teacher else (s,))
        return loss.detach(), grads[0], grads[1] if not sign_teacher else None
    return closed_form_outputs(s, t, k, sign_teacher, chunk)


def check_against_float64(student, teacher, k, sign_teacher, loss_tol, grad_tol):
    grad_teacher = not sign_teacher
    loss, grad_s, grad_t = kendall_rank(student, teacher, k, sign_teacher, True, grad_teacher)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == grad_s.dtype == grad_t.dtype == acc
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student, teacher, k, sign_teacher)
    assert loss.shape == ref_loss.shape and rel_err(loss, ref_loss) <= loss_tol
    assert grad_s.shape == ref_grad_s.shape and rel_err(grad_s, ref_grad_s) <= grad_tol
    if grad_teacher:
        assert grad_t.shape == ref_grad_t.shape and rel_err(grad_t, ref_grad_t) <= grad_tol
    else:
        assert grad_t.shape == (0,)


# ---- variant-dependent: run for every variant ------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("rows,n", [(33, 2), (17, 3), (5, 1001), (2, 4096), (1, 32768)])
@pytest.mark.parametrize("sign_teacher", [False, True])
def test_variant_float32_matches_float64(rows, n, sign_teacher):
    student, teacher = logits(rows, n), logits(rows, n)
    check_against_float64(student, teacher, 0.7, sign_teacher, LOSS_TOL, GRAD_TOL)


@needs_cuda
@pytest.mark.parametrize("grad_student,grad_teacher", [(True, False), (False, True), (False, False)])
def test_variant_each_gradient_alone(grad_student, grad_teacher):
    student, teacher = logits(6, 300), logits(6, 300)
    loss, grad_s, grad_t = kendall_rank(student, teacher, 1.3, False, grad_student, grad_teacher)
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student, teacher, 1.3, False)
    assert rel_err(loss, ref_loss) <= LOSS_TOL
    for wanted, grad, ref_grad in ((grad_student, grad_s, ref_grad_s), (grad_teacher, grad_t, ref_grad_t)):
        if wanted:
            assert rel_err(grad, ref_grad) <= GRAD_TOL
        else:
            assert grad.shape == (0,)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_variant_half_inputs_compute_in_float32(dtype):
    # The op's outputs against float64 math on the same (already rounded) inputs: only the kernel's error remains.
    student, teacher = logits(64, 1000, dtype), logits(64, 1000, dtype)
    check_against_float64(student, teacher, 1.0, False, LOSS_TOL, GRAD_TOL)


@needs_cuda
@pytest.mark.parametrize("scale", [100.0, 1e-4])
@pytest.mark.parametrize("sign_teacher", [False, True])
def test_variant_saturated_and_near_zero_logits(scale, sign_teacher):
    # 100: nearly every pair is saturated (tanh = +-1, sech^2 ~ 0) and the gradient comes from a few close pairs, so a
    # tanh that stops short of +-1 would show. 1e-4: every tanh is tiny, so relative accuracy near 0 shows.
    student, teacher = logits(4, 1000, scale=scale), logits(4, 1000, scale=scale)
    check_against_float64(student, teacher, 1.0, sign_teacher, LOSS_TOL, GRAD_TOL)


@needs_cuda
@pytest.mark.parametrize("rows,n", [(1, 4096), (700, 100)])
def test_variant_deterministic(rows, n):
    # (1, 4096) splits the row over hundreds of CTAs and a reduction pass; (700, 100) gives each row one CTA.
    student, teacher = logits(rows, n), logits(rows, n)
    first = kendall_rank(student, teacher, 1.0, False, True, True)
    second = kendall_rank(student, teacher, 1.0, False, True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- variant-independent ---------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != ACTIVE])
def test_other_variant(variant):
    env = {**os.environ, "RANKKD_CUDA_VARIANT": variant}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                             "test_variant_"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


@needs_cuda
def test_unknown_variant_is_an_error_naming_the_choices():
    script = ("import torch, rankkd\n"
              "s = torch.randn(2, 5, device='cuda')\n"
              "torch.ops.rankkd.kendall_rank(s, s, 1.0, False, True, False)\n")
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RANKKD_CUDA_VARIANT": "fastest"},
                            capture_output=True, text=True)
    assert result.returncode != 0 and "approx (default), mixed, exact" in result.stderr


@needs_cuda
@pytest.mark.parametrize("rows,n", [(6, 37), (2, 4096)])
@pytest.mark.parametrize("sign_teacher", [False, True])
def test_float64_inputs_take_the_exact_double_path(rows, n, sign_teacher):
    student, teacher = logits(rows, n, torch.float64), logits(rows, n, torch.float64)
    check_against_float64(student, teacher, 0.7, sign_teacher, 1e-10, 1e-10)


@needs_cuda
@pytest.mark.parametrize("rows,n", [(5, 20), (3, 5000)])
def test_non_finite_rows_give_nan(rows, n):
    # (3, 5000) has several CTAs per row: the flag must reach the reduction pass too.
    student, teacher = logits(rows, n), logits(rows, n)
    student[1, 3] = float("inf")
    teacher[2, n - 1] = float("nan")
    loss, grad_s, grad_t = kendall_rank(student, teacher)
    assert loss[1:3].isnan().all() and grad_s[1:3].isnan().all() and grad_t[1:3].isnan().all()
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student[[0]], teacher[[0]], 1.0, False)
    assert rel_err(loss[[0]], ref_loss) <= LOSS_TOL and rel_err(grad_s[[0]], ref_grad_s) <= GRAD_TOL
    assert rel_err(grad_t[[0]], ref_grad_t) <= GRAD_TOL


@needs_cuda
@pytest.mark.parametrize("rows,n", [(3, 70), (1, 3000), (500, 129)])
def test_every_output_is_written(rows, n):
    # Fill the caching allocator's free memory with NaN first: the op's outputs and scratch are carved from it, so an
    # element the kernels forget to write shows up as NaN.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = torch.full((64 << 20,), float("nan"), device="cuda")
    del poison
    student, teacher = logits(rows, n), logits(rows, n)
    for out in kendall_rank(student, teacher):
        assert out.isfinite().all()


@needs_cuda
def test_zero_rows():
    empty = torch.empty(0, 10, device="cuda")
    loss, grad_s, grad_t = kendall_rank(empty, empty)
    assert loss.shape == (0,) and grad_s.shape == (0, 10) and grad_t.shape == (0, 10)


@needs_cuda
def test_public_function_uses_the_cuda_backend():
    student, teacher = logits(8, 100).requires_grad_(), logits(8, 100).requires_grad_()
    loss = rankkd.kendall_rank_loss(student, teacher, backend="cuda", reduction="none")
    (loss * torch.arange(1.0, 9.0, device="cuda")).sum().backward()
    s64, t64 = student.detach().double().requires_grad_(), teacher.detach().double().requires_grad_()
    ref = reference.kendall_rank_loss(s64, t64, reduction="none")
    (ref * torch.arange(1.0, 9.0, device="cuda", dtype=torch.float64)).sum().backward()
    assert rel_err(loss, ref) <= LOSS_TOL
    assert rel_err(student.grad, s64.grad) <= GRAD_TOL and rel_err(teacher.grad, t64.grad) <= GRAD_TOL


@needs_cuda
@pytest.mark.parametrize("dtype,flags", [(torch.float32, (False, True, True)), (torch.float32, (False, True, False)),
                                         (torch.float32, (True, True, False)), (torch.float32, (False, False, False)),
                                         (torch.float64, (False, True, True)), (torch.bfloat16, (True, True, False))])
def test_opcheck(dtype, flags):
    sign, grad_s, grad_t = flags
    student = logits(5, 70, dtype).requires_grad_(grad_s)
    teacher = logits(5, 70, dtype).requires_grad_(grad_t)
    torch.library.opcheck(torch.ops.rankkd.kendall_rank.default, (student, teacher, 1.3, sign, grad_s, grad_t))


# ---- without a GPU ---------------------------------------------------------------------------------------------------

def test_cuda_kernel_registered_when_built_with_cuda():
    # CI builds with FORCE_CUDA=1 and sets RANKKD_EXPECT_CUDA_KERNEL=1: then a build that silently left the CUDA
    # sources out (no toolkit found, a setup.py regression) fails here instead of passing every GPU test by skipping.
    if rankkd.ops.EXTENSION_ERROR is not None:
        pytest.skip(f"rankkd._C is not built: {rankkd.ops.EXTENSION_ERROR}")
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("rankkd::kendall_rank", "CUDA")
    if os.environ.get("RANKKD_EXPECT_CUDA_KERNEL") == "1":
        assert registered, "rankkd._C was built without its CUDA kernel although RANKKD_EXPECT_CUDA_KERNEL=1"
    elif not registered:
        pytest.skip("rankkd._C was built without CUDA (set RANKKD_EXPECT_CUDA_KERNEL=1 to require it)")
