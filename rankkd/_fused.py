"""What every fused kendall_rank operator shares: its output contract (fake impl) and its autograd formula.

A fused op (rankkd::kendall_rank from the C++/CUDA extension, rankkd::kendall_rank_triton from Triton) takes
(rows, C) student and teacher logits of one dtype, k, teacher_mode ("tanh" or "sign"), precision ("fast" or
"exact") and which gradients to form, and returns, from one pass over the pairs,
  loss (rows,)            the per-row loss,
  grad_student (rows, C)  dloss_row/dstudent, or an empty (0,) tensor when not asked for,
  grad_teacher (rows, C)  dloss_row/dteacher, likewise (never asked for in sign mode),
all in the accumulation dtype: float64 for float64 logits, float32 otherwise. Rows holding a non-finite logit give
NaN. The backward pass is then only a per-row scaling of the saved gradients.

Double backward (backward with create_graph=True) needs the gradients as a differentiable function of the logits,
which the kernels' outputs are not: there the backward recomputes them with PyTorch operations (row_gradients). That
path keeps what its chunks build for the second backward, O(rows C^2) memory in all, as plain PyTorch would."""
import torch

# Rows x ROW_CHUNK x C is the largest pairwise tensor the differentiable backward builds in one operation (all of them
# stay alive for the second backward).
ROW_CHUNK = 128


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_kendall_rank(student, teacher, k, teacher_mode, precision, grad_student, grad_teacher):
    acc = accumulation_dtype(student.dtype)
    rows, num_classes = student.shape
    loss = student.new_empty((rows,), dtype=acc)
    grad_s = student.new_empty((rows, num_classes) if grad_student else (0,), dtype=acc)
    grad_t = student.new_empty((rows, num_classes) if grad_teacher else (0,), dtype=acc)
    return loss, grad_s, grad_t


def row_gradients(student, teacher, k, teacher_mode, want_teacher=True, chunk=ROW_CHUNK):
    """dloss_row/dstudent and dloss_row/dteacher (None in sign mode or without want_teacher) of (rows, C) logits, in
    the accumulation dtype, as differentiable PyTorch operations:
        dL/ds_i = -c k sum_j sech^2(k (s_i - s_j)) g(t_i - t_j),
        dL/dt_i = -c k sum_j tanh(k (s_i - s_j)) sech^2(k (t_i - t_j)),
    c = 2 / (C (C - 1)), summed over all j (the j = i terms vanish), a chunk of i at a time. A row holding a
    non-finite logit gets NaN gradients, as from the kernels."""
    acc = accumulation_dtype(student.dtype)
    s, t = student.to(acc), teacher.to(acc)
    num_classes = s.shape[-1]
    scale = -2.0 * k / (num_classes * (num_classes - 1))
    grad_s, grad_t = [], []
    for i0 in range(0, num_classes, chunk):
        a = torch.tanh(k * (s[:, i0:i0 + chunk, None] - s[:, None, :]))
        dt = t[:, i0:i0 + chunk, None] - t[:, None, :]
        b = torch.sign(dt.detach()) if teacher_mode == "sign" else torch.tanh(k * dt)
        grad_s.append(scale * ((1 - a * a) * b).sum(-1))
        if teacher_mode == "tanh" and want_teacher:
            grad_t.append(scale * (a * (1 - b * b)).sum(-1))
    # sech^2 of an infinite difference is 0, so a non-finite logit alone would leave the others plausible numbers.
    finite = (torch.isfinite(s).all(-1) & torch.isfinite(t).all(-1)).unsqueeze(-1)
    nan = torch.tensor(float("nan"), dtype=acc, device=s.device)
    grad_s = torch.where(finite, torch.cat(grad_s, -1), nan)
    return grad_s, torch.where(finite, torch.cat(grad_t, -1), nan) if grad_t else None


def _setup_context(ctx, inputs, output):
    student, teacher, k, teacher_mode, _precision, grad_student, grad_teacher = inputs
    _loss, grad_s, grad_t = output
    ctx.save_for_backward(student, teacher, grad_s, grad_t)
    ctx.k, ctx.teacher_mode = k, teacher_mode
    ctx.wanted = (grad_student, grad_teacher)


def _backward(ctx, grad_loss, _grad_of_grad_s, _grad_of_grad_t):
    student, teacher, grad_s, grad_t = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the gradients must themselves be differentiable
        grad_s, grad_t = row_gradients(student, teacher, ctx.k, ctx.teacher_mode, want_teacher=ctx.wanted[1])
    scale = grad_loss.unsqueeze(-1)
    d_student = (scale * grad_s).to(student.dtype) if ctx.wanted[0] else None
    d_teacher = (scale * grad_t).to(teacher.dtype) if ctx.wanted[1] else None
    return d_student, d_teacher, None, None, None, None, None


def register_autograd(op_name):
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)
