"""Fused softmax cross-entropy on NVIDIA GPUs: the loss and its gradient with respect to the
logits in one pass over the logits.

For a row x of C logits with target t, class weights w (all ones without a weight), label
smoothing eps and the reduction's scale s (1/denominator for "mean", 1 otherwise)::

    lse   = log sum_c exp(x_c)
    loss  = s [ (1 - eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c) ]
    dx_j  = s [ p_j ((1 - eps) w_t + eps/C W) - eps/C w_j - (1 - eps) w_t [j == t] ],   p_j = exp(x_j - lse),  W = sum_c w_c

``denominator`` is the sum of w_t over the rows whose target is not ignore_index. A row whose
target is ignore_index has loss 0 and gradient 0 and is never read; a row whose target is out
of [0, C) is never read either and gets NaN loss and gradient.

Three launches per forward, none of them waiting on the host:

1. ``_target_stats_kernel`` (one program): the denominator, W, and a flag that every target is
   ignore_index or in range (the caller turns it into a device-side assert).
2. ``_cross_entropy_kernel`` (one program per row): pass 1 streams the row in blocks with an online
   softmax that keeps a running max and sum per lane; pass 2 walks the blocks back (the last ones
   read are likeliest still in L2), writes dx and sums the smoothing term. A row that fits in one
   block is loaded once and kept in registers.
3. the sum of the row losses ("sum" and "mean"; "mean" rows are already divided by the denominator).

Small batches (up to SMALL_PROBLEM logits, rows of at most SMALL_MAX_C, such as MNIST's 64 x 10)
are launch-bound, so ``_small_cross_entropy_kernel`` does all three in one program: one pass over
the targets for the statistics, then the rows in tiles of whole rows, summing the loss in row
order (deterministic, as the separate sum is).

The backward's ``_scale_grad_kernel`` multiplies dx by grad_output in place; its programs read
grad_output from device memory and return at once when it is 1, the usual case.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.utils import TORCH_TO_TL

# Rows up to this many logits are held in registers (one block); longer rows stream in blocks.
MAX_SINGLE_BLOCK = 8192
# Batches up to this many logits (rows padded to a power of two), with rows of at most
# SMALL_MAX_C, take the one-program kernel; SMALL_TILE logits are in flight at a time.
SMALL_PROBLEM = 1 << 14
SMALL_MAX_C = 1024
SMALL_TILE = 4096
STREAM_BLOCK = 8192
SCALE_BLOCK = 4096
STATS_BLOCK = 4096


@triton.jit
def _target_stats(target_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr,
                  BLOCK: tl.constexpr):
    """(sum of w_t over the counted rows, number of targets neither ignore_index nor in range)."""
    offs = tl.arange(0, BLOCK)
    denominator = tl.zeros([BLOCK], COMPUTE)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        t = tl.load(target_ptr + start + offs, mask=start + offs < N, other=ignore_index)
        counted = t != ignore_index
        in_range = (t >= 0) & (t < C)
        if HAS_WEIGHT:
            denominator += tl.load(weight_ptr + t, mask=counted & in_range, other=0.0).to(COMPUTE)
        else:
            denominator += (counted & in_range).to(COMPUTE)
        bad += (counted & ~in_range).to(tl.int32)
    return tl.sum(denominator, 0), tl.sum(bad, 0)


@triton.jit
def _target_stats_kernel(target_ptr, weight_ptr, stats_ptr, ok_ptr, N, C, ignore_index,
                         HAS_WEIGHT: tl.constexpr, SUM_WEIGHT: tl.constexpr, COMPUTE: tl.constexpr,
                         BLOCK: tl.constexpr):
    """stats = [sum of w_t over counted rows, sum_c w_c (only with SUM_WEIGHT)]; ok = 1 if no
    target is out of range."""
    denominator, bad = _target_stats(target_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, COMPUTE, BLOCK)
    tl.store(stats_ptr, denominator)
    if SUM_WEIGHT:
        offs = tl.arange(0, BLOCK)
        weights = tl.zeros([BLOCK], COMPUTE)
        for start in range(0, C, BLOCK):
            weights += tl.load(weight_ptr + start + offs, mask=start + offs < C, other=0.0).to(COMPUTE)
        tl.store(stats_ptr + 1, tl.sum(weights, 0))
    tl.store(ok_ptr, (bad == 0).to(tl.int32))


@triton.jit
def _online_update(m, s, x):
    """Adds the logits x to per-lane running (max m, sum s of exp(x - m)) with one exp per
    element: exp(-|x - m|) either rescales s (new max) or is the new term. -inf logits add 0
    (also before a lane has seen a finite value); NaN propagates."""
    e = tl.where(x == -float("inf"), 0.0, tl.exp(-tl.abs(x - m)))
    grows = x > m
    return tl.where(grows, x, m), tl.where(grows, s * e + 1.0, s + e)


@triton.jit
def _logsumexp(m, s, AXIS: tl.constexpr = 0):
    """log sum exp along AXIS from per-lane (max, sum); -inf when every logit is -inf."""
    row_max = tl.max(m, AXIS)
    scaled = tl.where(m == -float("inf"), 0.0, s * tl.exp(m - tl.expand_dims(row_max, AXIS)))
    return row_max + tl.log(tl.sum(scaled, AXIS))


@triton.jit
def _gradient_block(x, w, cols, t, lse, p_coef, w_coef, t_coef, row_fill, valid):
    """dx for one block of a row (see the module docstring); row_fill for rows not computed."""
    dx = tl.exp(x - lse) * p_coef - w * w_coef - tl.where(cols == t, t_coef, 0.0)
    return tl.where(valid, dx, row_fill)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, target_ptr, weight_ptr, stats_ptr, loss_ptr, grad_ptr,
    C, ignore_index,
    LABEL_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * C
    grad_ptr += row * C
    t = tl.load(target_ptr + row)
    counted = t != ignore_index
    valid = counted & (t >= 0) & (t < C)
    row_fill = tl.where(counted, float("nan"), 0.0)  # an out-of-range target: NaN; ignore_index: 0
    t = tl.where(valid, t, 0)  # never index out of bounds

    x_t = tl.load(logits_ptr + t).to(COMPUTE)
    w_t = tl.load(weight_ptr + t).to(COMPUTE) if HAS_WEIGHT else 1.0
    scale = 1.0 / tl.load(stats_ptr).to(COMPUTE) if MEAN else 1.0
    eps = tl.full([], LABEL_SMOOTHING, COMPUTE)  # a bare Python float would be rounded to float32
    eps_c = eps / (tl.zeros([], COMPUTE) + C)  # in COMPUTE precision (C may be a constexpr int)
    weight_sum = tl.load(stats_ptr + 1).to(COMPUTE) if HAS_WEIGHT and LABEL_SMOOTHING != 0.0 else C
    p_coef = scale * ((1.0 - eps) * w_t + eps_c * weight_sum)
    w_coef = scale * eps_c
    t_coef = scale * (1.0 - eps) * w_t

    cols = tl.arange(0, BLOCK)
    smooth = tl.zeros([BLOCK], COMPUTE)  # sum_c w_c (lse - x_c), lane by lane
    if SINGLE_BLOCK:
        mask = cols < C
        x = tl.load(logits_ptr + cols, mask=mask & valid, other=-float("inf")).to(COMPUTE)
        lse = _logsumexp(x, tl.where(x == -float("inf"), 0.0, 1.0).to(COMPUTE))
        w = 1.0
        if LABEL_SMOOTHING != 0.0:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(COMPUTE)
            smooth += tl.where(mask, w * (lse - x), 0.0)
        if COMPUTE_GRAD:
            dx = _gradient_block(x, w, cols, t, lse, p_coef, w_coef, t_coef, row_fill, valid)
            tl.store(grad_ptr + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK], -float("inf"), COMPUTE)
        s = tl.zeros([BLOCK], COMPUTE)
        for start in range(0, C, BLOCK):
            mask = (start + cols < C) & valid
            x = tl.load(logits_ptr + start + cols, mask=mask, other=-float("inf"), eviction_policy="evict_last")
            m, s = _online_update(m, s, x.to(COMPUTE))
        lse = _logsumexp(m, s)
        if COMPUTE_GRAD or LABEL_SMOOTHING != 0.0:
            num_blocks = tl.cdiv(C, BLOCK)
            for back in range(0, num_blocks):
                start = (num_blocks - 1 - back) * BLOCK
                mask = start + cols < C
                x = tl.load(logits_ptr + start + cols, mask=mask & valid, other=0.0,
                            eviction_policy="evict_first").to(COMPUTE)
                w = 1.0
                if LABEL_SMOOTHING != 0.0:
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(COMPUTE)
                    smooth += tl.where(mask, w * (lse - x), 0.0)
                if COMPUTE_GRAD:
                    dx = _gradient_block(x, w, start + cols, t, lse, p_coef, w_coef, t_coef, row_fill, valid)
                    tl.store(grad_ptr + start + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask,
                             eviction_policy="evict_first")

    loss = (1.0 - eps) * w_t * (lse - x_t) + eps_c * tl.sum(smooth, 0)
    # Multiplied, not selected, by the scale: with "mean" over no counted row (scale = inf) the
    # ignored rows' 0 * inf makes the mean NaN, as in PyTorch.
    tl.store(loss_ptr + row, tl.where(valid, loss, row_fill) * scale)


@triton.jit
def _small_cross_entropy_kernel(
    logits_ptr, target_ptr, weight_ptr, loss_ptr, ok_ptr, grad_ptr,
    N, C, ignore_index,
    LABEL_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole batch in one program: _target_stats_kernel's statistics, then _cross_entropy_kernel's
    rows BLOCK_N at a time, and the reduction (0/1/2 = none/sum/mean) of their losses."""
    denominator, bad = _target_stats(target_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, COMPUTE, BLOCK_N)
    tl.store(ok_ptr, (bad == 0).to(tl.int32))
    scale = 1.0 / denominator if REDUCTION == 2 else 1.0

    cols = tl.arange(0, BLOCK_C)
    col_in = cols < C
    offs = tl.arange(0, BLOCK_N)

    eps = tl.full([], LABEL_SMOOTHING, COMPUTE)  # a bare Python float would be rounded to float32
    eps_c = eps / (tl.zeros([], COMPUTE) + C)
    w = tl.full([BLOCK_C], 1.0, COMPUTE)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_in, other=0.0).to(COMPUTE)
    weight_sum = tl.sum(tl.where(col_in, w, 0.0), 0)
    total = tl.zeros([BLOCK_N], COMPUTE)
    for start in range(0, N, BLOCK_N):
        rows = start + offs
        row_in = rows < N
        t = tl.load(target_ptr + rows, mask=row_in, other=ignore_index)
        counted = t != ignore_index
        valid = counted & (t >= 0) & (t < C)
        row_fill = tl.where(counted, float("nan"), 0.0)  # an out-of-range target: NaN; ignore_index: 0
        t = tl.where(valid, t, 0)  # never index out of bounds
        w_t = tl.full([BLOCK_N], 1.0, COMPUTE)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=row_in, other=0.0).to(COMPUTE)
        where = rows[:, None].to(tl.int64) * C + cols[None, :]
        mask = row_in[:, None] & col_in[None, :]
        x = tl.load(logits_ptr + where, mask=mask & valid[:, None], other=-float("inf")).to(COMPUTE)
        lse = _logsumexp(x, tl.where(x == -float("inf"), 0.0, 1.0).to(COMPUTE), 1)
        x_t = tl.sum(tl.where(cols[None, :] == t[:, None], x, 0.0), 1)
        loss = (1.0 - eps) * w_t * (lse - x_t)
        if LABEL_SMOOTHING != 0.0:
            loss += eps_c * tl.sum(tl.where(mask, w[None, :] * (lse[:, None] - x), 0.0), 1)
        loss = tl.where(valid, loss, row_fill) * scale  # multiplied: 0 * inf makes an empty mean NaN
        if REDUCTION == 0:
            tl.store(loss_ptr + rows, loss, mask=row_in)
        else:
            total += tl.where(row_in, loss, 0.0)
        if COMPUTE_GRAD:  # _gradient_block on the tile: per-row terms broadcast along the columns
            p_coef = scale * ((1.0 - eps) * w_t + eps_c * weight_sum)
            t_coef = scale * (1.0 - eps) * w_t
            dx = _gradient_block(x, w[None, :], cols[None, :], t[:, None], lse[:, None], p_coef[:, None],
                                 scale * eps_c, t_coef[:, None], row_fill[:, None], valid[:, None])
            tl.store(grad_ptr + where, dx.to(grad_ptr.dtype.element_ty), mask=mask)
    if REDUCTION != 0:
        tl.store(loss_ptr, tl.sum(total, 0))


@triton.jit
def _scale_grad_kernel(grad_ptr, grad_output_ptr, grad_output_stride, C, COMPUTE: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(grad_output_ptr + row * grad_output_stride).to(COMPUTE)
    if g != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < C
        ptrs = grad_ptr + row * C + cols
        tl.store(ptrs, (tl.load(ptrs, mask=mask).to(COMPUTE) * g).to(grad_ptr.dtype.element_ty), mask=mask)


def _row_config(C: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, single block) for rows of C logits: up to MAX_SINGLE_BLOCK the row is
    one block held in registers, about 8 logits per thread; longer rows stream in blocks of
    STREAM_BLOCK with 16 warps, so two programs share an SM and the rows in flight (whose second
    pass should hit L2) stay few."""
    if C <= MAX_SINGLE_BLOCK:
        block = triton.next_power_of_2(C)
        return block, max(1, min(16, block // 256)), True
    return STREAM_BLOCK, 16, False


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
            label_smoothing: float, reduction: int, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of contiguous (N, C) logits for reduction 0/1/2 (none/sum/mean), in the logits' dtype,
    and the int32 flag (one element, on the device) that every target was valid; writes dloss/dlogits
    into ``grad`` when given (it may be ``logits`` itself)."""
    N, C = logits.shape
    device = logits.device
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ok = torch.empty(1, dtype=torch.int32, device=device)
    smoothing = label_smoothing != 0.0
    has_weight = weight is not None
    weight_arg = weight if has_weight else logits  # never read without HAS_WEIGHT
    block_c = triton.next_power_of_2(C)
    if N and C <= SMALL_MAX_C and N * block_c <= SMALL_PROBLEM:
        loss = torch.empty(N if reduction == 0 else 1, dtype=compute, device=device)
        block_n = min(triton.next_power_of_2(N), max(1, SMALL_TILE // block_c))
        _small_cross_entropy_kernel[(1,)](
            logits, target, weight_arg, loss, ok, grad if grad is not None else logits, N, C, ignore_index,
            LABEL_SMOOTHING=label_smoothing, HAS_WEIGHT=has_weight, REDUCTION=reduction,
            COMPUTE_GRAD=grad is not None, COMPUTE=TORCH_TO_TL[compute], BLOCK_N=block_n, BLOCK_C=block_c,
            num_warps=4)
        return (loss if reduction == 0 else loss.view(())).to(logits.dtype), ok
    stats = torch.empty(2, dtype=compute, device=device)
    _target_stats_kernel[(1,)](target, weight_arg, stats, ok, N, C, ignore_index,
                               HAS_WEIGHT=has_weight, SUM_WEIGHT=has_weight and smoothing,
                               COMPUTE=TORCH_TO_TL[compute], BLOCK=STATS_BLOCK, num_warps=8)
    loss = torch.empty(N, dtype=compute, device=device)
    if N:
        block, num_warps, single = _row_config(C)
        _cross_entropy_kernel[(N,)](
            logits, target, weight_arg, stats, loss, grad if grad is not None else logits,
            C, ignore_index,
            LABEL_SMOOTHING=label_smoothing, HAS_WEIGHT=has_weight, MEAN=reduction == 2, COMPUTE_GRAD=grad is not None,
            COMPUTE=TORCH_TO_TL[compute], BLOCK=block, SINGLE_BLOCK=single, num_warps=num_warps,
        )
    if reduction == 2 and not N:
        loss = torch.full((), float("nan"), dtype=compute, device=device)
    elif reduction:
        loss = loss.sum()
    return loss.to(logits.dtype), ok


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, C) *= grad_output (a scalar, or one value per row), in place, without a host sync."""
    N, C = grad.shape
    if not N:
        return
    stride = grad_output.stride(0) if grad_output.dim() else 0
    compute = TORCH_TO_TL[torch.float64 if grad.dtype == torch.float64 else torch.float32]
    _scale_grad_kernel[(N, triton.cdiv(C, SCALE_BLOCK))](grad, grad_output, stride, C, COMPUTE=compute,
                                                          BLOCK=SCALE_BLOCK, num_warps=8)
