"""Plug-and-play distillation: any logit distillation loss, plus the Kendall ranking loss with one argument.

    total = ce_weight * CE + kd_weight * L_base + rank_weight * L_rank    (the paper's α·CE + β·L_base + γ·L_RK)

L_base is KD, DKD (with its warm-up) or DIST, or nothing (method "ce"); KD and DKD can z-score the logits first
(logit standardization). rank_weight > 0 switches the ranking loss on, over any of them. The paper sets γ = α (the
CE weight) unless it says otherwise. The logits may have any leading shape, (..., C), every position a row, with an
optional mask of the rows that count.

The published loss settings (recipes) are in rankkd.recipes.
"""
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankkd._args import PRECISIONS, TEACHER_MODES, check_logits, check_number
from rankkd.losses import check_target, dist_loss, dkd_loss, kd_loss, kendall_rank_loss
from rankkd.ops import BACKENDS

METHODS = ("ce", "kd", "dkd", "dist")


@dataclass(frozen=True)
class DistillConfig:
    """Which distillation loss, its weights and options, and the ranking loss on top (rank_weight > 0).

    The field defaults are neutral starting values, not a published setup (e.g. method "dist" by default gets weight
    1 and T 4, which neither DIST config uses): take published settings from LOSS_RECIPES / get_recipe."""
    method: str = "kd"            # "ce" | "kd" | "dkd" | "dist"
    ce_weight: float = 1.0        # α
    kd_weight: float = 1.0        # β: weight of the base loss (KD, DIST; for DKD it multiplies α·TCKD + β·NCKD)
    temperature: float = 4.0      # T of KD, DKD and DIST
    standardize: bool = False     # logit standardization before the softmax (KD and DKD only)
    dkd_alpha: float = 1.0        # DKD: weight of the target-class part TCKD
    dkd_beta: float = 8.0         # DKD: weight of the non-target-class part NCKD
    warmup_epochs: float = 0.0    # DKD: linear warm-up of its term, factor min(epoch / warmup_epochs, 1); 0 = none
    dist_beta: float = 1.0        # DIST: weight of the inter-class relation
    dist_gamma: float = 1.0       # DIST: weight of the intra-class relation
    rank_weight: float = 0.0      # γ; 0 turns the ranking loss off
    rank_k: float = 1.0           # ranking loss: tanh steepness k
    rank_teacher_mode: str = "tanh"
    rank_topk: int | None = None  # ranking loss over the teacher's top-K classes only
    rank_precision: str = "fast"  # "fast": hardware tanh allowed on GPUs; "exact": full float32 math
    rank_backend: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("ce_weight", "kd_weight", "dkd_alpha", "dkd_beta", "warmup_epochs", "dist_beta", "dist_gamma",
                     "rank_weight"):
            check_number(name, getattr(self, name), positive=False)
        for name in ("temperature", "rank_k"):
            check_number(name, getattr(self, name))
        if not isinstance(self.standardize, bool):
            raise ValueError(f"standardize must be True or False, got {self.standardize!r}")
        if self.standardize and self.method not in ("kd", "dkd"):
            raise ValueError(f"standardize applies to methods 'kd' and 'dkd', not {self.method!r}")
        if self.rank_teacher_mode not in TEACHER_MODES:
            raise ValueError(f"rank_teacher_mode must be one of {TEACHER_MODES}, got {self.rank_teacher_mode!r}")
        if self.rank_topk is not None and (isinstance(self.rank_topk, bool) or
                                           not isinstance(self.rank_topk, numbers.Integral) or self.rank_topk < 2):
            raise ValueError(f"rank_topk must be None or an integer >= 2, got {self.rank_topk!r}")
        if self.rank_precision not in PRECISIONS:
            raise ValueError(f"rank_precision must be one of {PRECISIONS}, got {self.rank_precision!r}")
        if self.rank_backend not in BACKENDS:
            raise ValueError(f"rank_backend must be one of {BACKENDS}, got {self.rank_backend!r}")

    @property
    def uses_teacher(self):
        return self.method != "ce" or self.rank_weight > 0


def warmup_factor(epoch, warmup_epochs):
    """min(epoch / warmup_epochs, 1), the DKD warm-up; a 0-d tensor epoch gives a 0-d tensor (no recompilation under
    torch.compile as the epoch changes)."""
    if warmup_epochs == 0:
        return 1.0
    if isinstance(epoch, torch.Tensor):
        return torch.clamp(epoch / warmup_epochs, max=1.0)
    return min(epoch / warmup_epochs, 1.0)


def _as_rows(student_logits, teacher_logits, target, mask, soft_ok):
    """The logits as (rows, C) and the target as (rows,) class indices or (rows, C) probabilities, every leading
    position a row, keeping the rows where `mask` is True (one host synchronisation on a GPU)."""
    lead, num_classes = student_logits.shape[:-1], student_logits.shape[-1]
    if isinstance(target, torch.Tensor) and target.shape not in (lead, (*lead, num_classes)):
        soft = f", or {(*lead, num_classes)} class probabilities" if soft_ok else ""
        raise ValueError(f"target must have shape {tuple(lead)}, one class index per row of student_logits{soft}; "
                         f"got {tuple(target.shape)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool torch.Tensor, True where a row counts, got {got}")
        if mask.shape != lead:
            raise ValueError(f"mask must have student_logits' leading shape {tuple(lead)}, one entry per row, got "
                             f"{tuple(mask.shape)}")
        if mask.device != student_logits.device:
            raise ValueError(f"mask is on {mask.device} and the logits on {student_logits.device}: put both on one "
                             "device")
    student_rows = student_logits.reshape(-1, num_classes)
    teacher_rows = None if teacher_logits is None else teacher_logits.reshape(-1, num_classes)
    target_rows = target.reshape(-1, *target.shape[len(lead):]) if isinstance(target, torch.Tensor) else target
    if mask is None:
        return student_rows, teacher_rows, target_rows
    kept = mask.reshape(-1).nonzero().squeeze(1)
    return (student_rows.index_select(0, kept), None if teacher_rows is None else teacher_rows.index_select(0, kept),
            target_rows.index_select(0, kept))


def distill_losses(student_logits, teacher_logits, target, config, epoch=0.0, mask=None):
    """The loss terms of `config` from logits, for trainers that run the models themselves (e.g. a DDP student).

    student_logits, teacher_logits: (..., C), every position of the leading dims a row: (batch, C) for a classifier,
    (batch, positions, C) for a sequence model. The teacher's logits are a fixed target: they are detached here.
    teacher_logits may be None when the config does not use them (method "ce" with rank_weight 0).
    target: (...) integer class indices, one per row; for methods other than "dkd" also (..., C) class probabilities
    (mixup / cutmix), used by the CE term only. Out-of-range indices raise on CPU (no check, no host sync, on GPU).
    epoch: epochs done, a float or a 0-d tensor; it only drives the DKD warm-up, min(epoch / warmup_epochs, 1).
    mdistiller calls its warm-up with 1-based integer epochs, so pass epoch_index + 1 to match it exactly, or a
    fractional epoch (epoch_index + step / steps_per_epoch) for a smooth ramp. Under torch.compile pass a 0-d tensor:
    a changing Python float recompiles once.
    mask: None (every row counts) or a bool tensor of the leading shape (...), True where a row counts (an attention
    mask's convention). The terms are then those of the kept rows alone, as if the others were not there (DIST's
    intra-class term included); the target is not read at the other rows, which may hold e.g. -100. Selecting the
    rows costs one host synchronisation on a GPU and gives data-dependent shapes under torch.compile.

    Returns {"ce": ..., base method name ("kd" | "dkd" | "dist", absent for "ce"): ..., "rank": ... (when
    rank_weight > 0), "total": ...}: 0-d float32 tensors (float64 for float64 logits). Each term is WEIGHTED, as it
    enters the total (the DKD term includes its warm-up factor), so the terms sum to "total". With no row to count (a
    mask that is all False, or no rows at all) every term is 0, not NaN, and backward gives zero gradients."""
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
    if not isinstance(student_logits, torch.Tensor) or not student_logits.is_floating_point():
        got = student_logits.dtype if isinstance(student_logits, torch.Tensor) else type(student_logits).__name__
        raise TypeError(f"student_logits must be a floating-point torch.Tensor, got {got}")
    if student_logits.dim() < 2:
        raise ValueError(f"student_logits must have shape (..., C) with at least one leading dim (rows), got "
                         f"{tuple(student_logits.shape)}")
    if config.uses_teacher:
        if teacher_logits is None:
            raise ValueError(f"teacher_logits are needed by method {config.method!r} with rank_weight "
                             f"{config.rank_weight}, got None")
        check_logits(student_logits, teacher_logits)
        teacher_logits = teacher_logits.detach()
    else:
        teacher_logits = None
    soft_ok = config.method != "dkd"
    student_logits, teacher_logits, target = _as_rows(student_logits, teacher_logits, target, mask, soft_ok)
    check_target(target, student_logits, soft_ok=soft_ok)

    accumulate = torch.promote_types(student_logits.dtype, torch.float32)  # CE of bf16 / fp16 logits in fp32
    if len(student_logits) == 0:
        # A mean over no rows would be NaN. Zero, still a function of the student's logits, lets such a step run its
        # backward (all-zero gradients: DDP's ranks stay in step).
        zero = student_logits.to(accumulate).sum()
        terms = {"ce": zero}
        if config.method != "ce":
            terms[config.method] = zero
        if config.rank_weight > 0:
            terms["rank"] = zero
        return terms | {"total": zero}
    hard_target = target if target.is_floating_point() else target.long()
    terms = {"ce": config.ce_weight * F.cross_entropy(student_logits.to(accumulate), hard_target)}
    if config.method == "kd":
        terms["kd"] = config.kd_weight * kd_loss(student_logits, teacher_logits, temperature=config.temperature,
                                                 standardize=config.standardize)
    elif config.method == "dkd":
        dkd = dkd_loss(student_logits, teacher_logits, target, alpha=config.dkd_alpha, beta=config.dkd_beta,
                       temperature=config.temperature, standardize=config.standardize)
        terms["dkd"] = config.kd_weight * warmup_factor(epoch, config.warmup_epochs) * dkd
    elif config.method == "dist":
        terms["dist"] = config.kd_weight * dist_loss(student_logits, teacher_logits, beta=config.dist_beta,
                                                     gamma=config.dist_gamma, temperature=config.temperature)
    if config.rank_weight > 0:
        terms["rank"] = config.rank_weight * kendall_rank_loss(
            student_logits, teacher_logits, k=config.rank_k, teacher_mode=config.rank_teacher_mode,
            topk=config.rank_topk, precision=config.rank_precision, backend=config.rank_backend)
    terms["total"] = sum(terms.values())
    return terms


class StudentTeacher(nn.Module):
    """A student and a frozen teacher (or None), the common part of every distiller's module.

    The teacher is put in eval mode and requires_grad_(False) here and stays in eval mode through train() (its
    batch-norm statistics, dropout and inference-time settings are its own), so it never gets a gradient: build the
    optimizer from .student.parameters() (an optimizer over .parameters() leaves the teacher untouched too, since
    its parameters never get a .grad). Subclasses run the teacher under no_grad in their forward."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self


class Distiller(StudentTeacher):
    """A student, a frozen teacher (StudentTeacher) and a DistillConfig; forward returns the student logits and the
    loss terms. The teacher is not run at all when the config does not use it (method "ce" with rank_weight 0), and
    may then be None.

    forward(inputs, target, epoch=0.0, mask=None) -> (student_logits, terms): the student's logits (..., C) for
    `inputs`, and terms as distill_losses returns them for those logits, the teacher's, `target` and `mask`, weighted
    so that they sum to terms["total"]; call terms["total"].backward() and log the rest."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config: DistillConfig):
        if not isinstance(config, DistillConfig):
            raise TypeError(f"config must be a DistillConfig, got {type(config).__name__}")
        if teacher is None and config.uses_teacher:
            raise ValueError(f"method {config.method!r} with rank_weight {config.rank_weight} needs a teacher, "
                             "got None")
        super().__init__(student, teacher)
        self.config = config

    def forward(self, inputs, target, epoch=0.0, mask=None):
        student_logits = self.student(inputs)
        teacher_logits = None
        if self.config.uses_teacher:
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
        return student_logits, distill_losses(student_logits, teacher_logits, target, self.config, epoch, mask)
