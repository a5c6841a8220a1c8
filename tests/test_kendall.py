"""Every available backend of rankkd.kendall_rank_loss against the float64 reference (rankkd.reference)."""
import subprocess
import sys

import pytest
import torch

import rankkd
from rankkd import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in rankkd.available_backends(device)
         if backend != "reference"]
FUSED = pytest.mark.parametrize("device,backend", CASES, ids=[f"{d}-{b}" for d, b in CASES])
# Relative error allowed against float64 (DESIGN.md): exact-math paths 1e-5; on CUDA the default float32 paths use
# the hardware's fast tanh (tanh.approx.f32), allowed 2e-3. Float64 inputs always take an exact path.
EXACT_TOL, FAST_TOL = 1e-5, 2e-3


def float32_tol(device):
    return FAST_TOL if device == "cuda" else EXACT_TOL


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm()).item()


def logits(*shape, scale=3.0, device="cpu", dtype=torch.float64, seed=None):
    """Fresh random logits at a realistic scale (ImageNet-trained logits have a spread of a few units)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return (scale * torch.randn(*shape, dtype=torch.float64, generator=generator)).to(device=device, dtype=dtype)


def loss_and_grads(fn, student, teacher, **kwargs):
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_()
    loss = fn(student, teacher, **kwargs)
    # A random upstream gradient makes "none" meaningful and catches per-row scaling bugs.
    weight = torch.rand(loss.shape, dtype=loss.dtype, device=loss.device) + 0.5
    (loss * weight).sum().backward()
    return loss, student.grad, teacher.grad, weight


def check_against_reference(device, backend, student, teacher, tol, **kwargs):
    loss, g_s, g_t, weight = loss_and_grads(rankkd.kendall_rank_loss, student, teacher, backend=backend, **kwargs)
    s64, t64 = student.detach().double().requires_grad_(), teacher.detach().double().requires_grad_()
    ref = reference.kendall_rank_loss(s64, t64, **kwargs)
    (ref * weight.double()).sum().backward()
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= tol
    assert g_s.dtype == student.dtype and rel_err(g_s, s64.grad) <= tol
    if kwargs.get("teacher_mode", "tanh") == "sign":
        assert g_t is None and t64.grad is None
    else:
        assert g_t.dtype == teacher.dtype and rel_err(g_t, t64.grad) <= tol


@FUSED
@pytest.mark.parametrize("num_classes", [2, 3, 37, 1001])
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_float64_matches_reference(device, backend, num_classes, teacher_mode):
    rows = 3 if num_classes > 100 else 6
    student, teacher = logits(rows, num_classes, device=device), logits(rows, num_classes, device=device)
    check_against_reference(device, backend, student, teacher, tol=EXACT_TOL, teacher_mode=teacher_mode, k=0.7,
                            reduction="none")


@FUSED
@pytest.mark.parametrize("k", [1.0, 2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float32_matches_reference(device, backend, k, reduction):
    student, teacher = (logits(8, 100, device=device, dtype=torch.float32) for _ in range(2))
    check_against_reference(device, backend, student, teacher, tol=float32_tol(device), k=k, reduction=reduction)


@FUSED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(device, backend, dtype):
    student, teacher = (logits(5, 64, device=device, dtype=dtype) for _ in range(2))
    loss, g_s, g_t, weight = loss_and_grads(rankkd.kendall_rank_loss, student, teacher, backend=backend,
                                            reduction="none")
    assert loss.dtype == torch.float32 and g_s.dtype == dtype and g_t.dtype == dtype
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    ref = reference.kendall_rank_loss(s64, t64, reduction="none")
    (ref * weight.double()).sum().backward()
    assert rel_err(loss, ref) <= float32_tol(device)  # the inputs are exact in float32: no input rounding
    assert rel_err(g_s, s64.grad) <= 1e-2 and rel_err(g_t, t64.grad) <= 1e-2  # rounded to the input dtype


@FUSED
def test_leading_dims_noncontiguous_and_topk(device, backend):
    base_s, base_t = logits(7, 4, 50, device=device), logits(7, 4, 50, device=device)
    student, teacher = base_s.transpose(0, 1)[:, ::2], base_t.transpose(0, 1)[:, ::2]  # (4, 4, 50), strided
    assert not student.is_contiguous()
    check_against_reference(device, backend, student, teacher, tol=EXACT_TOL, reduction="none")
    check_against_reference(device, backend, student, teacher, tol=EXACT_TOL, topk=9, reduction="mean")


@FUSED
def test_topk_gradient_only_on_teacher_top_channels(device, backend):
    student, teacher = logits(4, 30, device=device), logits(4, 30, device=device)
    _, g_s, g_t, _ = loss_and_grads(rankkd.kendall_rank_loss, student, teacher, backend=backend, topk=5)
    top = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, teacher.topk(5, dim=-1).indices, True)
    assert (g_s[~top] == 0).all() and (g_t[~top] == 0).all()
    assert (g_s[top] != 0).all()


@FUSED
@pytest.mark.parametrize("scale", [40.0, 1e-4])
def test_saturated_and_near_zero_logits(device, backend, scale):
    student = logits(4, 200, scale=scale, device=device, dtype=torch.float32)
    teacher = logits(4, 200, scale=scale, device=device, dtype=torch.float32)
    check_against_reference(device, backend, student, teacher, tol=float32_tol(device), reduction="none")


@FUSED
def test_non_finite_rows_give_nan(device, backend):
    student, teacher = logits(4, 20, device=device), logits(4, 20, device=device)
    student[1, 3] = float("inf")
    teacher[2, 0] = float("nan")
    out = rankkd.kendall_rank_loss(student, teacher, backend=backend, reduction="none")
    assert out[1].isnan() and out[2].isnan()
    ref = reference.kendall_rank_loss(student, teacher, reduction="none")
    assert torch.isnan(ref[1]) and torch.isnan(ref[2])
    torch.testing.assert_close(out[[0, 3]], ref[[0, 3]], rtol=1e-9, atol=0)


@FUSED
def test_deterministic(device, backend):
    student, teacher = logits(16, 300, device=device, dtype=torch.float32), logits(16, 300, device=device)
    first = loss_and_grads(rankkd.kendall_rank_loss, student, teacher.float(), backend=backend)
    torch.manual_seed(0)  # the upstream weight is random: draw the same one
    first = loss_and_grads(rankkd.kendall_rank_loss, student, teacher.float(), backend=backend)
    torch.manual_seed(0)
    second = loss_and_grads(rankkd.kendall_rank_loss, student, teacher.float(), backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", [b for b in rankkd.available_backends("cpu") if b != "triton"])
def test_gradcheck_float64(backend):
    student, teacher = logits(3, 7).requires_grad_(), logits(3, 7).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, t: rankkd.kendall_rank_loss(s, t, k=0.8, reduction="none", backend=backend), (student, teacher))


# Inductor on CPU tensors compiles C++; for the Triton interpreter it adds nothing aot_eager does not check.
COMPILE_CASES = [(device, backend, compiler) for device, backend in CASES for compiler in ("aot_eager", "inductor")
                 if (device, backend, compiler) != ("cpu", "triton", "inductor")]


@pytest.mark.parametrize("device,backend,compile_backend", COMPILE_CASES, ids=["-".join(c) for c in COMPILE_CASES])
@pytest.mark.parametrize("teacher_requires_grad", [False, True])
def test_compile_fullgraph_matches_eager(device, backend, compile_backend, teacher_requires_grad):
    def step(student, teacher):
        return rankkd.kendall_rank_loss(student, teacher, k=1.5, topk=40, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    student = logits(6, 64, device=device, dtype=torch.float32)
    teacher = logits(6, 64, device=device, dtype=torch.float32)
    results = []
    for fn in (step, compiled):
        s = student.clone().requires_grad_()
        t = teacher.clone().requires_grad_(teacher_requires_grad)
        loss = fn(s, t)
        loss.backward()
        results.append((loss, s.grad, t.grad))
    for eager, compiled_out in zip(*results):
        torch.testing.assert_close(compiled_out, eager)


@pytest.mark.skipif("cpu" not in rankkd.available_backends("cpu"), reason="rankkd._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("flags", [(False, True, True), (False, True, False), (True, True, False),
                                   (False, False, False)])
def test_opcheck(dtype, flags):
    sign, grad_s, grad_t = flags
    student = logits(5, 19, dtype=dtype).requires_grad_(grad_s)
    teacher = logits(5, 19, dtype=dtype).requires_grad_(grad_t)
    torch.library.opcheck(torch.ops.rankkd.kendall_rank.default, (student, teacher, 1.3, sign, grad_s, grad_t))


def test_autocast_and_mixed_dtypes():
    student, teacher = logits(4, 50, dtype=torch.bfloat16).requires_grad_(), logits(4, 50, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = rankkd.kendall_rank_loss(student, teacher)
    loss.backward()
    assert loss.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    ref = reference.kendall_rank_loss(student.double(), teacher.double())
    assert rel_err(loss, ref) <= 1e-5


def test_module_matches_function():
    student, teacher = logits(3, 10), logits(3, 10)
    module = rankkd.KendallRankLoss(k=2.0, teacher_mode="sign", reduction="sum")
    torch.testing.assert_close(module(student, teacher),
                               rankkd.kendall_rank_loss(student, teacher, k=2.0, teacher_mode="sign", reduction="sum"))


def test_row_loss_is_one_minus_kendall_tau_in_the_hard_limit():
    # With a steep tanh and sign mode, 1 - loss is Kendall's tau-a of two tie-free rankings.
    student, teacher = logits(1, 9), logits(1, 9)
    s, t = student[0].tolist(), teacher[0].tolist()
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9)]
    tau = sum((1 if (s[i] - s[j]) * (t[i] - t[j]) > 0 else -1) for i, j in pairs) / len(pairs)
    out = rankkd.kendall_rank_loss(student * 1e4, teacher, teacher_mode="sign")
    assert abs((1 - out.item()) - tau) < 1e-9


@pytest.mark.parametrize("call,message", [
    (lambda s, t: rankkd.kendall_rank_loss(s, t[:, :-1]), "shape"),
    (lambda s, t: rankkd.kendall_rank_loss(s[:, :1], t[:, :1]), "C >= 2"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, topk=1), "topk"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, topk=11), "topk"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, k=0.0), "k "),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, k=-1.0), "k "),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, k=float("nan")), "k "),
    (lambda s, t: rankkd.kendall_rank_loss(s.long(), t), "student"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t.int()), "teacher"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t.to("meta")), "device"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, teacher_mode="hard"), "teacher_mode"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, reduction="avg"), "reduction"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, backend="numpy"), "backend"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call(logits(4, 10), logits(4, 10))
    assert message in str(info.value)


def test_unavailable_backend_says_how_to_get_it():
    with pytest.raises(RuntimeError, match="CUDA"):
        rankkd.kendall_rank_loss(logits(2, 5), logits(2, 5), backend="cuda")


def test_import_without_extension_falls_back_to_reference():
    script = (
        "import sys, warnings\n"
        "sys.modules['rankkd._C'] = None\n"  # makes `from rankkd import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import rankkd, torch\n"
        "assert sum('rankkd._C is not built' in str(w.message) for w in caught) == 1, caught\n"
        "assert 'cpu' not in rankkd.available_backends('cpu')\n"
        "s, t = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6)\n"
        "rankkd.kendall_rank_loss(s, t).backward()\n"
        "assert s.grad is not None\n"
        "try:\n"
        "    rankkd.kendall_rank_loss(s, t, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'setup.py develop' in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend=cpu should fail without the extension')\n")
    subprocess.run([sys.executable, "-c", script], check=True)
