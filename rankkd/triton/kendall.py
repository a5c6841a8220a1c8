"""rankkd::kendall_rank_triton: the fused Kendall rank loss as Triton kernels, with the contract of
rankkd::kendall_rank (rankkd/_fused.py): per-row loss, and dloss_row/dstudent, dloss_row/dteacher when asked, from
one pass over the pairs. CUDA tensors; CPU tensors when TRITON_INTERPRET=1 is set before import (Triton's
interpreter, slow, for tests).

Work split. A row's C channels are cut into panels of BLOCK_I channels. Panel I pairs each of its channels i with
every channel j > i, sweeping j from the panel's first channel to C in blocks of BLOCK_J columns, so every unordered
pair is evaluated once and feeds both ends:
  - the i ends (block rows) add into 2-D register tiles over the whole sweep, reduced once at the end of the panel
    (_row_sums: a halving exchange across lanes);
  - the j ends (block columns) are summed over the block's rows, which each thread holds in registers (the block is
    laid out one column per thread, BLOCK_J = 32 * num_warps), and added to the j channels' running sums in memory.
Only the first block of a panel (its diagonal) needs a mask per pair: there a dropped pair (j <= i, or j >= C) has both
tanh values zeroed, so every term it adds is exactly zero. The sweep's other blocks run as one loop, the block that
crosses C included: its columns past C are weighted by 0 per column (_pair_block).

Determinism without atomics. A program owns one row and one "part" of the row's panels, and the running gradient
sums of its part live in a slice of memory that only it touches, so every sum is formed in a fixed order.
tl.debug_barrier() (bar.sync, which also orders the threads' global memory accesses) separates one panel's
read-modify-writes from the next's. When one part per row is enough (the rows give the GPU's schedulers two warps
each, or the row has too few panels to split) that slice is the output itself and the whole op is one launch;
otherwise a second kernel adds the parts' slices in order. Extra memory: parts * rows * C per gradient, parts <=
MAX_PARTS.

Precision (the op's precision argument). "fast" (float32 math on a GPU) evaluates tanh with one tanh.approx.f32
instruction (about 2^-11 relative error by the PTX ISA's bound) and sech^2 as 1 - tanh^2: loss and gradients within
2e-3 (relative norm) of float64 on logits of a realistic spread; strongly saturated pairs (|k (x_i - x_j)| beyond ~4)
lose relative accuracy in sech^2. "exact" (tanh from the rational minimax fit of csrc/kendall_cpu_math.h, sech^2 from
exp) stays within 1e-5 of float64 for loss and gradients, saturated logits included, for about five times the
instructions per pair (bench/kernel_report.py counts them). The interpreter runs "fast" as "exact" (it has no inline
assembly), and float64 logits are computed in float64 throughout, exactly.

Scaling. The fast path loads the logits as k (x - m) (one multiply per element, not per pair), m the midpoint of the
row's finite logits, found by each program's first pass over the row. The loss depends only on differences, so m
changes nothing exactly; in float32 it bounds the rounding by the row's spread instead of its magnitude (k x_i - k x_j
would carry an error of ulp(k x), which a common offset of the logits makes large). The row is scaled only where
every |k (x - m)| stays within half the largest float32; otherwise (k may be up to 3.4e38) it runs the same loop on
unscaled logits with k (x_i - x_j), as the exact path always does. The sign teacher's logits are never shifted or
scaled: sign(t_i - t_j) needs neither. kendall_rank(prescale=True) switches the scaling on in the interpreter too, so
that its code runs in the CPU tests."""
import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from rankkd import _args, _fused

# Parts per row stay at or below this: bounds the partial-sum memory to MAX_PARTS * rows * C per gradient.
MAX_PARTS = 64
# num_parts deals at most this many warps to an SM: two per warp scheduler, where one alone leaves the
# special-function unit waiting on its results (bench/kernel_report.py's latency model). Every fast variant fits 8
# one-warp programs per SM in registers (254 with the teacher gradient; 168-220 without), so they all start at once.
_WARPS_PER_SM = 8
# The partial sums of a split row (parts * rows * C per gradient) stay within this many elements.
_PARTIAL_ELEMENTS = 1 << 25


@triton.jit
def _tanh(x, PRECISION_FAST: tl.constexpr, PIN: tl.constexpr):
    if PRECISION_FAST:
        # One MUFU.TANH instruction, float32 only. PIN: exactly +-1 beyond |x| = 9.02 (where float32 tanh rounds to
        # +-1), for the tanh values whose sech^2 = 1 - tanh^2 is taken: the PTX spec does not promise exact saturation,
        # and 1 - tanh^2 of every saturated pair would add up. A value that only enters products needs no pin.
        y = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
        if PIN:
            # +-1 with x's sign from its bits: one logic op and a select instead of two compares and two selects.
            one = (x.to(tl.int32, bitcast=True) & -0x80000000 | 0x3F800000).to(tl.float32, bitcast=True)
            y = tl.where(tl.abs(x) >= 9.02, one, y)
        return y
    elif x.dtype == tl.float64:
        # tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1]: no overflow anywhere.
        e = tl.exp(-2.0 * tl.abs(x))
        magnitude = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -magnitude, magnitude)
    else:
        # x * P(x^2) / Q(x^2), the [9/8] minimax fit of csrc/kendall_cpu_math.h: max relative error 3.5e-7 on [0, 9],
        # and tanh rounds to +-1 in float32 beyond |x| = 9, so clamping there is exact. All coefficients are positive:
        # Q >= 1.
        x = tl.clamp(x, -9.0, 9.0)
        z = x * x
        p = (((1.3754580e-08 * z + 2.0902280e-05) * z + 3.5136070e-03) * z + 1.3396265e-01) * z + 1.0
        q = (((7.9415872e-07 * z + 3.3149603e-04) * z + 2.5945744e-02) * z + 4.6729589e-01) * z + 1.0
        return x * p / q


@triton.jit
def _sech2_exact(x):
    """sech^2(x) as 4e / (1 + e)^2 with e = exp(-2|x|): full relative accuracy in saturation. 1 - tanh^2 cannot: a
    float32 tanh near +-1 is off by up to ulp(1) = 6e-8, while sech^2(9) is 6e-8, and a row of widely spread logits has
    many saturated pairs whose errors add up in every gradient entry."""
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _load_logits(ptr, mask, acc_dtype: tl.constexpr, k, reference, PRESCALE: tl.constexpr):
    """Logits in acc_dtype, non-finite ones replaced by 0 (the row is made NaN at the end), and which ones they were.
    PRESCALE loads k (x - reference): only on rows that _row_reference found to fit."""
    x = tl.load(ptr, mask=mask, other=0.0).to(acc_dtype)
    finite = tl.abs(x) < float("inf")  # false for +-inf and NaN
    x = tl.where(finite, x, 0.0)
    if PRESCALE:
        x = (x - reference) * k
    return x, (~finite).to(tl.int32)


@triton.jit
def _finite_range(row_ptr, num_classes, acc_dtype: tl.constexpr, BLOCK: tl.constexpr):
    """The midpoint of the row's finite logits (0 when there are none: the row is NaN anyway) and half their spread."""
    lo = tl.full([BLOCK], float("inf"), acc_dtype)
    hi = tl.full([BLOCK], float("-inf"), acc_dtype)
    for c0 in range(0, num_classes, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < num_classes, other=float("nan")).to(acc_dtype)
        finite = tl.abs(x) < float("inf")  # false for +-inf, NaN and the masked tail
        lo = tl.where(finite, tl.minimum(lo, x), lo)
        hi = tl.where(finite, tl.maximum(hi, x), hi)
    lo = tl.min(lo, axis=0)
    hi = tl.max(hi, axis=0)
    any_finite = lo <= hi
    # Halves first: hi - lo and lo + hi may overflow, their halves cannot.
    midpoint = tl.where(any_finite, lo * 0.5 + hi * 0.5, 0.0)
    half_spread = tl.where(any_finite, hi * 0.5 - lo * 0.5, 0.0)
    return midpoint, half_spread


@triton.jit
def _row_reference(student_row, teacher_row, num_classes, k, acc_dtype: tl.constexpr, TEACHER_TOO: tl.constexpr,
                   BLOCK: tl.constexpr):
    """The references m_s, m_t that the fast path's loads subtract before scaling (m_t = 0 without TEACHER_TOO), and
    whether the row fits the scaling: every finite |k (x - m)| at most half the largest float32, so that no scaled
    logit overflows and any difference of two stays finite. k up to 3.4e38 is in the op's contract; a row that does
    not fit is evaluated unscaled, as k (x_i - x_j) (clamping instead would make every pair of two clamped logits a
    tie)."""
    reference_s, half_spread = _finite_range(student_row, num_classes, acc_dtype, BLOCK)
    reference_t = tl.zeros_like(reference_s)
    if TEACHER_TOO:
        reference_t, half_spread_t = _finite_range(teacher_row, num_classes, acc_dtype, BLOCK)
        half_spread = tl.maximum(half_spread, half_spread_t)
    return reference_s, reference_t, half_spread * k <= 1.7e38  # false where k times it overflows


@triton.jit
def _add_into(ptr, values, mask):
    tl.store(ptr, tl.load(ptr, mask=mask) + values, mask=mask)


@triton.jit
def _halve(x, cols, H: tl.constexpr, BLOCK_J: tl.constexpr):
    """One step of _row_sums on a [2 H, BLOCK_J] tile x: the [H, BLOCK_J] tile whose (r, c) is x[r', c] + x[r', c ^ H]
    with r' = r + H if c & H else r. Column c keeps one half of its rows and gets the other half's partners from
    column c ^ H: H exchanges and H adds, where a butterfly over the same columns takes 2 H of each."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, [2, H, BLOCK_J]), (1, 2, 0)))
    upper = ((cols & H) != 0)[None, :]
    send = tl.where(upper, lo, hi)
    keep = tl.where(upper, hi, lo)
    return keep + tl.gather(send, tl.broadcast_to((cols ^ H)[None, :], [H, BLOCK_J]), axis=1)


@triton.jit
def _row_sums(tile, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """tl.sum(tile, axis=1) of a [BLOCK_I, BLOCK_J] tile whose columns lie one per lane (BLOCK_J >= BLOCK_I, powers of
    two): after log2(BLOCK_I) halving steps column c holds row c % BLOCK_I summed over its group of BLOCK_I columns,
    and the BLOCK_J / BLOCK_I groups are added last. BLOCK_I - 1 lane shuffles (tl.gather within a warp) where the
    butterflies of tl.sum take BLOCK_I * log2(BLOCK_J). The result does not depend on the layout, only its cost."""
    cols = tl.arange(0, BLOCK_J)
    x = tile
    for step in tl.static_range(1, BLOCK_I.bit_length()):
        x = _halve(x, cols, BLOCK_I >> step, BLOCK_J)
    return tl.sum(tl.reshape(x, [BLOCK_J // BLOCK_I, BLOCK_I]), axis=0)


@triton.jit
def _pair_block(grad_s_row, grad_t_row, num_classes, k, col_scale, offs_i, s_i, t_i, offs_j, s_j, t_j,
                concordance, row_gs, row_gt,
                DIAGONAL: tl.constexpr, TEACHER_MODE_SIGN: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                PRECISION_FAST: tl.constexpr, SCALED: tl.constexpr):
    """The pairs (i, j) of one block, i in offs_i (logits s_i, t_i), j in offs_j (logits s_j, t_j): adds their
    concordance into concordance (per column), their i-end gradient terms into the 2-D tiles row_gs, row_gt, and
    their j-end terms, summed over i and times col_scale, into the gradients at offs_j. Only pairs with j < C count;
    DIAGONAL (the panel's first block) also drops the pairs with j <= i. SCALED: the logits come times k
    (_load_logits; the teacher's only with the tanh teacher), one multiply per element instead of one per pair."""
    in_row = offs_j < num_classes
    x_s = s_i[:, None] - s_j[None, :]
    x_t = t_i[:, None] - t_j[None, :]
    if not SCALED:
        x_s = x_s * k
    a = _tanh(x_s, PRECISION_FAST, GRAD_S)
    if TEACHER_MODE_SIGN:
        if x_t.dtype == tl.float32:
            # sign(x) with sign(0) = 0 from the bits: +-1 with x's sign, zeroed by one select where x == 0.
            one = (x_t.to(tl.int32, bitcast=True) & -0x80000000 | 0x3F800000).to(tl.float32, bitcast=True)
            b = tl.where(x_t == 0, 0.0, one)
        else:
            b = (x_t > 0).to(x_t.dtype) - (x_t < 0).to(x_t.dtype)
    else:
        if not SCALED:
            x_t = x_t * k
        b = _tanh(x_t, PRECISION_FAST, GRAD_T)
    if DIAGONAL:
        # Zero tanh values make every term of a dropped pair exactly zero.
        keep = (offs_j[None, :] > offs_i[:, None]) & in_row[None, :]
        a = tl.where(keep, a, 0.0)
        b = tl.where(keep, b, 0.0)
        column_weight = 1.0
    else:
        # Columns past C (the last block of a sweep; their logits load as 0, so every term is finite) are weighted by
        # 0 where the row tiles take the terms: one FMA instead of an add, where masking the tanh values would cost
        # two selects per pair. Their column sums are dropped whole.
        column_weight = in_row.to(row_gs.dtype)[None, :]
    p = a * b
    concordance += tl.where(in_row, tl.sum(p, axis=0), 0.0)
    if GRAD_S:
        # sech^2(k (s_i - s_j)) g(t_i - t_j), odd in (i, j); fast: (1 - a^2) b = b - a p, one FMA on the loss's product
        d_s = b - a * p if PRECISION_FAST else _sech2_exact(x_s) * b
        row_gs += d_s * column_weight
        _add_into(grad_s_row + offs_j, tl.sum(d_s, axis=0) * col_scale, in_row)
    if GRAD_T:
        # tanh(k (s_i - s_j)) sech^2(k (t_i - t_j)), odd in (i, j)
        d_t = a - b * p if PRECISION_FAST else a * _sech2_exact(x_t)
        row_gt += d_t * column_weight
        _add_into(grad_t_row + offs_j, tl.sum(d_t, axis=0) * col_scale, in_row)
    return concordance, row_gs, row_gt


@triton.jit
def _part_pairs(student_row, teacher_row, grad_s_row, grad_t_row, num_classes, part, n_parts, k, reference_s,
                reference_t, grad_scale, acc_dtype: tl.constexpr, TEACHER_MODE_SIGN: tl.constexpr,
                GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, PRECISION_FAST: tl.constexpr, SCALED: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """The pairs of the row's panels dealt to `part`: returns the per-column concordance sums and the count of
    non-finite logits in its panels; adds the gradient sums into the part's (zeroed) slices. SCALED: logits loaded as
    k (x - reference) (see _pair_block)."""
    SCALE_TEACHER: tl.constexpr = SCALED and not TEACHER_MODE_SIGN
    i_range = tl.arange(0, BLOCK_I)
    j_range = tl.arange(0, BLOCK_J)
    concordance = tl.zeros([BLOCK_J], acc_dtype)  # sum over the program's pairs of tanh_s * g, per block column
    non_finite = tl.zeros([BLOCK_I], tl.int32)  # count of non-finite logits in the program's panels
    n_panels = tl.cdiv(num_classes, BLOCK_I)
    for deal in range(0, tl.cdiv(n_panels, n_parts)):
        # Panels go to parts in snake order (0..P-1, then P-1..0, ...): panel I pairs with the C - I * BLOCK_I
        # channels from its start on, and snaking evens out the parts' shares of that triangle.
        panel = deal * n_parts + tl.where(deal % 2 == 0, part, n_parts - 1 - part)
        if panel < n_panels:
            if GRAD_S or GRAD_T:
                tl.debug_barrier()  # the previous panel's read-modify-writes (or the zero fill) land first
            offs_i = panel * BLOCK_I + i_range
            mask_i = offs_i < num_classes
            s_i, s_bad = _load_logits(student_row + offs_i, mask_i, acc_dtype, k, reference_s, SCALED)
            t_i, t_bad = _load_logits(teacher_row + offs_i, mask_i, acc_dtype, k, reference_t, SCALE_TEACHER)
            non_finite += s_bad + t_bad
            row_gs = tl.zeros([BLOCK_I, BLOCK_J], acc_dtype)
            row_gt = tl.zeros([BLOCK_I, BLOCK_J], acc_dtype)
            first_col = panel * BLOCK_I
            # The diagonal block (pairs within the panel, i < j), then the blocks after it up to C; only the first
            # needs a mask per pair.
            offs_j = first_col + j_range
            s_j, _ = _load_logits(student_row + offs_j, offs_j < num_classes, acc_dtype, k, reference_s, SCALED)
            t_j, _ = _load_logits(teacher_row + offs_j, offs_j < num_classes, acc_dtype, k, reference_t, SCALE_TEACHER)
            concordance, row_gs, row_gt = _pair_block(
                grad_s_row, grad_t_row, num_classes, k, -grad_scale, offs_i, s_i, t_i, offs_j, s_j, t_j,
                concordance, row_gs, row_gt, True, TEACHER_MODE_SIGN, GRAD_S, GRAD_T, PRECISION_FAST, SCALED)
            # Each block's logits are loaded one block ahead, so the loads' latency hides behind the math.
            offs_next = first_col + BLOCK_J + j_range
            in_next = offs_next < num_classes
            s_next, _ = _load_logits(student_row + offs_next, in_next, acc_dtype, k, reference_s, SCALED)
            t_next, _ = _load_logits(teacher_row + offs_next, in_next, acc_dtype, k, reference_t, SCALE_TEACHER)
            for j0 in range(first_col + BLOCK_J, num_classes, BLOCK_J):
                s_j, t_j = s_next, t_next
                offs_next = j0 + BLOCK_J + j_range
                in_next = offs_next < num_classes
                s_next, _ = _load_logits(student_row + offs_next, in_next, acc_dtype, k, reference_s, SCALED)
                t_next, _ = _load_logits(teacher_row + offs_next, in_next, acc_dtype, k, reference_t, SCALE_TEACHER)
                concordance, row_gs, row_gt = _pair_block(
                    grad_s_row, grad_t_row, num_classes, k, -grad_scale, offs_i, s_i, t_i, j0 + j_range, s_j, t_j,
                    concordance, row_gs, row_gt, False, TEACHER_MODE_SIGN, GRAD_S, GRAD_T, PRECISION_FAST, SCALED)
            if GRAD_S or GRAD_T:
                tl.debug_barrier()  # the diagonal block's column sums went to this panel's own channels
            if GRAD_S:
                _add_into(grad_s_row + offs_i, _row_sums(row_gs, BLOCK_I, BLOCK_J) * grad_scale, mask_i)
            if GRAD_T:
                _add_into(grad_t_row + offs_i, _row_sums(row_gt, BLOCK_I, BLOCK_J) * grad_scale, mask_i)

    return concordance, non_finite


# num_classes is not specialized (on divisibility by 16): that would compile a kernel per kind of C and buy nothing.
@triton.jit(do_not_specialize=["num_classes"])
def _kendall_pairs_kernel(
    student_ptr, teacher_ptr, loss_ptr, grad_s_ptr, grad_t_ptr, num_classes, loss_base, k_hi, k_lo,
    TEACHER_MODE_SIGN: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, PRECISION_FAST: tl.constexpr,
    PRESCALE: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Program (row, part): the pairs of the row's panels dealt to `part` (of num_programs(1) parts).

    Logits are (rows, C), contiguous. Writes loss_base - c * (its share of sum_{i<j} tanh_s g) to
    loss_ptr[row, part] of a (rows, parts) array, and its share of dloss/dstudent, dloss/dteacher to
    grad_{s,t}_ptr[row, part, :] of (rows, parts, C) arrays: the final values when there is one part (loss_base = 1),
    partial sums for _kendall_sum_parts_kernel otherwise (loss_base = 0).
    Non-finite logits are read as 0, counted in the program's panels (each channel lies in one), and make the row's
    loss, or loss partial, NaN, and the gradients it writes NaN."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    n_parts = tl.num_programs(1)
    acc_dtype = loss_ptr.dtype.element_ty
    # Triton passes Python floats as float32: k arrives as two float32 halves so float64 logits get k to 48 bits.
    k = tl.cast(k_hi, acc_dtype) + tl.cast(k_lo, acc_dtype)
    n = tl.cast(num_classes, acc_dtype)
    pair_scale = 2.0 / (n * (n - 1.0))
    grad_scale = -pair_scale * k  # dL/ds_i = grad_scale * sum_{j != i} sech^2(k (s_i - s_j)) g(t_i - t_j)

    student_row = student_ptr + row * num_classes
    teacher_row = teacher_ptr + row * num_classes
    grad_s_row = grad_s_ptr + (row * n_parts + part) * num_classes
    grad_t_row = grad_t_ptr + (row * n_parts + part) * num_classes
    j_range = tl.arange(0, BLOCK_J)

    if GRAD_S or GRAD_T:
        for c0 in range(0, num_classes, BLOCK_J):
            cols = c0 + j_range
            if GRAD_S:
                tl.store(grad_s_row + cols, tl.zeros([BLOCK_J], acc_dtype), mask=cols < num_classes)
            if GRAD_T:
                tl.store(grad_t_row + cols, tl.zeros([BLOCK_J], acc_dtype), mask=cols < num_classes)

    # PRESCALE (the fast path): logits loaded as k (x - m) where the row allows it (every part of a row decides
    # alike), else k (x_i - x_j) per pair, as the exact path does.
    if PRESCALE:
        reference_s, reference_t, scaled = _row_reference(
            student_row, teacher_row, num_classes, k, acc_dtype, not TEACHER_MODE_SIGN, BLOCK_J)
    else:
        reference_s, reference_t, scaled = tl.zeros_like(k), tl.zeros_like(k), False
    if scaled:
        concordance, non_finite = _part_pairs(
            student_row, teacher_row, grad_s_row, grad_t_row, num_classes, part, n_parts, k, reference_s, reference_t,
            grad_scale, acc_dtype, TEACHER_MODE_SIGN, GRAD_S, GRAD_T, PRECISION_FAST, True, BLOCK_I, BLOCK_J)
    else:
        concordance, non_finite = _part_pairs(
            student_row, teacher_row, grad_s_row, grad_t_row, num_classes, part, n_parts, k, reference_s, reference_t,
            grad_scale, acc_dtype, TEACHER_MODE_SIGN, GRAD_S, GRAD_T, PRECISION_FAST, False, BLOCK_I, BLOCK_J)

    has_non_finite = tl.sum(non_finite, axis=0) > 0
    if GRAD_S or GRAD_T:
        if has_non_finite:  # the whole slice, so that the row's gradients come out NaN whatever the other parts hold
            tl.debug_barrier()
            for c0 in range(0, num_classes, BLOCK_J):
                cols = c0 + j_range
                nan = tl.full([BLOCK_J], float("nan"), acc_dtype)
                if GRAD_S:
                    tl.store(grad_s_row + cols, nan, mask=cols < num_classes)
                if GRAD_T:
                    tl.store(grad_t_row + cols, nan, mask=cols < num_classes)
    loss = loss_base - pair_scale * tl.sum(concordance, axis=0)
    tl.store(loss_ptr + row * n_parts + part, tl.where(has_non_finite, float("nan"), loss))


@triton.jit
def _sum_parts(part_row, out_row, offs, mask, num_classes, n_parts, BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_C], out_row.dtype.element_ty)
    for p in range(0, n_parts):
        total += tl.load(part_row + p * num_classes + offs, mask=mask, other=0.0)
    tl.store(out_row + offs, total, mask=mask)


@triton.jit(do_not_specialize=["num_classes", "n_parts"])
def _kendall_sum_parts_kernel(
    loss_part_ptr, grad_s_part_ptr, grad_t_part_ptr,
    loss_ptr, grad_s_ptr, grad_t_ptr,
    num_classes, n_parts,
    GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, BLOCK_PARTS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (row, column block): adds the parts' partial sums in part order. A part whose panels hold a non-finite
    logit left NaN in its loss partial and its whole gradient slices, so the row's sums come out NaN."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    parts = tl.arange(0, BLOCK_PARTS)
    loss_parts = tl.load(loss_part_ptr + row * n_parts + parts, mask=parts < n_parts, other=0.0)
    tl.store(loss_ptr + row, 1.0 + tl.sum(loss_parts, axis=0), mask=block == 0)
    offs = block * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < num_classes
    if GRAD_S:
        _sum_parts(grad_s_part_ptr + row * n_parts * num_classes, grad_s_ptr + row * num_classes, offs, mask,
                   num_classes, n_parts, BLOCK_C)
    if GRAD_T:
        _sum_parts(grad_t_part_ptr + row * n_parts * num_classes, grad_t_ptr + row * num_classes, offs, mask,
                   num_classes, n_parts, BLOCK_C)


# Under TRITON_INTERPRET=1, @triton.jit returns Python-run stand-ins instead of JITFunctions.
INTERPRETED = not isinstance(_kendall_pairs_kernel, triton.runtime.JITFunction)

# Launch shape. A block is BLOCK_J = 32 * num_warps columns, one per thread, times BLOCK_I rows that every thread holds
# in registers, so the column sums of a block stay within a thread. One warp keeps blocks as narrow as they get (32
# columns: the least waste in the masked diagonal block and in the half-empty block where a panel's sweep meets the
# row's end) and the panel's row sums within a warp; an SM runs many one-warp programs, and num_parts deals enough of
# them to give each scheduler two. Rows per thread are as many as fit without spilling (bench/kernel_report.py reads
# the registers and programs per SM from the SASS); the exact tanh needs more live values, and float64 twice the
# registers.
NUM_WARPS = 1
BLOCK_I_FAST, BLOCK_I_EXACT, BLOCK_I_FLOAT64 = 32, 16, 8
# The interpreter runs a block as numpy operations on whole arrays: fewer, larger blocks are faster there.
BLOCK_I_INTERPRETED, BLOCK_J_INTERPRETED = 64, 256
_SUM_BLOCK_C = 1024


@functools.lru_cache(maxsize=None)
def _num_sms(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def num_parts(rows, num_classes, block_i, num_warps, sms):
    """Parts per row: the most whose programs stay within _WARPS_PER_SM warps per SM, so that every warp scheduler
    gets two warps where the rows alone give it fewer; rows that fill the SMs on their own run as one part (one
    launch). bench/kernel_report.py's latency model: a scheduler with one warp runs the pair loop at about 1.27x the
    2-tanh floor (the special-function unit idles while the warp waits on its last results), with two at 1.0-1.2x; the
    code around the loop (a panel's diagonal block and row exchange, the row pass) is latency-bound too, so at small
    batches more parts win even with the second launch they take, and more programs than an SM holds at once would
    start a second wave. Over batches of 16-1024 rows and C = 1000-4096 on sm_80, sm_90 and sm_120 this choice is
    within 4-6 % of the model's best on average for each fast variant (ten warps per SM would do better for the student
    gradient alone, whose programs fit ten per SM, and far worse for the others, which start a second wave). At most
    MAX_PARTS, half the row's panels (two panels per part, snake-dealt, keep parts even) and _PARTIAL_ELEMENTS of
    partial sums."""
    if rows == 0:
        return 1
    limit = min(MAX_PARTS, triton.cdiv(num_classes, block_i) // 2, _PARTIAL_ELEMENTS // (rows * num_classes))
    return max(1, min(limit, _WARPS_PER_SM * sms // (rows * num_warps)))


def kendall_rank(student, teacher, k, teacher_mode, precision, grad_student, grad_teacher, *, block_i=None,
                 block_j=None, num_warps=NUM_WARPS, parts=None, prescale=None):
    """The op's implementation, with the launch knobs exposed for tests and tuning: panel height block_i (default
    BLOCK_I_FAST, _EXACT or _FLOAT64; BLOCK_I_INTERPRETED in the interpreter), block width block_j (default
    32 * num_warps, or BLOCK_J_INTERPRETED; must be >= block_i), parts per row (default num_parts), prescale (logits
    times k at load where a row allows it; default: on the fast path only. Tests switch it on in the interpreter,
    where the fast path's tanh cannot run, to exercise the fast path's scaling with the exact tanh)."""
    _args.check_fused_args("rankkd::kendall_rank_triton", student, teacher, k, teacher_mode, precision, grad_teacher)
    student, teacher = student.contiguous(), teacher.contiguous()
    rows, num_classes = student.shape
    acc_dtype = _fused.accumulation_dtype(student.dtype)
    # tanh.approx.f32 is float32-only and needs a GPU (the interpreter has no inline assembly).
    precision_fast = precision == "fast" and acc_dtype == torch.float32 and not INTERPRETED
    # k x_i - k x_j carries the rounding of both products: within the fast path's error, not the exact path's.
    prescale = precision_fast if prescale is None else bool(prescale)
    if block_i is None:
        block_i = (BLOCK_I_INTERPRETED if INTERPRETED else BLOCK_I_FLOAT64 if acc_dtype == torch.float64 else
                   BLOCK_I_FAST if precision_fast else BLOCK_I_EXACT)
    if block_j is None:
        block_j = BLOCK_J_INTERPRETED if INTERPRETED else 32 * num_warps
    if block_j < block_i:
        raise ValueError(f"block_j ({block_j}) must be >= block_i ({block_i}): a panel's diagonal is one block")
    parts = num_parts(rows, num_classes, block_i, num_warps, _num_sms(student.device)) if parts is None else parts
    if not 1 <= parts <= MAX_PARTS:
        raise ValueError(f"parts must be in [1, MAX_PARTS = {MAX_PARTS}], got {parts}")
    k_hi = struct.unpack("f", struct.pack("f", k))[0]  # k rounded to float32; k_hi + k_lo holds k to 48 bits
    k_lo = k - k_hi

    loss = student.new_empty((rows,), dtype=acc_dtype)
    grad_s = student.new_empty((rows, num_classes) if grad_student else (0,), dtype=acc_dtype)
    grad_t = student.new_empty((rows, num_classes) if grad_teacher else (0,), dtype=acc_dtype)
    if parts == 1:  # the kernel writes the results directly
        loss_out, grad_s_out, grad_t_out, loss_base = loss, grad_s, grad_t, 1.0
    else:
        loss_out = student.new_empty((rows, parts), dtype=acc_dtype)
        grad_s_out = student.new_empty((rows, parts, num_classes) if grad_student else (0,), dtype=acc_dtype)
        grad_t_out = student.new_empty((rows, parts, num_classes) if grad_teacher else (0,), dtype=acc_dtype)
        loss_base = 0.0

    # Interpreted kernels need (and, in older torch, accept) no wrapping; the op is then an opaque custom op.
    pairs_kernel = _kendall_pairs_kernel if INTERPRETED else wrap_triton(_kendall_pairs_kernel)
    sum_kernel = _kendall_sum_parts_kernel if INTERPRETED else wrap_triton(_kendall_sum_parts_kernel)
    # Triton launches on the current CUDA device, which need not be the tensors'.
    with torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext():
        pairs_kernel[(rows, parts)](
            student, teacher, loss_out, grad_s_out, grad_t_out, num_classes, loss_base, k_hi, k_lo,
            TEACHER_MODE_SIGN=teacher_mode == "sign", GRAD_S=grad_student, GRAD_T=grad_teacher,
            PRECISION_FAST=precision_fast, PRESCALE=prescale,
            BLOCK_I=block_i, BLOCK_J=block_j, num_warps=num_warps, num_stages=1)
        if parts > 1:
            sum_kernel[(rows, triton.cdiv(num_classes, _SUM_BLOCK_C))](
                loss_out, grad_s_out, grad_t_out, loss, grad_s, grad_t, num_classes, parts,
                GRAD_S=grad_student, GRAD_T=grad_teacher, BLOCK_PARTS=triton.next_power_of_2(parts),
                BLOCK_C=_SUM_BLOCK_C, num_warps=4)
    return loss, grad_s, grad_t


def _kendall_rank_triton(student: torch.Tensor, teacher: torch.Tensor, k: float, teacher_mode: str, precision: str,
                         grad_student: bool, grad_teacher: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kendall_rank(student, teacher, k, teacher_mode, precision, grad_student, grad_teacher)


# triton_op lets torch.compile see (and schedule) the kernels. The interpreter runs kernels as Python on real
# tensors, which dispatcher tracing (torch.compile, opcheck) cannot feed with fake tensors: there the op is opaque.
_define_op = custom_op if INTERPRETED else triton_op
kendall_rank_triton = _define_op("rankkd::kendall_rank_triton", mutates_args=())(_kendall_rank_triton)
kendall_rank_triton.register_fake(_fused.fake_kendall_rank)
_fused.register_autograd("rankkd::kendall_rank_triton")
