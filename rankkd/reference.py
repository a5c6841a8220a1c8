"""The readable O(B C^2) form of the Kendall rank loss (the shape of the paper's Algorithm 1).

Tests hold every fused backend against it in float64, and the benchmark uses it as the baseline. It builds
(rows, C, C) tensors: fine for checking, far too slow and large for training at C = 1000."""
import torch

from rankkd._args import as_rows, check_inputs, reduce_rows


def row_losses(student, teacher, k, teacher_mode):
    """(rows, C) logits -> (rows,) losses, in float64 for float64 inputs and float32 otherwise."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(acc), teacher.to(acc)
    num_classes = s.shape[-1]
    student_order = torch.tanh(k * (s.unsqueeze(-1) - s.unsqueeze(-2)))  # [r, i, j] = tanh(k (s_i - s_j))
    if teacher_mode == "tanh":
        teacher_order = torch.tanh(k * (t.unsqueeze(-1) - t.unsqueeze(-2)))
    else:  # sign mode: the teacher's order is a constant target and gets no gradient
        t = t.detach()
        teacher_order = torch.sign(t.unsqueeze(-1) - t.unsqueeze(-2))
    # Both factors are odd in (i, j) and vanish on the diagonal: the sum over i < j is half the full sum.
    concordance = (student_order * teacher_order).sum(dim=(-2, -1)) / 2
    loss = 1 - concordance * (2.0 / (num_classes * (num_classes - 1)))
    finite = torch.isfinite(s).all(-1) & torch.isfinite(t).all(-1)
    return torch.where(finite, loss, torch.full_like(loss, float("nan")))


def kendall_rank_loss(student, teacher, *, k=1.0, teacher_mode="tanh", topk=None, reduction="mean", precision="fast"):
    """Same arguments and result as rankkd.kendall_rank_loss, computed the plain B x C x C way (always exact:
    precision is checked and then has nothing to choose)."""
    check_inputs(student, teacher, k, teacher_mode, topk, reduction, precision)
    s, t, lead = as_rows(student, teacher, topk)
    return reduce_rows(row_losses(s, t, float(k), teacher_mode), reduction, lead)
