"""A second float64 reference for the tests: the per-row loss and gradients from the closed forms of docs/design.md,
chunked over i so that large C (4096, 32768) never builds a rows x C x C tensor. Sums run over all ordered pairs
(i, j): both factors are odd, and the i = j terms vanish. tests/test_triton.py checks it against rankkd.reference."""
import torch


def closed_form_outputs(student, teacher, k, teacher_mode, chunk=256):
    """(loss (rows,), dloss/dstudent (rows, C), dloss/dteacher (rows, C) or None in sign mode), in float64."""
    s, t = student.detach().double(), teacher.detach().double()
    num_classes = s.shape[1]
    c = 2.0 / (num_classes * (num_classes - 1))
    concordance = torch.zeros(s.shape[0], dtype=torch.float64, device=s.device)
    grad_s, grad_t = torch.empty_like(s), torch.empty_like(t)
    for i0 in range(0, num_classes, chunk):
        a = torch.tanh(k * (s[:, i0:i0 + chunk, None] - s[:, None, :]))
        dt = t[:, i0:i0 + chunk, None] - t[:, None, :]
        b = torch.sign(dt) if teacher_mode == "sign" else torch.tanh(k * dt)
        concordance += (a * b).sum(dim=(1, 2)) / 2
        grad_s[:, i0:i0 + chunk] = -c * k * ((1 - a * a) * b).sum(-1)
        grad_t[:, i0:i0 + chunk] = -c * k * (a * (1 - b * b)).sum(-1)
    return 1 - c * concordance, grad_s, None if teacher_mode == "sign" else grad_t
