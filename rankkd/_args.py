"""Argument handling shared by every backend: validation, dtype promotion, flattening, top-K selection, reduction.
None of the loss math lives here."""
import math
import numbers

import torch

TEACHER_MODES = ("tanh", "sign")
# "fast" lets a backend use hardware tanh approximations (CUDA, Triton on a GPU); "exact" asks for full float32 math.
PRECISIONS = ("fast", "exact")
REDUCTIONS = ("mean", "sum", "none")


def check_number(name, value, *, positive=True):
    """The one rule for a numeric argument: a finite real number, > 0 (positive) or >= 0. Raises ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_inputs(student, teacher, k, teacher_mode, topk, reduction):
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of logits, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must hold floating-point logits, got dtype {x.dtype}")
        if x.dim() < 1:
            raise ValueError(f"{name} must have shape (..., C), got a 0-d tensor")
    if student.shape != teacher.shape:
        raise ValueError(f"student shape {tuple(student.shape)} and teacher shape {tuple(teacher.shape)} must match")
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device} and teacher on {teacher.device}: put both on one device")
    num_classes = student.shape[-1]
    if num_classes < 2:
        raise ValueError(f"the last dim holds the classes and needs C >= 2, got C = {num_classes}")
    check_number("k (the tanh steepness)", k)
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, got {teacher_mode!r}")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, numbers.Integral)
                             or not 2 <= topk <= num_classes):
        raise ValueError(f"topk must be None or an integer in [2, C] = [2, {num_classes}], got {topk!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


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
