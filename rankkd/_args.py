"""Argument handling shared by every backend: the op's contract (checked here, once), dtype promotion, flattening,
top-K selection, reduction. None of the loss math lives here.

The C++ operator (csrc/kendall_checks.h) and the Triton operator (rankkd/triton/kendall.py) guard direct calls with
the same rules and the same wording."""
import math
import numbers

import torch

TEACHER_MODES = ("tanh", "sign")
# "fast" lets a backend use hardware tanh approximations (CUDA, Triton on a GPU); "exact" asks for full float32 math.
PRECISIONS = ("fast", "exact")
REDUCTIONS = ("mean", "sum", "none")

# The k rule, for every backend and dtype: k reaches the float32 math of float32/bfloat16/float16 inputs (and the
# Triton kernels, as two float32 halves, for float64 too) as a normal float32 number, never as inf or 0.
K_MIN, K_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max  # 2^-126, 3.4e38
K_RULE = "k (the tanh steepness) must be a finite number in [2^-126, 3.4e38] (float32's normal range)"


def check_number(name, value, *, positive=True):
    """The one rule for a numeric argument: a finite real number, > 0 (positive) or >= 0. Raises ValueError naming
    it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_steepness(k):
    check_number("k (the tanh steepness)", k)
    if not K_MIN <= k <= K_MAX:
        raise ValueError(f"{K_RULE}, got {k!r}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_logits(student, teacher, *, batched=False):
    """Two tensors of floating-point logits of one shape, (..., C) or, with batched, (batch, C), on one device,
    C >= 2. Raises TypeError / ValueError naming the argument."""
    layout = "(batch, C)" if batched else "(..., C)"
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of logits, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floating-point logits, got dtype {x.dtype}")
        if x.dim() < 1 or (batched and x.dim() != 2):
            raise ValueError(f"{name} logits must have shape {layout}, got {tuple(x.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} must match "
                         "(the same rows and the same number of classes C)")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} and teacher on {teacher.device}: put both on one device")
    if student.shape[-1] < 2:
        raise ValueError(f"the last dim holds the classes and needs C >= 2, got C = {student.shape[-1]}")


def check_inputs(student, teacher, k, teacher_mode, topk, reduction, precision):
    """The contract of rankkd.kendall_rank_loss, for every backend."""
    check_logits(student, teacher)
    num_classes = student.shape[-1]
    check_steepness(k)
    check_choice("teacher_mode", teacher_mode, TEACHER_MODES)
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, numbers.Integral)
                             or not 2 <= topk <= num_classes):
        raise ValueError(f"topk must be None or an integer in [2, C] = [2, {num_classes}], got {topk!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("precision", precision, PRECISIONS)


def check_fused_args(op_name, student, teacher, k, teacher_mode, precision, grad_teacher):
    """The contract of a fused operator (rankkd::kendall_rank, rankkd::kendall_rank_triton): (rows, C) logits of one
    floating dtype. The same rules, in the same words, as csrc/kendall_checks.h."""
    if student.dim() != 2:
        raise ValueError(f"{op_name}: student must be 2-D (rows, C), got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"{op_name}: teacher shape {tuple(teacher.shape)} must equal student shape "
                         f"{tuple(student.shape)}")
    if student.dtype != teacher.dtype:
        raise ValueError(f"{op_name}: student dtype {student.dtype} and teacher dtype {teacher.dtype} must match")
    if student.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{op_name}: logits must be float16, bfloat16, float32 or float64, got {student.dtype}")
    if student.device != teacher.device:
        raise ValueError(f"{op_name}: student on {student.device} and teacher on {teacher.device} must be on one "
                         "device")
    if student.shape[1] < 2:
        raise ValueError(f"{op_name}: need at least 2 classes, got C = {student.shape[1]}")
    if not K_MIN <= k <= K_MAX:  # false for NaN too
        raise ValueError(f"{op_name}: {K_RULE}, got {k!r}")
    check_choice(f"{op_name}: teacher_mode", teacher_mode, TEACHER_MODES)
    check_choice(f"{op_name}: precision", precision, PRECISIONS)
    if teacher_mode == "sign" and grad_teacher:
        raise ValueError(f"{op_name}: teacher_mode 'sign' has no teacher gradient; pass grad_teacher=False")


def as_rows(student, teacher, topk):
    """(..., C) logits -> two (rows, C') tensors of one dtype, C' = topk or C, plus the leading shape.

    With topk, each row keeps the teacher's K largest channels (ties broken as torch.topk breaks them); gather's
    autograd scatters the gradient back to the full rows."""
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    lead = student.shape[:-1]
    s = student.to(dtype).reshape(-1, student.shape[-1])
    t = teacher.to(dtype).reshape(-1, teacher.shape[-1])
    if topk is not None and topk < s.shape[-1]:
        index = torch.topk(t.detach(), topk, dim=-1).indices
        s, t = s.gather(-1, index), t.gather(-1, index)
    return s, t, lead


def reduce_rows(row_loss, reduction, lead):
    if reduction == "mean":
        return row_loss.mean()
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.reshape(lead)
