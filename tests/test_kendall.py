"""Every available backend of rankkd.kendall_rank_loss against the float64 reference (rankkd.reference)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankkd
from conftest import logits, rel_err
from rankkd import _args, _fused, reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [(device, backend) for device in DEVICES for backend in rankkd.available_backends(device)
         if backend != "reference"]
FUSED = pytest.mark.parametrize("device,backend", CASES, ids=[f"{d}-{b}" for d, b in CASES])
# Relative error allowed against float64 (docs/design.md): exact-math paths 1e-5; precision="fast" on CUDA tensors
# lets the GPU backends use the hardware's tanh (tanh.approx.f32), allowed 2e-3. Float64 inputs are always exact.
EXACT_TOL, FAST_TOL = 1e-5, 2e-3


def float32_tol(device, precision="fast"):
    return FAST_TOL if device == "cuda" and precision == "fast" else EXACT_TOL


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
@pytest.mark.parametrize("precision", _args.PRECISIONS)
def test_float32_matches_reference(device, backend, k, reduction, precision):
    student, teacher = (logits(8, 100, device=device, dtype=torch.float32) for _ in range(2))
    check_against_reference(device, backend, student, teacher, tol=float32_tol(device, precision), k=k,
                            reduction=reduction, precision=precision)


@FUSED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", _args.PRECISIONS)
def test_half_inputs_compute_in_float32(device, backend, dtype, precision):
    student, teacher = (logits(5, 64, device=device, dtype=dtype) for _ in range(2))
    loss, g_s, g_t, weight = loss_and_grads(rankkd.kendall_rank_loss, student, teacher, backend=backend,
                                            reduction="none", precision=precision)
    assert loss.dtype == torch.float32 and g_s.dtype == dtype and g_t.dtype == dtype
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    ref = reference.kendall_rank_loss(s64, t64, reduction="none")
    (ref * weight.double()).sum().backward()
    assert rel_err(loss, ref) <= float32_tol(device, precision)  # the inputs are exact in float32: no input rounding
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
@pytest.mark.parametrize("precision", _args.PRECISIONS)
def test_saturated_and_near_zero_logits(device, backend, scale, precision):
    student = logits(4, 200, scale=scale, device=device, dtype=torch.float32)
    teacher = logits(4, 200, scale=scale, device=device, dtype=torch.float32)
    check_against_reference(device, backend, student, teacher, tol=float32_tol(device, precision), reduction="none",
                            precision=precision)


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
    mode = "sign" if sign else "tanh"
    torch.library.opcheck(torch.ops.rankkd.kendall_rank.default, (student, teacher, 1.3, mode, "exact", grad_s, grad_t))


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
    module = rankkd.KendallRankLoss(k=2.0, teacher_mode="sign", reduction="sum", precision="exact")
    assert "precision='exact'" in repr(module)
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
    (lambda s, t: rankkd.kendall_rank_loss(s, t, precision="medium"), "precision"),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, k=1e-39), "k "),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, k=1e39), "k "),
    (lambda s, t: rankkd.kendall_rank_loss(s, t, backend="numpy"), "backend"),
])
def test_bad_input_names_the_argument(call, message):
    with pytest.raises((ValueError, TypeError)) as info:
        call(logits(4, 10), logits(4, 10))
    assert message in str(info.value)


def test_unavailable_backend_says_how_to_get_it():
    with pytest.raises(RuntimeError, match="CUDA"):
        rankkd.kendall_rank_loss(logits(2, 5), logits(2, 5), backend="cuda")


# ---- one k rule for every backend and dtype ----

K_ACCEPTED = [_args.K_MIN, 1.0, _args.K_MAX]
K_REJECTED = [_args.K_MIN / 2, 0.0, -1.0, _args.K_MAX * 2, float("inf"), float("nan")]
BACKEND_CASES = [(device, backend) for device in DEVICES for backend in rankkd.available_backends(device)]


@pytest.mark.parametrize("device,backend", BACKEND_CASES, ids=[f"{d}-{b}" for d, b in BACKEND_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# k = 3.4e38 times a logit difference overflows to inf, which tanh takes to +-1: the Triton interpreter's numpy warns.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_every_backend_accepts_and_rejects_the_same_k(device, backend, dtype):
    student, teacher = logits(3, 6, device=device, dtype=dtype), logits(3, 6, device=device, dtype=dtype)
    for k in K_ACCEPTED:
        loss = rankkd.kendall_rank_loss(student, teacher, k=k, backend=backend, reduction="none")
        assert loss.isfinite().all() and (loss >= 0).all() and (loss <= 2).all()
    for k in K_REJECTED:
        with pytest.raises(ValueError, match=r"k \(the tanh steepness\)"):
            rankkd.kendall_rank_loss(student, teacher, k=k, backend=backend)


FUSED_OPS = ([("rankkd::kendall_rank", device) for device in DEVICES if device in rankkd.ops.EXTENSION_DEVICES]
             + [("rankkd::kendall_rank_triton", device) for device in DEVICES if device in rankkd.ops.TRITON_DEVICES])


@pytest.mark.parametrize("op_name,device", FUSED_OPS, ids=[f"{o}-{d}" for o, d in FUSED_OPS])
def test_fused_ops_state_the_k_rule_in_the_same_words(op_name, device):
    op = getattr(torch.ops.rankkd, op_name.split("::")[1])
    student, teacher = logits(2, 5, device=device), logits(2, 5, device=device)
    for k in K_ACCEPTED:
        loss, _, _ = op(student, teacher, k, "tanh", "exact", False, False)
        assert loss.isfinite().all()
    for k in K_REJECTED:
        with pytest.raises((ValueError, RuntimeError)) as info:
            op(student, teacher, k, "tanh", "exact", False, False)
        assert f"{op_name}: {_args.K_RULE}, got" in str(info.value)


@pytest.mark.parametrize("op_name,device", FUSED_OPS, ids=[f"{o}-{d}" for o, d in FUSED_OPS])
@pytest.mark.parametrize("argument,call", [
    ("teacher_mode", lambda op, s, t: op(s, t, 1.0, "hard", "exact", True, False)),
    ("precision", lambda op, s, t: op(s, t, 1.0, "tanh", "approx", True, False)),
    ("teacher_mode 'sign'", lambda op, s, t: op(s, t, 1.0, "sign", "exact", True, True)),
])
def test_fused_ops_check_their_string_arguments(op_name, device, argument, call):
    op = getattr(torch.ops.rankkd, op_name.split("::")[1])
    with pytest.raises((ValueError, RuntimeError), match=f"{op_name}: {argument}"):
        call(op, logits(2, 5, device=device), logits(2, 5, device=device))


# ---- double backward and torch.func ----

DOUBLE_BACKWARD_BACKENDS = [b for b in rankkd.available_backends("cpu") if b != "reference"]


# The double-backward formula is one Python function for every fused op. Triton on CPU tensors is its interpreter,
# whose forward is slow: it runs the smaller shapes only.
GRADGRAD_CASES = [(backend, num_classes) for backend in DOUBLE_BACKWARD_BACKENDS for num_classes in (2, 3, 17)
                  if not (backend == "triton" and num_classes == 17)]


@pytest.mark.parametrize("backend,num_classes", GRADGRAD_CASES, ids=[f"{b}-C{c}" for b, c in GRADGRAD_CASES])
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
@pytest.mark.parametrize("teacher_requires_grad", [False, True])
def test_double_backward_gradgradcheck(backend, num_classes, teacher_mode, teacher_requires_grad):
    student = logits(3, num_classes, requires_grad=True)
    teacher = logits(3, num_classes, requires_grad=teacher_requires_grad)
    assert torch.autograd.gradgradcheck(
        lambda s, t: rankkd.kendall_rank_loss(s, t, k=0.8, teacher_mode=teacher_mode, reduction="none",
                                              backend=backend), (student, teacher))


@pytest.mark.parametrize("backend", DOUBLE_BACKWARD_BACKENDS)
@pytest.mark.parametrize("teacher_mode", ["tanh", "sign"])
def test_double_backward_matches_reference_second_derivatives(backend, teacher_mode):
    # Hessian-vector products through a gradient penalty: d/d(s, t) of <dL/ds, v>, against the reference's.
    student, teacher = logits(4, 37), logits(4, 37)
    direction = logits(4, 37)
    results = []
    for name in (backend, "reference"):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
        loss = rankkd.kendall_rank_loss(s, t, k=1.3, teacher_mode=teacher_mode, backend=name)
        (grad_s,) = torch.autograd.grad(loss, s, create_graph=True)
        second = torch.autograd.grad((grad_s * direction).sum(), (s, t), allow_unused=True)
        results.append((grad_s.detach(), *second))
    (grad_s, hvp_s, hvp_t), (ref_grad_s, ref_hvp_s, ref_hvp_t) = results
    assert rel_err(grad_s, ref_grad_s) <= 1e-12
    assert hvp_s.abs().max() > 0 and rel_err(hvp_s, ref_hvp_s) <= 1e-12
    if teacher_mode == "tanh":
        assert rel_err(hvp_t, ref_hvp_t) <= 1e-12
    else:
        assert hvp_t is None and ref_hvp_t is None


def test_differentiable_gradients_are_chunked_closed_forms():
    # The double-backward path's gradients against autograd of the reference, with chunks that do not divide C.
    student, teacher = logits(3, 23), logits(3, 23)
    for teacher_mode in ("tanh", "sign"):
        s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_(teacher_mode == "tanh")
        loss = reference.row_losses(s, t, 0.9, teacher_mode).sum()
        expected = torch.autograd.grad(loss, (s, t) if teacher_mode == "tanh" else (s,))
        grad_s, grad_t = _fused.row_gradients(student, teacher, 0.9, teacher_mode, chunk=5)
        assert rel_err(grad_s, expected[0]) <= 1e-13
        assert grad_t is None if teacher_mode == "sign" else rel_err(grad_t, expected[1]) <= 1e-13


@pytest.mark.parametrize("backend", DOUBLE_BACKWARD_BACKENDS)
def test_double_backward_keeps_non_finite_rows_nan(backend):
    student, teacher = logits(3, 6), logits(3, 6)
    student[1, 2] = float("inf")
    s = student.requires_grad_()
    loss = rankkd.kendall_rank_loss(s, teacher, reduction="sum", backend=backend)
    (grad_s,) = torch.autograd.grad(loss, s, create_graph=True)
    assert grad_s[1].isnan().all() and grad_s[[0, 2]].isfinite().all()


@pytest.mark.parametrize("backend", DOUBLE_BACKWARD_BACKENDS)
def test_torch_func_is_refused_clearly_by_fused_backends(backend):
    student, teacher = logits(3, 8), logits(3, 8)
    with pytest.raises(RuntimeError, match="torch.func.*backend='reference'"):
        torch.func.grad(lambda s: rankkd.kendall_rank_loss(s, teacher, backend=backend))(student)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.vmap(lambda s: rankkd.kendall_rank_loss(s, teacher[0], backend=backend))(student)


def test_torch_func_works_with_the_reference_backend():
    student, teacher = logits(3, 8), logits(3, 8)
    grad = torch.func.grad(lambda s: rankkd.kendall_rank_loss(s, teacher, backend="reference"))(student)
    s = student.clone().requires_grad_()
    rankkd.kendall_rank_loss(s, teacher).backward()
    assert rel_err(grad, s.grad) <= 1e-12


# ---- without the extension ----

def test_missing_extension_says_how_to_build_it(tmp_path):
    # A checkout that was never built: the package's sources without rankkd/_C*.so, imported from its own folder
    # (the editable install's finder, which would find this checkout's _C, is taken off the import path).
    shutil.copytree(Path(rankkd.__file__).parent, tmp_path / "rankkd",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    script = (
        "import sys, warnings\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import rankkd, torch\n"
        "assert rankkd.__file__.startswith(sys.argv[1]), rankkd.__file__\n"
        "messages = [str(w.message) for w in caught if 'rankkd._C' in str(w.message)]\n"
        "assert len(messages) == 1, [str(w.message) for w in caught]\n"
        "print(messages[0])\n"
        "assert 'cpu' not in rankkd.available_backends('cpu')\n"
        "s, t = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6)\n"
        "rankkd.kendall_rank_loss(s, t).backward()\n"
        "assert s.grad is not None\n"
        "try:\n"
        "    rankkd.kendall_rank_loss(s, t, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise AssertionError('backend=cpu should fail without the extension')\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    warning, error = result.stdout.strip().splitlines()
    for message in (warning, error):
        assert "is not built" in message and "circular import" not in message
        assert "pip install -e . --no-build-isolation" in message and "python setup.py develop" in message
