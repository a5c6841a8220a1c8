"""Logit distillation losses that the Kendall ranking loss plugs into: KD, DKD, DIST and logit standardization.

Every loss takes (batch, C) student and teacher logits and returns a 0-d tensor, the batch mean (DIST's intra-class
term is a batch statistic by definition). The math runs in float32 (float64 for float64 logits): half and bfloat16
logits, e.g. from autocast, are upcast first, as the ranking op does. The teacher's logits are treated as a target:
they are used as given, and whether they carry a gradient is the caller's choice (the Distiller detaches them).

The ranking loss itself is the op `rankkd.kendall_rank_loss` (re-exported here); rankkd.distill.distill_losses adds
it, weighted, on top of any of these.

Checks cost no host sync: shapes and dtypes are metadata, and the class-index range of `target` is checked only for
CPU tensors outside torch.compile. On CUDA an out-of-range target trips the device-side assert of cross_entropy /
gather instead of a Python error."""

import torch
import torch.nn.functional as F

from rankkd._args import check_logits, check_number
from rankkd.ops import kendall_rank_loss

__all__ = ["dist_loss", "dkd_loss", "dkd_parts", "kd_loss", "kendall_rank_loss", "standardize"]

# Sun et al.'s reference code adds this to the standard deviation, so that a constant row maps to zeros, not NaN.
STANDARDIZE_EPS = 1e-7
# DIST's reference code adds this to the product of norms in its Pearson correlation, for the same reason.
PEARSON_EPS = 1e-8


def check_target(target, logits, soft_ok=False):
    """Raise a clear error unless `target` holds a class index per row of `logits` (batch, C): an integer tensor of
    shape (batch,) with values in [0, C). With soft_ok, (batch, C) floating class probabilities (mixup / cutmix) are
    accepted too. The value range is checked only for CPU tensors outside torch.compile (no host sync elsewhere)."""
    batch, num_classes = logits.shape
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if soft_ok and target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(f"soft target (class probabilities) must have the logits' shape {tuple(logits.shape)}, "
                             f"got {tuple(target.shape)}")
        return
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        kinds = "integer class indices, or (batch, C) floating class probabilities" if soft_ok else \
            "integer class indices"
        raise TypeError(f"target must hold {kinds}; got dtype {target.dtype} with shape {tuple(target.shape)}")
    if target.shape != (batch,):
        raise ValueError(f"target must have shape (batch,) = ({batch},), one class index per row, "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} and the logits on {logits.device}: put both on one device")
    if target.device.type == "cpu" and not torch.compiler.is_compiling() and batch > 0:
        low, high = target.min().item(), target.max().item()
        if low < 0 or high >= num_classes:
            raise ValueError(f"target holds class indices in [{low}, {high}], outside [0, C) = [0, {num_classes})")


def _upcast(student, teacher):
    """Both logits in the accumulation dtype: float64 if either is float64, else float32."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    return student.to(dtype), teacher.to(dtype)


def _z_score(logits):
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)  # unbiased (n - 1), as in Sun et al.'s code
    return (logits - mean) / (std + STANDARDIZE_EPS)


def standardize(logits):
    """Logit standardization (Sun et al., CVPR 2024): z-score each vector over the last dim, (x - mean) / (std + 1e-7),
    with the unbiased standard deviation as in the authors' code. Half/bfloat16 input comes back as float32."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point torch.Tensor, got "
                        f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if logits.dim() < 1 or logits.shape[-1] < 2:
        raise ValueError(f"logits must have shape (..., C) with C >= 2, got {tuple(logits.shape)}")
    return _z_score(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def _tempered_log_probs(student, teacher, temperature, standardize):
    """log softmax(logits / T) of both, upcast, z-scored first when standardize is set."""
    s, t = _upcast(student, teacher)
    if standardize:
        s, t = _z_score(s), _z_score(t)
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)


def kd_loss(student, teacher, temperature=1.0, standardize=False):
    """Hinton et al.'s KD: KL(softmax(t/T) || softmax(s/T)) * T^2, mean over the batch.

    standardize=True z-scores both logit vectors first (logit standardization), which makes the loss invariant to a
    per-row shift and positive scale of either input."""
    check_logits(student, teacher, batched=True)
    check_number("temperature", temperature)
    log_p_student, log_p_teacher = _tempered_log_probs(student, teacher, temperature, standardize)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(-1)
    return kl.mean() * temperature**2


def dkd_parts(student, teacher, target, temperature=4.0, standardize=False):
    """The two per-row parts of DKD (Zhao et al., CVPR 2022), each shape (batch,), without the T^2 factor:

      tckd = KL(b_teacher || b_student), b = [p_target, 1 - p_target] (target vs. all other classes),
      nckd = KL(q_teacher || q_student), q = softmax over the non-target classes only,

    with p = softmax(logits / T). They add up to KD as the paper's Eq. (1) says:
    KL(p_teacher || p_student) = tckd + (1 - p_teacher[target]) * nckd."""
    check_logits(student, teacher, batched=True)
    check_target(target, student)
    check_number("temperature", temperature)
    log_p_student, log_p_teacher = _tempered_log_probs(student, teacher, temperature, standardize)
    index = target.long().unsqueeze(-1)
    is_target = torch.zeros_like(log_p_student, dtype=torch.bool).scatter_(-1, index, True)

    def binary_and_rest(log_p):
        log_p_target = log_p.gather(-1, index).squeeze(-1)
        log_p_rest = log_p.masked_fill(is_target, float("-inf")).logsumexp(-1)  # log(1 - p_target), stably
        return log_p_target, log_p_rest

    log_target_s, log_rest_s = binary_and_rest(log_p_student)
    log_target_t, log_rest_t = binary_and_rest(log_p_teacher)
    tckd = (log_target_t.exp() * (log_target_t - log_target_s) + log_rest_t.exp() * (log_rest_t - log_rest_s))
    # log q = log p - log(1 - p_target) on the non-target classes. The target class gets log q = 0 in both, so it adds
    # exp(0) * (0 - 0) = 0: an inf or NaN there (exp overflows when p_target is near 1) would poison the gradient.
    log_q_student = (log_p_student - log_rest_s.unsqueeze(-1)).masked_fill(is_target, 0.0)
    log_q_teacher = (log_p_teacher - log_rest_t.unsqueeze(-1)).masked_fill(is_target, 0.0)
    nckd = (log_q_teacher.exp() * (log_q_teacher - log_q_student)).sum(-1)
    return tckd, nckd


def dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=4.0, standardize=False):
    """Decoupled KD: (alpha * TCKD + beta * NCKD) * T^2, mean over the batch (see dkd_parts for the parts).

    target: (batch,) integer class indices. No warm-up factor is applied here: the reference recipes ramp the whole
    DKD term linearly over the first epochs, which the caller (or rankkd.distill) does.
    standardize=True z-scores both logit vectors first (logit standardization)."""
    check_number("alpha", alpha, positive=False)
    check_number("beta", beta, positive=False)
    tckd, nckd = dkd_parts(student, teacher, target, temperature, standardize)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def _pearson_rows(a, b):
    """Pearson correlation of each row of a with the same row of b, shape (rows,)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + PEARSON_EPS)


def dist_loss(student, teacher, beta=1.0, gamma=1.0, temperature=1.0):
    """DIST (Huang et al., NeurIPS 2022): T^2 * (beta * inter + gamma * intra) on p = softmax(logits / T), with

      inter = 1 - mean over samples of Pearson(p_student[i, :], p_teacher[i, :])   (inter-class relation)
      intra = 1 - mean over classes of Pearson(p_student[:, c], p_teacher[:, c])   (intra-class relation)

    The intra-class term correlates across the batch, so it depends on the whole (local) batch, and a batch of one
    gives intra = 1 with no gradient. Pearson uses the reference code's 1e-8 in the denominator."""
    check_logits(student, teacher, batched=True)
    check_number("beta", beta, positive=False)
    check_number("gamma", gamma, positive=False)
    check_number("temperature", temperature)
    s, t = _upcast(student, teacher)
    p_student = F.softmax(s / temperature, dim=-1)
    p_teacher = F.softmax(t / temperature, dim=-1)
    inter = 1 - _pearson_rows(p_student, p_teacher).mean()
    intra = 1 - _pearson_rows(p_student.T, p_teacher.T).mean()
    return (beta * inter + gamma * intra) * temperature**2
