"""rankkd.kendall_rank_loss: the public op, its backend choice, and the registration of the fused operators."""
import importlib.util
import os
import warnings

import torch

from rankkd import _fused, reference
from rankkd._args import as_rows, check_inputs, reduce_rows

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

try:
    from rankkd import _C  # noqa: F401  (loading it registers rankkd::kendall_rank and its CPU/CUDA kernels)

    EXTENSION_ERROR = None
except ImportError as error:
    EXTENSION_ERROR = error
    warnings.warn(
        f"rankkd._C is not built ({error}); the 'cpu' and 'cuda' backends are unavailable and 'auto' falls back to "
        "Triton on CUDA tensors or the reference. Build it with `python setup.py develop` "
        "(or `pip install -e . --no-build-isolation`).", stacklevel=2)

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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends(device)
    if backend == "auto":
        # Triton through the interpreter is for testing, never picked on its own for CPU tensors.
        return next(name for name in available if not (name == "triton" and device.type == "cpu"))
    if backend in available:
        return backend
    if backend == "cuda":
        how = ("it takes CUDA tensors" if device.type != "cuda" else
               "rankkd._C was built without CUDA: set CUDA_HOME to the CUDA toolkit root and rebuild with "
               "`python setup.py develop` (FORCE_CUDA=1 builds the CUDA kernels even without a GPU)")
    elif backend == "triton":
        how = TRITON_ERROR or ("it takes CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before rankkd "
                               "is imported (the Triton interpreter, slow, for tests)")
    else:  # "cpu"
        how = ("it takes CPU tensors" if device.type != "cpu" else
               f"rankkd._C is not built ({EXTENSION_ERROR}): run `python setup.py develop`")
    raise RuntimeError(f"backend={backend!r} is not available for {device.type} tensors: {how}. "
                       f"Available here: {available}")


def kendall_rank_loss(student, teacher, *, k=1.0, teacher_mode="tanh", topk=None, reduction="mean",
                      backend="auto"):
    """Kendall's tau ranking loss between student and teacher logits of shape (..., C).

    Per row, L = 1 - 2/(n(n-1)) * sum_{i<j} tanh(k (s_i - s_j)) * g(t_i - t_j), with g = tanh(k .) for
    teacher_mode="tanh" or sign(.) for "sign", over all n = C classes or the teacher's top `topk` classes.
    Returns the mean over rows (reduction="mean"), their sum ("sum"), or one value per row ("none", shape (...)),
    in float32 (float64 for float64 logits). The teacher gets a gradient when it requires one (tanh mode only).
    backend: "auto" (fastest available for the device), "cuda", "triton", "cpu" or "reference"."""
    check_inputs(student, teacher, k, teacher_mode, topk, reduction)
    s, t, lead = as_rows(student, teacher, topk)
    name = _resolve_backend(backend, s.device)
    if name == "reference":
        row_loss = reference.row_losses(s, t, float(k), teacher_mode)
    else:
        op = torch.ops.rankkd.kendall_rank_triton if name == "triton" else torch.ops.rankkd.kendall_rank
        grad_enabled = torch.is_grad_enabled()
        row_loss, _, _ = op(s, t, float(k), teacher_mode == "sign", grad_enabled and s.requires_grad,
                            grad_enabled and t.requires_grad and teacher_mode == "tanh")
    return reduce_rows(row_loss, reduction, lead)


class KendallRankLoss(torch.nn.Module):
    """nn.Module form of kendall_rank_loss: forward(student_logits, teacher_logits)."""

    def __init__(self, *, k=1.0, teacher_mode="tanh", topk=None, reduction="mean", backend="auto"):
        super().__init__()
        self.k, self.teacher_mode, self.topk, self.reduction, self.backend = k, teacher_mode, topk, reduction, backend

    def forward(self, student, teacher):
        return kendall_rank_loss(student, teacher, k=self.k, teacher_mode=self.teacher_mode, topk=self.topk,
                                 reduction=self.reduction, backend=self.backend)

    def extra_repr(self):
        return (f"k={self.k}, teacher_mode={self.teacher_mode!r}, topk={self.topk}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
