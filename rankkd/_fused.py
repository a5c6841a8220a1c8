"""What every fused kendall_rank operator shares: its output contract (fake impl) and its autograd formula.

A fused op (rankkd::kendall_rank from the C++/CUDA extension, rankkd::kendall_rank_triton from Triton) takes
(rows, C) student and teacher logits of one dtype and returns, from one pass over the pairs,
  loss (rows,)            the per-row loss,
  grad_student (rows, C)  dloss_row/dstudent, or an empty (0,) tensor when not asked for,
  grad_teacher (rows, C)  dloss_row/dteacher, likewise (never asked for in sign mode),
all in the accumulation dtype: float64 for float64 logits, float32 otherwise. Rows holding a non-finite logit give
NaN. The backward pass is then only a per-row scaling of the saved gradients."""
import torch


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_kendall_rank(student, teacher, k, sign_teacher, grad_student, grad_teacher):
    acc = accumulation_dtype(student.dtype)
    rows, n = student.shape
    loss = student.new_empty((rows,), dtype=acc)
    grad_s = student.new_empty((rows, n) if grad_student else (0,), dtype=acc)
    grad_t = student.new_empty((rows, n) if grad_teacher else (0,), dtype=acc)
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, output):
    student, teacher, _k, _sign, grad_student, grad_teacher = inputs
    _loss, grad_s, grad_t = output
    ctx.save_for_backward(grad_s, grad_t)
    ctx.dtypes = (student.dtype, teacher.dtype)
    ctx.wanted = (grad_student, grad_teacher)


def _backward(ctx, grad_loss, _grad_of_grad_s, _grad_of_grad_t):
    grad_s, grad_t = ctx.saved_tensors
    scale = grad_loss.unsqueeze(-1)
    d_student = (scale * grad_s).to(ctx.dtypes[0]) if ctx.wanted[0] else None
    d_teacher = (scale * grad_t).to(ctx.dtypes[1]) if ctx.wanted[1] else None
    return d_student, d_teacher, None, None, None, None


def register_autograd(op_name):
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)
