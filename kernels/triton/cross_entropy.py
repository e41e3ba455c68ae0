"""Fused softmax cross-entropy on NVIDIA GPUs: the loss and its gradient with respect to the
logits in one pass over the logits.

For a row x of C logits with target t, class weights w (all ones without a weight), label
smoothing eps and the reduction's scale s (1/denominator for "mean", 1 otherwise)::

    lse   = log sum_c exp(x_c) = max + log_sum,   log_sum = log sum_c exp(x_c - max)
    loss  = s [ (1 - eps) w_t (lse - x_t) + eps/C sum_c w_c (lse - x_c) ]
    dx_j  = s [ p_j ((1 - eps) w_t + eps/C W) - eps/C w_j - (1 - eps) w_t [j == t] ]
    p_j   = exp(x_j - lse),   W = sum_c w_c

``denominator`` is the sum of w_t over the rows whose target is not ignore_index. Every
``lse - x`` is formed as ``log_sum - (x - max)``, as log_softmax does, so that its error does not
grow with the logits' magnitude. A row whose target is ignore_index has loss 0 and gradient
0 * p_j (0, or NaN where p_j is NaN: a NaN or +inf logit, or every logit -inf), as in PyTorch;
a row whose target is out of [0, C) gets NaN loss and gradient. Row offsets are int64 products,
so tensors past 2^31 elements are addressed correctly.

Two kernels per forward, none of them waiting on the host:

1. ``_target_stats_kernel`` (one program): the denominator, W, and a flag that every target is
   ignore_index or in range (which ``raise_for_bad_targets`` turns into a device-side assert, one
   more small launch on CUDA).
2. ``_cross_entropy_kernel`` (one program per row): pass 1 streams the row in blocks with an online
   softmax that keeps a running max and sum per lane; pass 2 walks the blocks back (the last ones
   read are likeliest still in L2), writes dx and sums the smoothing term. A row that fits in one
   block is loaded once and kept in registers.

then, for "sum" and "mean", torch's sum of the row losses (and its cast to a 16-bit logits dtype).
Small batches (up to SMALL_PROBLEM logits, rows of at most SMALL_MAX_C, such as MNIST's 64 x 10)
are launch-bound, so ``_small_cross_entropy_kernel`` does all of it in one program: one pass over
the targets for the statistics, then the rows in tiles of whole rows, summing the loss in row
order (deterministic, as the separate sum is) and storing it in the logits' dtype.

The backward's ``_scale_grad_kernel`` multiplies dx by grad_output in place; its programs read
grad_output from device memory and return at once when it is 1, the usual case. That launch
remains even then: grad_output is a device tensor whose value the host cannot know without a
synchronisation (which would stall the stream and break CUDA-graph capture), and it cannot be
folded into the forward, which runs before grad_output exists. ``loss.backward()`` makes it a
fresh tensor of ones, so nothing marks that case on the host either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference.cross_entropy import raise_for_bad_targets
from kernels.triton.utils import TORCH_TO_TL, device_guard

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
    """(max, log_sum) along AXIS from per-lane (max m, sum s of exp(x - m)), with log sum exp =
    max + log_sum; max is 0 when every logit is -inf (log_sum is then -inf)."""
    row_max = tl.max(m, AXIS)
    row_max = tl.where(row_max == -float("inf"), 0.0, row_max)
    # A lane whose max is -inf adds s * 0: 0 when it has seen only -inf (s = 0), NaN when it has
    # seen a NaN before any number (s = NaN), which must reach the sum.
    return row_max, tl.log(tl.sum(s * tl.exp(m - tl.expand_dims(row_max, AXIS)), AXIS))


@triton.jit
def _gradient_block(x, w, cols, t, row_max, log_sum, p_coef, w_coef, t_coef, out_of_range):
    """dx for one block of a row (see the module docstring), NaN for a row whose target is out of
    range. An ignored row has all coefficients 0, so its dx is 0 * p_j, NaN where p_j is NaN."""
    dx = tl.exp((x - row_max) - log_sum) * p_coef - w * w_coef - tl.where(cols == t, t_coef, 0.0)
    return tl.where(out_of_range, float("nan"), dx)


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
    out_of_range = counted & ~valid
    t = tl.where(valid, t, 0)  # never index out of bounds

    x_t = tl.load(logits_ptr + t).to(COMPUTE)
    w_t = tl.load(weight_ptr + t).to(COMPUTE) if HAS_WEIGHT else 1.0
    scale = 1.0 / tl.load(stats_ptr).to(COMPUTE) if MEAN else 1.0
    eps = tl.full([], LABEL_SMOOTHING, COMPUTE)  # a bare Python float would be rounded to float32
    eps_c = eps / (tl.zeros([], COMPUTE) + C)  # in COMPUTE precision (C may be a constexpr int)
    weight_sum = tl.load(stats_ptr + 1).to(COMPUTE) if HAS_WEIGHT and LABEL_SMOOTHING != 0.0 else C
    # Selected, not multiplied, for the other rows: with "mean" over no counted row, scale is inf.
    p_coef = tl.where(valid, scale * ((1.0 - eps) * w_t + eps_c * weight_sum), 0.0)
    w_coef = tl.where(valid, scale * eps_c, 0.0)
    t_coef = tl.where(valid, scale * (1.0 - eps) * w_t, 0.0)

    cols = tl.arange(0, BLOCK)
    smooth = tl.zeros([BLOCK], COMPUTE)  # sum_c w_c (lse - x_c), lane by lane
    if SINGLE_BLOCK:
        mask = cols < C
        x = tl.load(logits_ptr + cols, mask=mask, other=-float("inf")).to(COMPUTE)
        row_max, log_sum = _logsumexp(x, tl.where(x == -float("inf"), 0.0, 1.0).to(COMPUTE))
        w = 1.0
        if LABEL_SMOOTHING != 0.0:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(COMPUTE)
            smooth += tl.where(mask, w * (log_sum - (x - row_max)), 0.0)
        if COMPUTE_GRAD:
            dx = _gradient_block(x, w, cols, t, row_max, log_sum, p_coef, w_coef, t_coef, out_of_range)
            tl.store(grad_ptr + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK], -float("inf"), COMPUTE)
        s = tl.zeros([BLOCK], COMPUTE)
        for start in range(0, C, BLOCK):
            mask = start + cols < C
            x = tl.load(logits_ptr + start + cols, mask=mask, other=-float("inf"), eviction_policy="evict_last")
            m, s = _online_update(m, s, x.to(COMPUTE))
        row_max, log_sum = _logsumexp(m, s)
        if COMPUTE_GRAD or LABEL_SMOOTHING != 0.0:
            num_blocks = tl.cdiv(C, BLOCK)
            for back in range(0, num_blocks):
                start = (num_blocks - 1 - back) * BLOCK
                mask = start + cols < C
                x = tl.load(logits_ptr + start + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(COMPUTE)
                w = 1.0
                if LABEL_SMOOTHING != 0.0:
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + start + cols, mask=mask, other=0.0).to(COMPUTE)
                    smooth += tl.where(mask, w * (log_sum - (x - row_max)), 0.0)
                if COMPUTE_GRAD:
                    dx = _gradient_block(x, w, start + cols, t, row_max, log_sum, p_coef, w_coef, t_coef,
                                         out_of_range)
                    tl.store(grad_ptr + start + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask,
                             eviction_policy="evict_first")

    loss = (1.0 - eps) * w_t * (log_sum - (x_t - row_max)) + eps_c * tl.sum(smooth, 0)
    row_fill = tl.where(counted, float("nan"), 0.0)  # an out-of-range target: NaN; ignore_index: 0
    # Multiplied, not selected, by the scale: with "mean" over no counted row (scale = inf) the
    # ignored rows' 0 * inf makes the mean NaN, as in PyTorch.
    tl.store(loss_ptr + row, (tl.where(valid, loss, row_fill) * scale).to(loss_ptr.dtype.element_ty))


@triton.jit
def _small_cross_entropy_kernel(
    logits_ptr, target_ptr, weight_ptr, loss_ptr, ok_ptr, grad_ptr,
    N, C, ignore_index,
    LABEL_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole batch in one program: _target_stats_kernel's statistics, then _cross_entropy_kernel's
    rows BLOCK_N at a time, and the REDUCTION ("none", "sum" or "mean") of their losses."""
    denominator, bad = _target_stats(target_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, COMPUTE, BLOCK_N)
    tl.store(ok_ptr, (bad == 0).to(tl.int32))
    scale = 1.0 / denominator if REDUCTION == "mean" else 1.0

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
        x = tl.load(logits_ptr + where, mask=mask, other=-float("inf")).to(COMPUTE)
        row_max, log_sum = _logsumexp(x, tl.where(x == -float("inf"), 0.0, 1.0).to(COMPUTE), 1)
        x_t = tl.sum(tl.where(cols[None, :] == t[:, None], x, 0.0), 1)
        loss = (1.0 - eps) * w_t * (log_sum - (x_t - row_max))
        if LABEL_SMOOTHING != 0.0:
            loss += eps_c * tl.sum(tl.where(mask, w[None, :] * (log_sum[:, None] - (x - row_max[:, None])), 0.0), 1)
        loss = tl.where(valid, loss, row_fill) * scale  # multiplied: 0 * inf makes an empty mean NaN
        if REDUCTION == "none":
            tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_in)
        else:
            total += tl.where(row_in, loss, 0.0)
        if COMPUTE_GRAD:  # _gradient_block on the tile: per-row terms broadcast along the columns
            p_coef = tl.where(valid, scale * ((1.0 - eps) * w_t + eps_c * weight_sum), 0.0)
            w_coef = tl.where(valid, scale * eps_c, 0.0)
            t_coef = tl.where(valid, scale * (1.0 - eps) * w_t, 0.0)
            dx = _gradient_block(x, w[None, :], cols[None, :], t[:, None], row_max[:, None], log_sum[:, None],
                                 p_coef[:, None], w_coef[:, None], t_coef[:, None], (counted & ~valid)[:, None])
            tl.store(grad_ptr + where, dx.to(grad_ptr.dtype.element_ty), mask=mask)
    if REDUCTION != "none":
        tl.store(loss_ptr, tl.sum(total, 0).to(loss_ptr.dtype.element_ty))


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
            label_smoothing: float, reduction: str, grad: torch.Tensor | None) -> torch.Tensor:
    """The loss of contiguous (N, C) logits for ``reduction`` ("none", "sum" or "mean"), in the
    logits' dtype, given a contiguous (N,) integer target and a contiguous (C,) weight or None;
    writes dloss/dlogits into the contiguous ``grad`` when given (it may be ``logits`` itself).
    A target neither ignore_index nor in [0, C) raises ValueError on CPU tensors (the
    interpreter) and fails a device-side assert on CUDA (see ``raise_for_bad_targets``)."""
    N, C = logits.shape
    device = logits.device
    if target.dtype not in (torch.int64, torch.int32):
        target = target.to(torch.int64)
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ok = torch.empty(1, dtype=torch.int32, device=device)
    smoothing = label_smoothing != 0.0
    has_weight = weight is not None
    weight_arg = weight if has_weight else logits  # never read without HAS_WEIGHT
    grad_arg = grad if grad is not None else logits  # never written without COMPUTE_GRAD
    block_c = triton.next_power_of_2(C)
    with device_guard(logits):
        if N and C <= SMALL_MAX_C and N * block_c <= SMALL_PROBLEM:
            loss = torch.empty(N if reduction == "none" else (), dtype=logits.dtype, device=device)
            block_n = min(triton.next_power_of_2(N), max(1, SMALL_TILE // block_c))
            _small_cross_entropy_kernel[(1,)](
                logits, target, weight_arg, loss, ok, grad_arg, N, C, ignore_index,
                LABEL_SMOOTHING=label_smoothing, HAS_WEIGHT=has_weight, REDUCTION=reduction,
                COMPUTE_GRAD=grad is not None, COMPUTE=TORCH_TO_TL[compute], BLOCK_N=block_n, BLOCK_C=block_c,
                num_warps=4)
        else:
            stats = torch.empty(2, dtype=compute, device=device)
            _target_stats_kernel[(1,)](target, weight_arg, stats, ok, N, C, ignore_index,
                                       HAS_WEIGHT=has_weight, SUM_WEIGHT=has_weight and smoothing,
                                       COMPUTE=TORCH_TO_TL[compute], BLOCK=STATS_BLOCK, num_warps=8)
            loss = torch.empty(N, dtype=logits.dtype if reduction == "none" else compute, device=device)
            if N:
                block, num_warps, single = _row_config(C)
                _cross_entropy_kernel[(N,)](
                    logits, target, weight_arg, stats, loss, grad_arg, C, ignore_index,
                    LABEL_SMOOTHING=label_smoothing, HAS_WEIGHT=has_weight, MEAN=reduction == "mean",
                    COMPUTE_GRAD=grad is not None, COMPUTE=TORCH_TO_TL[compute], BLOCK=block, SINGLE_BLOCK=single,
                    num_warps=num_warps,
                )
            if reduction == "mean" and not N:
                loss = torch.full((), float("nan"), dtype=logits.dtype, device=device)
            elif reduction != "none":
                loss = loss.sum().to(logits.dtype)
    raise_for_bad_targets(ok, target, C, ignore_index)
    return loss


def backward(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, C) *= grad_output (a scalar, or one value per row with any stride), in place and
    without a host synchronisation; programs whose factor is 1 return at once (see the module
    docstring for why this launch remains when grad_output is 1)."""
    N, C = grad.shape
    if not N:
        return
    stride = grad_output.stride(0) if grad_output.dim() else 0
    compute = TORCH_TO_TL[torch.float64 if grad.dtype == torch.float64 else torch.float32]
    with device_guard(grad):
        _scale_grad_kernel[(N, triton.cdiv(C, SCALE_BLOCK))](grad, grad_output, stride, C, COMPUTE=compute,
                                                              BLOCK=SCALE_BLOCK, num_warps=8)
