"""rankkd.kendall_rank_loss: the public op, its backend choice, and the registration of the fused operators."""
import importlib.util
import os
import warnings

import torch

from rankkd import _fused, reference
from rankkd._args import PRECISIONS, TEACHER_MODES, as_rows, check_choice, check_inputs, reduce_rows

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
__all__ = ["BACKENDS", "PRECISIONS", "TEACHER_MODES", "KendallRankLoss", "available_backends", "kendall_rank_loss"]

BUILD_HINT = ("build it in the rankkd source folder with `pip install -e . --no-build-isolation` "
              "(or `python setup.py develop`)")

if importlib.util.find_spec("rankkd._C") is None:
    # Said plainly: importing a missing _C anyway reports a misleading "partially initialized module ... circular
    # import".
    EXTENSION_ERROR = f"rankkd._C, the compiled C++/CUDA extension, is not built: {BUILD_HINT}"
else:
    try:
        from rankkd import _C  # noqa: F401  (loading it registers rankkd::kendall_rank and its CPU/CUDA kernels)

        EXTENSION_ERROR = None
    except ImportError as error:
        EXTENSION_ERROR = f"rankkd._C, the compiled C++/CUDA extension, does not load ({error}): re{BUILD_HINT}"
if EXTENSION_ERROR is not None:
    warnings.warn(f"{EXTENSION_ERROR}. Until then the 'cpu' and 'cuda' backends are unavailable and 'auto' falls back "
                  "to Triton on CUDA tensors or the reference.", stacklevel=2)

if EXTENSION_ERROR is None:
    torch.library.register_fake("rankkd::kendall_rank")(_fused.fake_kendall_rank)
    _fused.register_autograd("rankkd::kendall_rank")

if importlib.util.find_spec("triton") is None:
    TRITON_ERROR = "the triton package is not installed (pip install triton)"
elif not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    TRITON_ERROR = "there is no CUDA device (TRITON_INTERPRET=1 set before rankkd is imported runs it on CPU tensors)"
else:
    # Registering a triton_op imports part of torch._inductor (about a second): only done where Triton can run.
    from rankkd.triton import kendall as _triton_kendall  # noqa: F401  (defines rankkd::kendall_rank_triton)

    TRITON_ERROR = None

# Looked up once: backend choice then stays plain Python that torch.compile traces without a graph break.
EXTENSION_DEVICES = {device_type for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                     if EXTENSION_ERROR is None
                     and torch._C._dispatch_has_kernel_for_dispatch_key("rankkd::kendall_rank", key)}
TRITON_DEVICES = set() if TRITON_ERROR else {"cuda", "cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else {"cuda"}


def available_backends(device="cpu"):
    """The backends that can run on tensors of this device, fastest first, "auto" excluded."""
    device_type = torch.device(device).type
    names = []
    if device_type == "cuda" and "cuda" in EXTENSION_DEVICES:
        names.append("cuda")
    if device_type in TRITON_DEVICES:
        names.append("triton")
    if device_type == "cpu" and "cpu" in EXTENSION_DEVICES:
        names.append("cpu")
    return names + ["reference"]


def _resolve_backend(backend, device):
    check_choice("backend", backend, BACKENDS)
    available = available_backends(device)
    if backend == "auto":
        # Triton through the interpreter is for testing, never picked on its own for CPU tensors.
        return next(name for name in available if not (name == "triton" and device.type == "cpu"))
    if backend in available:
        return backend
    if backend == "cuda":
        how = ("it takes CUDA tensors" if device.type != "cuda" else EXTENSION_ERROR or
               "rankkd._C was built without CUDA: set CUDA_HOME to the CUDA toolkit root and re"
               f"{BUILD_HINT}; FORCE_CUDA=1 builds the CUDA kernels even without a GPU")
    elif backend == "triton":
        how = TRITON_ERROR or ("it takes CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before rankkd "
                               "is imported (the Triton interpreter, slow, for tests)")
    else:  # "cpu"
        how = "it takes CPU tensors" if device.type != "cpu" else EXTENSION_ERROR
    raise RuntimeError(f"backend={backend!r} is not available for {device.type} tensors: {how}. "
                       f"Available here: {available}")


def _refuse_torch_func(student, teacher, backend):
    # The fused ops' autograd formula (torch.library.register_autograd) cannot run under torch.func's transforms;
    # without this check they fail deep inside torch with advice about autograd.Function.
    if any(torch._C._functorch.is_functorch_wrapped_tensor(x) for x in (student, teacher)):
        raise RuntimeError(
            f"kendall_rank_loss(backend={backend!r}) does not support torch.func transforms (grad, vjp, jacrev, "
            "jvp, vmap): its fused kernels run under ordinary autograd (loss.backward(), torch.autograd.grad, "
            "double backward included). Under torch.func pass backend='reference', plain PyTorch, which works there "
            "at O(rows * C^2) memory.")


def kendall_rank_loss(student, teacher, *, k=1.0, teacher_mode="tanh", topk=None, reduction="mean",
                      precision="fast", backend="auto"):
    """Kendall's tau ranking loss between student and teacher logits of shape (..., C).

    Per row, L = 1 - 2/(n(n-1)) * sum_{i<j} tanh(k (s_i - s_j)) * g(t_i - t_j), with g = tanh(k .) for
    teacher_mode="tanh" or sign(.) for "sign", over all n = C classes or the teacher's top `topk` classes.
    Returns the mean over rows (reduction="mean"), their sum ("sum"), or one value per row ("none", shape (...)),
    in float32 (float64 for float64 logits). The teacher gets a gradient when it requires one (tanh mode only).
    k: a finite number in float32's normal range [2^-126, 3.4e38], for every backend and dtype.
    precision: "fast" lets the GPU backends use the hardware tanh (tanh.approx.f32: gradients within 2e-3 relative
    of float64); "exact" asks for full float32 math (within 1e-5). The CPU kernel and the reference are always exact,
    and float64 logits are always computed exactly in float64.
    backend: "auto" (fastest available for the device), "cuda", "triton", "cpu" or "reference".
    Backward with create_graph=True (double backward) is supported; torch.func transforms need backend="reference"."""
    check_inputs(student, teacher, k, teacher_mode, topk, reduction, precision)
    s, t, lead = as_rows(student, teacher, topk)
    name = _resolve_backend(backend, s.device)
    if name == "reference":
        row_loss = reference.row_losses(s, t, float(k), teacher_mode)
    else:
        if not torch.compiler.is_compiling():
            _refuse_torch_func(student, teacher, backend)
        op = torch.ops.rankkd.kendall_rank_triton if name == "triton" else torch.ops.rankkd.kendall_rank
        grad_enabled = torch.is_grad_enabled()
        row_loss, _, _ = op(s, t, float(k), teacher_mode, precision, grad_enabled and s.requires_grad,
                            grad_enabled and t.requires_grad and teacher_mode == "tanh")
    return reduce_rows(row_loss, reduction, lead)


class KendallRankLoss(torch.nn.Module):
    """nn.Module form of kendall_rank_loss: forward(student_logits, teacher_logits)."""

    def __init__(self, *, k=1.0, teacher_mode="tanh", topk=None, reduction="mean", precision="fast", backend="auto"):
        super().__init__()
        self.k, self.teacher_mode, self.topk, self.reduction = k, teacher_mode, topk, reduction
        self.precision, self.backend = precision, backend

    def forward(self, student, teacher):
        return kendall_rank_loss(student, teacher, k=self.k, teacher_mode=self.teacher_mode, topk=self.topk,
                                 reduction=self.reduction, precision=self.precision, backend=self.backend)

    def extra_repr(self):
        return (f"k={self.k}, teacher_mode={self.teacher_mode!r}, topk={self.topk}, reduction={self.reduction!r}, "
                f"precision={self.precision!r}, backend={self.backend!r}")
