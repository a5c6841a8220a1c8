"""The ranking loss for language-model distillation, fused with the student's LM head, over the teacher's top-K.

A language model's logits, hidden @ weight.T (+ bias), are a (positions x V) tensor with V from 32k to 256k: the
largest tensor of a training step, and plain PyTorch keeps several of them (logits, log-softmax, their gradients).
fused_linear_distill_loss never forms them whole. It walks the positions in chunks of `chunk_size` rows; for each
chunk it forms that chunk's logits, the loss terms and, in closed form, their gradient with respect to the chunk's
logits, and turns that gradient at once into the chunk's rows of d/dhidden and its share of d/dweight and d/dbias.
The backward pass then only scales the gradients by the incoming one (Liger-Kernel's fused-linear scheme). Memory:
one or two (chunk_size x V) float32 buffers and the gradients, never positions x V.

Per counted position (target != ignore_index), with z the student's logits over the vocabulary, y the target token,
S the teacher's K token ids with teacher logits t, and temperature T:

    CE   = logsumexp(z) - z_y                                 dCE/dz   = softmax(z) - onehot(y)
    KD   = T^2 sum_{j in S} p_j (log p_j - log q_j)           dKD/dz   = T (softmax(z / T) - p scattered to S)
           p = softmax(t / T) over the K, log q = log_softmax(z / T) over all V, taken at S
    RANK = rankkd.kendall_rank_loss(z_S, t, k, "tanh")        dRANK/dz = the op's student gradient scattered to S

dKD/dz uses sum_j p_j = 1: d log q_j / dz_v = (delta_jv - softmax(z / T)_v) / T.

The chunk loop is one torch.library operator, rankkd::fused_linear_distill: torch.compile sees a single opaque call
with a fake implementation, so a compiled training step has no graph break and no recompilation per sequence length,
and the data checks (behind validate=True) run inside it on real values."""
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from rankkd import _fused, reference
from rankkd._args import REDUCTIONS, check_choice, check_number, check_steepness
from rankkd.ops import _resolve_backend

__all__ = ["FusedLinearDistillLoss", "fused_linear_distill_loss", "teacher_topk"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _rank_rows(student, teacher, k, want_grad):
    """Per-row ranking losses of (rows, K) logits and, with want_grad, d loss_row / d student (else None), from the
    backend rankkd.kendall_rank_loss(backend="auto") takes for the device."""
    backend = _resolve_backend("auto", student.device)
    if backend == "reference":
        grad = _fused.row_gradients(student, teacher, k, "tanh", want_teacher=False)[0] if want_grad else None
        return reference.row_losses(student, teacher, k, "tanh"), grad
    op = torch.ops.rankkd.kendall_rank_triton if backend == "triton" else torch.ops.rankkd.kendall_rank
    row_loss, grad, _ = op(student, teacher, k, "tanh", "fast", want_grad, False)  # the op's default precision
    return row_loss, grad if want_grad else None


def _chunk_loss(hidden, weight, bias, target, counted, teacher_ids, teacher_logits, row_scale, terms):
    """One chunk of positions: its row losses (0 where not counted) and, when row_scale is given,
    d(sum_r row_scale_r loss_r)/d logits, (rows, V) in the accumulation dtype (else None).

    The (rows, V) work is one exp pass per temperature in use (CE's 1 and KD's T, one pass when T = 1), done in place:
    one (rows, V) buffer, two when CE and KD use different temperatures."""
    ce_weight, kd_weight, rank_weight, temperature, k = terms
    acc = _fused.accumulation_dtype(hidden.dtype)
    logits = F.linear(hidden, weight, bias).to(acc)
    teacher_logits = teacher_logits.to(acc)
    want_grad = row_scale is not None
    # Every value the losses read from the logits, gathered before the buffer is overwritten.
    student_top = logits.gather(1, teacher_ids)
    if ce_weight:
        target_ids = torch.where(counted, target, 0).unsqueeze(1)
        target_logit = logits.gather(1, target_ids).squeeze(1)

    # softmax(logits / temp) and its log-normalizer over the vocabulary, per temperature. The last temperature takes
    # the logits' own buffer; an earlier one a copy.
    temperatures = list(dict.fromkeys(([1.0] if ce_weight else []) + ([temperature] if kd_weight else [])))
    probs, log_norm = {}, {}
    for i, temp in enumerate(temperatures):
        last = i == len(temperatures) - 1
        scaled = (logits.div_(temp) if temp != 1.0 else logits) if last else logits / temp
        row_max = scaled.amax(1, keepdim=True)
        exp = scaled.sub_(row_max).exp_()
        total = exp.sum(1, keepdim=True)
        log_norm[temp] = (row_max + total.log()).squeeze(1)
        probs[temp] = exp.div_(total) if want_grad else None

    row_loss = logits.new_zeros(logits.shape[0])
    if rank_weight:
        rank_loss, rank_grad = _rank_rows(student_top, teacher_logits, k, want_grad)
        row_loss += rank_weight * rank_loss
    if kd_weight:
        student_log_q = student_top / temperature - log_norm[temperature].unsqueeze(1)
        teacher_log_p = torch.log_softmax(teacher_logits / temperature, 1)
        teacher_p = teacher_log_p.exp()
        row_loss += kd_weight * temperature ** 2 * (teacher_p * (teacher_log_p - student_log_q)).sum(1)
    if ce_weight:
        row_loss += ce_weight * (log_norm[1.0] - target_logit)
    row_loss = torch.where(counted, row_loss, 0)
    if not want_grad:
        return row_loss, None

    # dloss/dz: ce_weight softmax(z) + kd_weight T softmax(z / T), then the terms at the targets and the top-K.
    softmax_weights = {}
    if ce_weight:
        softmax_weights[1.0] = ce_weight
    if kd_weight:
        softmax_weights[temperature] = softmax_weights.get(temperature, 0.0) + kd_weight * temperature
    grad = None
    for temp, softmax_weight in softmax_weights.items():
        grad = probs[temp].mul_(softmax_weight) if grad is None else grad.add_(probs[temp], alpha=softmax_weight)
    if grad is None:  # the ranking loss alone
        grad = logits.zero_()
    if ce_weight:
        grad.scatter_add_(1, target_ids, grad.new_full(target_ids.shape, -ce_weight))
    if kd_weight:
        grad.scatter_add_(1, teacher_ids, teacher_p.mul_(-kd_weight * temperature))
    if rank_weight:
        grad.scatter_add_(1, teacher_ids, rank_grad.mul_(rank_weight))
    return row_loss, grad.mul_(row_scale.unsqueeze(1))  # row_scale is 0 where not counted


def _add_product(accumulator, a, b):
    """accumulator += a @ b: the product in the inputs' dtype, the sum in the accumulator's (float32 for half
    inputs, so the chunks' contributions are not rounded to 8 bits as they add up)."""
    if accumulator.dtype == a.dtype:
        accumulator.addmm_(a, b)
    else:
        accumulator += a @ b


def _check_values(vocab_size, target, ignore_index, teacher_ids, teacher_logits):
    """The checks that read the values (a host synchronization on a GPU): run when validate=True."""
    if target is not None:
        bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
        if bad.any():
            raise ValueError(f"target holds token id {target[bad][0].item()}: expected ids in [0, V) = "
                             f"[0, {vocab_size}) or ignore_index = {ignore_index}")
    bad = (teacher_ids < 0) | (teacher_ids >= vocab_size)
    if bad.any():
        raise ValueError(f"teacher_ids holds token id {teacher_ids[bad][0].item()}: expected ids in [0, V) = "
                         f"[0, {vocab_size})")
    repeated = (teacher_ids.sort(1).values.diff(dim=1) == 0).any(1)
    if repeated.any():
        row = repeated.nonzero()[0, 0].item()
        raise ValueError(f"teacher_ids repeats a token id at position {row} (flattened): each position needs K "
                         "distinct ids")
    if not torch.isfinite(teacher_logits).all():
        raise ValueError("teacher_logits holds a NaN or infinite value: the teacher's top-K logits must be finite")


@torch.library.custom_op("rankkd::fused_linear_distill", mutates_args=())
def _fused_linear_distill(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: Optional[torch.Tensor],
    teacher_ids: torch.Tensor, teacher_logits: torch.Tensor, row_scale: Optional[torch.Tensor], ce_weight: float,
    kd_weight: float, rank_weight: float, temperature: float, k: float, ignore_index: int, chunk_size: int,
    reduction: str, validate: bool, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (rows, d), weight (V, d), bias (V,) or None, target (rows,) int64 or None (every row counted),
    teacher_ids (rows, K) int64, teacher_logits (rows, K). Returns the loss (0-d; (rows,) for "none") in the
    accumulation dtype, then the gradients asked for, each in its input's dtype or an empty (0,) tensor, of
    sum_r scale_r loss_r with scale 1/count on counted rows for "mean", 1 for "sum" and row_scale (rows,) for
    "none" (the backward pass's incoming gradient; without it "none" forms no gradient)."""
    if validate:
        _check_values(weight.shape[0], target, ignore_index, teacher_ids, teacher_logits)
    rows, acc = hidden.shape[0], _fused.accumulation_dtype(hidden.dtype)
    counted = (torch.ones(rows, dtype=torch.bool, device=hidden.device) if target is None
               else target != ignore_index)
    if reduction == "mean":
        # A batch with nothing counted gives 0 and zero gradients, not 0/0.
        scale = counted.to(acc) / counted.sum().clamp(min=1)
    elif reduction == "sum":
        scale = counted.to(acc)
    else:
        scale = None if row_scale is None else row_scale.to(acc) * counted
    formed = scale is not None  # "none" forms its gradients in the backward pass, given row_scale
    grad_hidden, grad_weight, grad_bias = grad_hidden and formed, grad_weight and formed, grad_bias and formed
    want_grad = grad_hidden or grad_weight or grad_bias
    d_hidden = hidden.new_empty(hidden.shape if grad_hidden else (0,))
    d_weight = torch.zeros(weight.shape if grad_weight else (0,), dtype=acc, device=weight.device)
    d_bias = torch.zeros(weight.shape[0] if grad_bias else 0, dtype=acc, device=weight.device)
    row_loss = torch.empty(rows, dtype=acc, device=hidden.device)
    terms = (ce_weight, kd_weight, rank_weight, temperature, k)
    # The matmuls run in the inputs' dtype whatever autocast says (the public function casts first).
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, rows, chunk_size):
            chunk = slice(start, start + chunk_size)
            row_loss[chunk], grad_logits = _chunk_loss(
                hidden[chunk], weight, bias, None if target is None else target[chunk], counted[chunk],
                teacher_ids[chunk], teacher_logits[chunk], scale[chunk] if want_grad else None, terms)
            if not want_grad:
                continue
            if grad_bias:
                d_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden:
                torch.mm(grad_logits, weight, out=d_hidden[chunk])
            if grad_weight:
                _add_product(d_weight, grad_logits.T, hidden[chunk])
    loss = row_loss if reduction == "none" else (scale * row_loss).sum()
    return loss, d_hidden, d_weight.to(weight.dtype), d_bias.to(weight.dtype)


@_fused_linear_distill.register_fake
def _(hidden, weight, bias, target, teacher_ids, teacher_logits, row_scale, ce_weight, kd_weight, rank_weight,
      temperature, k, ignore_index, chunk_size, reduction, validate, grad_hidden, grad_weight, grad_bias):
    acc = _fused.accumulation_dtype(hidden.dtype)
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=acc)
    formed = reduction != "none" or row_scale is not None
    return (loss, hidden.new_empty(hidden.shape if grad_hidden and formed else (0,)),
            weight.new_empty(weight.shape if grad_weight and formed else (0,)),
            weight.new_empty((weight.shape[0],) if grad_bias and formed else (0,)))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, target, teacher_ids, teacher_logits, _row_scale, *options, reduction, _validate,
     grad_hidden, grad_weight, grad_bias) = inputs
    ctx.options, ctx.reduction = options, reduction
    ctx.wanted = (grad_hidden, grad_weight, grad_bias)
    if reduction == "none":
        # One incoming gradient per row cannot scale a sum over rows: the backward runs the chunks again with it.
        ctx.save_for_backward(hidden, weight, bias, target, teacher_ids, teacher_logits)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, grad_loss, _grad_of_d_hidden, _grad_of_d_weight, _grad_of_d_bias):
    if torch.is_grad_enabled():
        raise RuntimeError("fused_linear_distill_loss does not support double backward (backward with "
                           "create_graph=True): its gradients are formed in the forward pass as plain values")
    if ctx.reduction == "none":
        _, *grads = torch.ops.rankkd.fused_linear_distill(*ctx.saved_tensors, grad_loss, *ctx.options, "none", False,
                                                          *ctx.wanted)
    else:
        grads = [grad * grad_loss for grad in ctx.saved_tensors]
    d_hidden, d_weight, d_bias = (grad if wanted else None for grad, wanted in zip(grads, ctx.wanted))
    return (d_hidden, d_weight, d_bias) + (None,) * 16


_fused_linear_distill.register_autograd(_backward, setup_context=_setup_context)


def _check_int(name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        raise ValueError(f"{name} must be an integer{'' if minimum is None else f' >= {minimum}'}, got {value!r}")


def _check_head(hidden, weight, bias):
    """hidden (..., d), weight (V, d) and bias (V,) or None: floating tensors of one dtype on one device."""
    for name, x in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if x is None and name == "bias":
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}")
        if x.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {x.dtype} must equal hidden dtype {hidden.dtype} (under autocast both are "
                            "cast to the autocast dtype first, as F.linear would)")
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} and hidden on {hidden.device}: put them on one device")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., d), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight (the LM head) must have shape (V, d) = (V, {hidden.shape[-1]}), got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be None or have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _autocast_head(hidden, weight, bias):
    """hidden, weight and bias in the autocast dtype when autocast is on for their device, as F.linear would take
    them; unchanged otherwise."""
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if device_type is None or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def fused_linear_distill_loss(hidden, weight, target=None, *, teacher_ids, teacher_logits, bias=None, ce_weight=1.0,
                              kd_weight=1.0, rank_weight=1.0, temperature=1.0, k=1.0, ignore_index=-100,
                              chunk_size=1024, reduction="mean", validate=True):
    """Cross-entropy, top-K KD and the Kendall ranking loss of a language model's student, from its last hidden
    states and LM head, without forming the (positions x V) logits.

    hidden (..., d) and weight (V, d), bias (V,) optional: the student's last hidden states and LM head, logits =
    hidden @ weight.T + bias. target (...): token ids, ignore_index where not counted; None counts every position
    (only with ce_weight=0). teacher_ids (..., K) integer and teacher_logits (..., K): the teacher's top-K token ids
    and their logits per position, in any order (rankkd.teacher_topk computes them online).

    Per counted position: CE = cross-entropy over the full vocabulary; KD = T^2 sum_{j in top-K} p_j (log p_j -
    log q_j), p = softmax(teacher_logits / T) over the K, log q = log_softmax(logits / T) over the full vocabulary at
    teacher_ids; RANK = rankkd.kendall_rank_loss(logits at teacher_ids, teacher_logits, k=k, teacher_mode="tanh").
    loss = ce_weight CE + kd_weight KD + rank_weight RANK: its mean over the counted positions ("mean"; 0 when none
    is counted), their sum ("sum"), or one value per position ("none", shape (...), 0 where not counted), in float32
    (float64 for float64 inputs).

    Positions are processed `chunk_size` at a time: memory O(chunk_size x V). The gradients of hidden, weight and
    bias are formed in the forward pass (only those that require one) and scaled in the backward; the teacher gets
    none. Inputs may be float32, bfloat16, float16 or float64 (hidden, weight, bias of one dtype; under autocast all
    three are cast to its dtype): the matmuls run in that dtype, softmax and the ranking loss in float32 (float64
    for float64). validate=True checks target and teacher_ids against [0, V), duplicate ids within a position and
    non-finite teacher logits, which costs a host synchronization on a GPU: a trainer can turn it off once its first
    batches passed."""
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    _check_head(hidden, weight, bias)
    lead, vocab_size = hidden.shape[:-1], weight.shape[0]
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight), ("rank_weight", rank_weight)):
        check_number(name, value, positive=False)
    if not (ce_weight or kd_weight or rank_weight):
        raise ValueError("ce_weight, kd_weight and rank_weight are all 0: at least one term must be on")
    check_number("temperature", temperature)
    check_steepness(k)
    _check_int("ignore_index", ignore_index)
    _check_int("chunk_size", chunk_size, 1)
    check_choice("reduction", reduction, REDUCTIONS)
    if not isinstance(validate, bool):
        raise ValueError(f"validate must be True or False, got {validate!r}")
    if target is None:
        if ce_weight:
            raise ValueError("target is None but ce_weight > 0: the cross-entropy term needs the target token ids "
                             "(pass ce_weight=0 to distil from the teacher alone over every position)")
    elif (not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex()
          or target.dtype == torch.bool):
        raise TypeError(f"target must be a tensor of integer token ids, got "
                        f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    elif target.shape != lead or target.device != hidden.device:
        raise ValueError(f"target must have hidden's leading shape {tuple(lead)} on {hidden.device}, got "
                         f"{tuple(target.shape)} on {target.device}")
    for name, x, want_float in (("teacher_ids", teacher_ids, False), ("teacher_logits", teacher_logits, True)):
        if not isinstance(x, torch.Tensor) or x.is_floating_point() != want_float or x.dtype == torch.bool:
            raise TypeError(f"{name} must be a tensor of {'floating-point logits' if want_float else 'integer ids'}, "
                            f"got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != len(lead) + 1 or x.shape[:-1] != lead or x.device != hidden.device:
            raise ValueError(f"{name} must have shape (..., K) = {tuple(lead) + ('K',)} on {hidden.device}, got "
                             f"{tuple(x.shape)} on {x.device}")
    if teacher_logits.shape != teacher_ids.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal teacher_ids shape "
                         f"{tuple(teacher_ids.shape)}")
    top_k = teacher_ids.shape[-1]
    if not (2 if rank_weight else 1) <= top_k <= vocab_size:
        raise ValueError(f"teacher_ids holds K = {top_k} ids per position: need K <= V = {vocab_size}, and K >= 2 "
                         "when rank_weight > 0 (the ranking loss compares pairs)")

    grad_enabled = torch.is_grad_enabled()
    loss, _, _, _ = torch.ops.rankkd.fused_linear_distill(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, None if target is None else target.reshape(-1).long(),
        teacher_ids.reshape(-1, top_k).long(), teacher_logits.reshape(-1, top_k), None, float(ce_weight),
        float(kd_weight), float(rank_weight), float(temperature), float(k), int(ignore_index), int(chunk_size),
        reduction, validate, grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad,
        grad_enabled and bias is not None and bias.requires_grad)
    return loss.reshape(lead) if reduction == "none" else loss


class FusedLinearDistillLoss(torch.nn.Module):
    """nn.Module form of fused_linear_distill_loss: forward(hidden, weight, target=None, *, teacher_ids,
    teacher_logits, bias=None). Setting `validate = False` after the first steps skips the data checks."""

    def __init__(self, *, ce_weight=1.0, kd_weight=1.0, rank_weight=1.0, temperature=1.0, k=1.0, ignore_index=-100,
                 chunk_size=1024, reduction="mean", validate=True):
        super().__init__()
        self.ce_weight, self.kd_weight, self.rank_weight = ce_weight, kd_weight, rank_weight
        self.temperature, self.k, self.ignore_index = temperature, k, ignore_index
        self.chunk_size, self.reduction, self.validate = chunk_size, reduction, validate

    def forward(self, hidden, weight, target=None, *, teacher_ids, teacher_logits, bias=None):
        return fused_linear_distill_loss(
            hidden, weight, target, teacher_ids=teacher_ids, teacher_logits=teacher_logits, bias=bias,
            ce_weight=self.ce_weight, kd_weight=self.kd_weight, rank_weight=self.rank_weight,
            temperature=self.temperature, k=self.k, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            reduction=self.reduction, validate=self.validate)

    def extra_repr(self):
        return (f"ce_weight={self.ce_weight}, kd_weight={self.kd_weight}, rank_weight={self.rank_weight}, "
                f"temperature={self.temperature}, k={self.k}, ignore_index={self.ignore_index}, "
                f"chunk_size={self.chunk_size}, reduction={self.reduction!r}, validate={self.validate}")


@torch.no_grad()
def teacher_topk(hidden, weight, k, *, bias=None, chunk_size=1024):
    """The teacher's k largest logits per position and their token ids, from its last hidden states (..., d) and LM
    head weight (V, d), bias (V,) optional, with the (positions x V) logits formed `chunk_size` positions at a time.

    Returns (ids, logits), both (..., k): int64 ids and the logits in the head's output dtype (the autocast dtype
    under autocast), largest first, ties broken as torch.topk breaks them. They are what fused_linear_distill_loss
    takes as teacher_ids and teacher_logits."""
    _check_int("k", k, 1)
    _check_int("chunk_size", chunk_size, 1)
    _check_head(*_autocast_head(hidden, weight, bias))
    if k > weight.shape[0]:
        raise ValueError(f"k must be <= V = {weight.shape[0]} (the vocabulary), got {k}")
    chunks = [torch.topk(F.linear(rows, weight, bias), k, dim=1)
              for rows in hidden.reshape(-1, hidden.shape[-1]).split(chunk_size)]
    shape = (*hidden.shape[:-1], k)
    return (torch.cat([chunk.indices for chunk in chunks]).reshape(shape),
            torch.cat([chunk.values for chunk in chunks]).reshape(shape))
