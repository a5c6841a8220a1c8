"""What is specific to the CUDA kernel (csrc/kendall_cuda.cu): both precisions ("fast": MUFU.TANH, "exact": tanhf)
against float64, large C, the split of a row over several CTAs (parts), NaN rows, determinism, fully written outputs
and opcheck on CUDA tensors; and, without a GPU, that a FORCE_CUDA build registered the kernel. The shared contract
of every backend is tested in test_kendall.py."""
import ast
import functools
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import rankkd
from closed_form import closed_form_outputs
from conftest import logits, rel_err
from rankkd import reference

# Relative norm error against float64 for float32 math (docs/design.md): exact 1e-5; fast (MUFU.TANH, good to about
# 1e-5 relative per tanh) 2e-3 on gradients and, for the loss, a tenth of that.
LOSS_TOL = {"exact": 1e-5, "fast": 2e-4}
GRAD_TOL = {"exact": 1e-5, "fast": 2e-3}
PRECISION = pytest.mark.parametrize("precision", ["fast", "exact"])

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in rankkd.available_backends("cuda"),
    reason="needs a CUDA GPU and rankkd._C built with its CUDA kernel")

cuda_logits = functools.partial(logits, device="cuda", dtype=torch.float32)


def kendall_rank(student, teacher, k=1.0, teacher_mode="tanh", precision="fast", grad_student=True,
                 grad_teacher=True):
    return torch.ops.rankkd.kendall_rank(student, teacher, k, teacher_mode, precision, grad_student, grad_teacher)


def expected_outputs(student, teacher, k, teacher_mode, chunk=256):
    """Per-row loss and gradients in float64, shaped like the op's outputs. Up to C = 4096 from rankkd.reference and
    autograd (rows are independent, so the gradient of the summed rows holds each row's own); beyond, from the closed
    forms of docs/design.md chunked over i, which never builds a rows x C x C tensor."""
    s, t = student.detach().double(), teacher.detach().double()
    if s.shape[1] <= 4096:
        s.requires_grad_()
        t.requires_grad_(teacher_mode == "tanh")
        loss = reference.row_losses(s, t, k, teacher_mode)
        grads = torch.autograd.grad(loss.sum(), (s, t) if teacher_mode == "tanh" else (s,))
        return loss.detach(), grads[0], grads[1] if teacher_mode == "tanh" else None
    return closed_form_outputs(s, t, k, teacher_mode, chunk)


def check_against_float64(student, teacher, k, teacher_mode, precision, loss_tol, grad_tol):
    grad_teacher = teacher_mode == "tanh"
    loss, grad_s, grad_t = kendall_rank(student, teacher, k, teacher_mode, precision, True, grad_teacher)
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == grad_s.dtype == grad_t.dtype == acc
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student, teacher, k, teacher_mode)
    assert loss.shape == ref_loss.shape and rel_err(loss, ref_loss) <= loss_tol
    assert grad_s.shape == ref_grad_s.shape and rel_err(grad_s, ref_grad_s) <= grad_tol
    if grad_teacher:
        assert grad_t.shape == ref_grad_t.shape and rel_err(grad_t, ref_grad_t) <= grad_tol
    else:
        assert grad_t.shape == (0,)


# ---- each precision ----------------------------------------------------------------------------------------------

@needs_cuda
@PRECISION
@pytest.mark.parametrize("rows,n", [(33, 2), (17, 3), (5, 1001), (2, 4096), (1, 32768)])
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_float32_matches_float64(precision, rows, n, teacher_mode):
    student, teacher = cuda_logits(rows, n), cuda_logits(rows, n)
    check_against_float64(student, teacher, 0.7, teacher_mode, precision, LOSS_TOL[precision], GRAD_TOL[precision])


@needs_cuda
@PRECISION
@pytest.mark.parametrize("grad_student,grad_teacher", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("rows,n", [(6, 300), (600, 50)])  # several CTAs per row; one (the pair kernel finalizes)
def test_each_gradient_alone(precision, grad_student, grad_teacher, rows, n):
    student, teacher = cuda_logits(rows, n), cuda_logits(rows, n)
    loss, grad_s, grad_t = kendall_rank(student, teacher, 1.3, "tanh", precision, grad_student, grad_teacher)
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student, teacher, 1.3, "tanh")
    assert rel_err(loss, ref_loss) <= LOSS_TOL[precision]
    for wanted, grad, ref_grad in ((grad_student, grad_s, ref_grad_s), (grad_teacher, grad_t, ref_grad_t)):
        if wanted:
            assert rel_err(grad, ref_grad) <= GRAD_TOL[precision]
        else:
            assert grad.shape == (0,)


@needs_cuda
@PRECISION
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(precision, dtype):
    # The op's outputs against float64 math on the same (already rounded) inputs: only the kernel's error remains.
    student, teacher = cuda_logits(64, 1000, dtype=dtype), cuda_logits(64, 1000, dtype=dtype)
    check_against_float64(student, teacher, 1.0, "tanh", precision, LOSS_TOL[precision], GRAD_TOL[precision])


@needs_cuda
@PRECISION
@pytest.mark.parametrize("scale", [100.0, 1e-4])
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_saturated_and_near_zero_logits(precision, scale, teacher_mode):
    # 100: nearly every pair is saturated (tanh = +-1, sech^2 ~ 0) and the gradient comes from a few close pairs, so a
    # tanh that stops short of +-1 would show. 1e-4: every tanh is tiny, so relative accuracy near 0 shows.
    student, teacher = cuda_logits(4, 1000, scale=scale), cuda_logits(4, 1000, scale=scale)
    check_against_float64(student, teacher, 1.0, teacher_mode, precision, LOSS_TOL[precision], GRAD_TOL[precision])


@needs_cuda
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_fully_saturated_rows_have_exactly_zero_gradients(teacher_mode):
    # Every |k (x_i - x_j)| >= 10 (logits 10 apart, k = 1): sech^2 rounds to 0 in float32, so the fast path's pinned
    # tanh must give exactly zero gradients; a tanh stopping short of +-1 would leave 1 - tanh^2 > 0 in every pair.
    base = 10.0 * torch.arange(300, dtype=torch.float32, device="cuda")
    student = base[torch.randperm(300, device="cuda")].repeat(3, 1)
    teacher = base[torch.randperm(300, device="cuda")].repeat(3, 1)
    _, grad_s, grad_t = kendall_rank(student, teacher, 1.0, teacher_mode, "fast", True, teacher_mode == "tanh")
    assert torch.equal(grad_s, torch.zeros_like(grad_s))
    if teacher_mode == "tanh":
        assert torch.equal(grad_t, torch.zeros_like(grad_t))


def extreme_case(name, rows=3, n=37):
    """(student, teacher, k, teacher modes) at the edges of the op's contract, float32 CUDA logits (the cases of
    test_triton.py's extreme_case). The fast path multiplies the logits by k once (prepare); these check its guards:
    a row where some |k x| would overflow is evaluated unscaled (all its work on the row's first CTA), the sign
    teacher is never scaled, and sign(0) = 0."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    def randn(scale):
        return (scale * torch.randn(rows, n, generator=g, dtype=torch.float64)).float()
    if name == "k_max":
        s, t, k, modes = randn(3.0), randn(3.0), 3.4e38, ("tanh", "sign")
    elif name == "k_huge_tiny_logits":  # logits stay normal floats: no denormal flushing question
        s, t, k, modes = randn(3e-33), randn(3e-33), 1e33, ("tanh", "sign")
    elif name == "k_min_huge_logits":
        s, t, k, modes = randn(3e36), randn(3e36), 2.0 ** -126, ("tanh", "sign")
    elif name == "absurd_logits":
        s, t, k, modes = randn(3.0), randn(3.0), 1.0, ("tanh", "sign")
        s[1, :4] = torch.tensor([3e38, 2e38, -2e38, -3e38])
        t[1, 5:9] = torch.tensor([3e38, 2.5e38, -2e38, -3e38])
    elif name == "sign_teacher_underflow":
        s = randn(3e30)
        t = 1e-10 * torch.randint(0, 6, (rows, n), generator=g).float() * (
            1 + 1e-6 * torch.randint(0, 2, (rows, n), generator=g))
        k, modes = 1e-30, ("sign",)
    elif name == "ties":
        s = torch.randint(-2, 3, (rows, n), generator=g).float()
        t = torch.randint(-2, 3, (rows, n), generator=g).float()
        t[t == 0] = torch.where(torch.arange(n) % 2 == 0, 0.0, -0.0).expand(rows, n)[t == 0]
        k, modes = 0.7, ("tanh", "sign")
    else:
        raise ValueError(name)
    return s.cuda(), t.cuda(), k, modes


EXTREME = [(name, mode, rows, n) for name, rows, n in [
    ("k_max", 3, 37), ("k_huge_tiny_logits", 3, 37), ("k_min_huge_logits", 3, 37), ("absurd_logits", 3, 37),
    ("absurd_logits", 2, 1001), ("sign_teacher_underflow", 3, 37), ("ties", 3, 37), ("ties", 2, 1001)]
    for mode in ("tanh", "sign") if name != "sign_teacher_underflow" or mode == "sign"]


@needs_cuda
@PRECISION
@pytest.mark.parametrize("name,teacher_mode,rows,n", EXTREME, ids=[f"{e[0]}-{e[1]}-{e[2]}x{e[3]}" for e in EXTREME])
def test_extreme_k_and_logits_keep_the_contract(precision, name, teacher_mode, rows, n):
    student, teacher, k, _ = extreme_case(name, rows, n)
    grad_teacher = teacher_mode == "tanh"
    loss, grad_s, grad_t = kendall_rank(student, teacher, k, teacher_mode, precision, True, grad_teacher)
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student, teacher, k, teacher_mode)
    assert torch.isfinite(loss).all() and rel_err(loss, ref_loss) <= LOSS_TOL[precision]
    for grad, ref in ((grad_s, ref_grad_s),) + (((grad_t, ref_grad_t),) if grad_teacher else ()):
        assert torch.isfinite(grad).all()
        if ref.norm() == 0:  # every pair saturated (k = 3.4e38): exactly zero
            assert torch.equal(grad, torch.zeros_like(grad))
        elif ref.abs().max() < 1e-30:  # k = 2^-126: float32 holds a subnormal or 0
            assert grad.abs().max() < 1e-30
        else:
            assert rel_err(grad, ref) <= GRAD_TOL[precision]


@needs_cuda
def test_overflowing_row_with_non_finite_logit_is_nan():
    student, teacher, _, _ = extreme_case("absurd_logits", 3, 300)
    student[1, 10] = float("nan")
    loss, grad_s, grad_t = kendall_rank(student, teacher, 1.0, "tanh", "fast", True, True)
    assert torch.isnan(loss[1]) and torch.isnan(grad_s[1]).all() and torch.isnan(grad_t[1]).all()
    ref_loss, ref_grad_s, _ = expected_outputs(student[[0, 2]], teacher[[0, 2]], 1.0, "tanh")
    assert rel_err(loss[[0, 2]], ref_loss) <= LOSS_TOL["fast"] and rel_err(grad_s[[0, 2]], ref_grad_s) <= 2e-3


@needs_cuda
@pytest.mark.xfail(strict=False, reason="a question, not a rule: XPASS = MUFU.TANH itself returns exactly +-1 beyond "
                                        "|x| = 9.02, so the kernels' pin (kendall_tanh.cuh) could go")
def test_hardware_tanh_saturates():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def raw_tanh(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        tl.store(y_ptr + offs, y, mask=offs < n)

    magnitude = torch.linspace(9.02, 100.0, 1 << 20, device="cuda")
    x = torch.cat([magnitude, -magnitude])
    y = torch.empty_like(x)
    raw_tanh[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y, torch.sign(x))


@needs_cuda
@PRECISION
@pytest.mark.parametrize("rows,n", [(1, 4096), (700, 100)])
def test_deterministic(precision, rows, n):
    # (1, 4096) splits the row over hundreds of CTAs and a reduction pass; (700, 100) gives each row one CTA.
    student, teacher = cuda_logits(rows, n), cuda_logits(rows, n)
    first = kendall_rank(student, teacher, 1.0, "tanh", precision, True, True)
    second = kendall_rank(student, teacher, 1.0, "tanh", precision, True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_cuda
def test_precisions_run_different_tanh():
    # Both within their bounds above, but not the same code: fast and exact must differ somewhere.
    student, teacher = cuda_logits(8, 500), cuda_logits(8, 500)
    fast = kendall_rank(student, teacher, 1.0, "tanh", "fast")
    exact = kendall_rank(student, teacher, 1.0, "tanh", "exact")
    assert not torch.equal(fast[1], exact[1])


# ---- precision-independent -------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("rows,n", [(6, 37), (2, 4096)])
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
@PRECISION
def test_float64_inputs_take_the_exact_double_path(rows, n, teacher_mode, precision):
    student, teacher = cuda_logits(rows, n, dtype=torch.float64), cuda_logits(rows, n, dtype=torch.float64)
    check_against_float64(student, teacher, 0.7, teacher_mode, precision, 1e-10, 1e-10)


@needs_cuda
@pytest.mark.parametrize("rows,n", [(5, 20), (3, 5000)])
def test_non_finite_rows_give_nan(rows, n):
    # (3, 5000) has several CTAs per row: the flag must reach the reduction pass too.
    student, teacher = cuda_logits(rows, n), cuda_logits(rows, n)
    student[1, 3] = float("inf")
    teacher[2, n - 1] = float("nan")
    loss, grad_s, grad_t = kendall_rank(student, teacher)
    assert loss[1:3].isnan().all() and grad_s[1:3].isnan().all() and grad_t[1:3].isnan().all()
    ref_loss, ref_grad_s, ref_grad_t = expected_outputs(student[[0]], teacher[[0]], 1.0, "tanh")
    assert rel_err(loss[[0]], ref_loss) <= LOSS_TOL["fast"] and rel_err(grad_s[[0]], ref_grad_s) <= GRAD_TOL["fast"]
    assert rel_err(grad_t[[0]], ref_grad_t) <= GRAD_TOL["fast"]


@needs_cuda
@PRECISION
@pytest.mark.parametrize("rows,n", [(3, 70), (1, 3000), (500, 129)])
def test_every_output_is_written(precision, rows, n):
    # Fill the caching allocator's free memory with NaN first: the op's outputs and scratch are carved from it, so an
    # element the kernels forget to write shows up as NaN.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    poison = torch.full((64 << 20,), float("nan"), device="cuda")
    del poison
    student, teacher = cuda_logits(rows, n), cuda_logits(rows, n)
    for out in kendall_rank(student, teacher, precision=precision):
        assert out.isfinite().all()


@needs_cuda
def test_zero_rows():
    empty = torch.empty(0, 10, device="cuda")
    loss, grad_s, grad_t = kendall_rank(empty, empty)
    assert loss.shape == (0,) and grad_s.shape == (0, 10) and grad_t.shape == (0, 10)


@needs_cuda
def test_public_function_uses_the_cuda_backend():
    student, teacher = cuda_logits(8, 100).requires_grad_(), cuda_logits(8, 100).requires_grad_()
    loss = rankkd.kendall_rank_loss(student, teacher, backend="cuda", reduction="none")
    (loss * torch.arange(1.0, 9.0, device="cuda")).sum().backward()
    s64, t64 = student.detach().double().requires_grad_(), teacher.detach().double().requires_grad_()
    ref = reference.kendall_rank_loss(s64, t64, reduction="none")
    (ref * torch.arange(1.0, 9.0, device="cuda", dtype=torch.float64)).sum().backward()
    assert rel_err(loss, ref) <= LOSS_TOL["fast"]  # precision="fast" is the default
    assert rel_err(student.grad, s64.grad) <= GRAD_TOL["fast"] and rel_err(teacher.grad, t64.grad) <= GRAD_TOL["fast"]


@needs_cuda
@PRECISION
@pytest.mark.parametrize("dtype,flags", [
    (torch.float32, ("tanh", True, True)), (torch.float32, ("tanh", True, False)),
    (torch.float32, ("sign", True, False)), (torch.float32, ("tanh", False, False)),
    (torch.float64, ("tanh", True, True)), (torch.bfloat16, ("sign", True, False)),
])
def test_opcheck(precision, dtype, flags):
    teacher_mode, grad_s, grad_t = flags
    student = cuda_logits(5, 70, dtype=dtype).requires_grad_(grad_s)
    teacher = cuda_logits(5, 70, dtype=dtype).requires_grad_(grad_t)
    torch.library.opcheck(torch.ops.rankkd.kendall_rank.default,
                          (student, teacher, 1.3, teacher_mode, precision, grad_s, grad_t))


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


def _default_archs():
    """setup.py's DEFAULT_ARCHS ("8.0;...;12.0+PTX") as ({"sm_80", ...}, {"sm_120"}): SASS and PTX architectures."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "setup.py").read_text())
    value = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "DEFAULT_ARCHS" for target in node.targets))
    names = [(f"sm_{arch.removesuffix('+PTX').replace('.', '')}", arch.endswith("+PTX")) for arch in value.split(";")]
    return {name for name, _ in names}, {name for name, ptx in names if ptx}


def test_extension_carries_every_default_architecture():
    # CI builds without TORCH_CUDA_ARCH_LIST and sets RANKKD_EXPECT_DEFAULT_ARCHS=1: the built library must then hold
    # SASS for each architecture of setup.py's default list and PTX for the newest, or a GPU of that generation cannot
    # load the kernel.
    if os.environ.get("RANKKD_EXPECT_DEFAULT_ARCHS") != "1":
        pytest.skip("set RANKKD_EXPECT_DEFAULT_ARCHS=1 for a build with setup.py's default architectures")
    triton = pytest.importorskip("triton")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if rankkd.ops.EXTENSION_ERROR is not None:
        pytest.fail(f"rankkd._C is not built: {rankkd.ops.EXTENSION_ERROR}")
    so_path = next(Path(rankkd.__file__).parent.glob("_C*.so"))
    def listed(flag):
        out = subprocess.run([str(cuobjdump), flag, str(so_path)], capture_output=True, text=True, check=True).stdout
        return set(re.findall(r"\.(sm_\d+)\.(?:cubin|ptx)", out))
    sass, ptx = _default_archs()
    assert listed("-lelf") == sass
    assert listed("-lptx") == ptx
