"""Softmax cross-entropy in plain PyTorch, with the functions and signatures of
kernels/triton/cross_entropy.py and kernels/cpu/cross_entropy.py (see kernels/ops/cross_entropy.py
for the math). It also holds what every backend shares: the reduction names, and how a target
out of range is reported.

``gradient`` is written in differentiable ops, so it also serves as the backward of every
backend when a graph of the gradient is being built (double backward).
"""
from __future__ import annotations

import torch

# F.cross_entropy's reductions. The C++ kernels restate these names (csrc/cross_entropy.cpp's
# parse_reduction; a test compares the two).
REDUCTIONS = ("none", "sum", "mean")


def forward(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
            label_smoothing: float, reduction: str, grad: torch.Tensor | None) -> torch.Tensor:
    """The loss of (N, C) logits for ``reduction``, in the logits' dtype; writes dloss/dlogits
    into ``grad`` when given (it may be ``logits`` itself). Raises for a target neither
    ignore_index nor in [0, C) (see ``raise_for_bad_targets``)."""
    loss, dx, ok = _loss_and_gradient(logits, target, weight, ignore_index, label_smoothing, reduction)
    raise_for_bad_targets(ok, target, logits.shape[1], ignore_index)
    if grad is not None:
        grad.copy_(dx)
    return loss.to(logits.dtype)


def backward(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad (N, C) *= grad_output (a scalar, or one value per row), in place."""
    grad.mul_(grad_output.view(-1, 1) if grad_output.dim() else grad_output)


def gradient(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
             label_smoothing: float, reduction: str, grad_output: torch.Tensor) -> torch.Tensor:
    """dloss/dlogits times grad_output, in differentiable ops: differentiating it again gives
    the loss's second derivatives (and its derivative with respect to grad_output)."""
    _, dx, ok = _loss_and_gradient(logits, target, weight, ignore_index, label_smoothing, reduction)
    raise_for_bad_targets(ok, target, logits.shape[1], ignore_index)
    return (dx * (grad_output.view(-1, 1) if grad_output.dim() else grad_output)).to(logits.dtype)


def _loss_and_gradient(logits, target, weight, ignore_index, label_smoothing, reduction):
    """(loss, dloss/dlogits, flag that every target was valid), computed in float32 (float64 for
    float64 logits) from log_softmax, as PyTorch does. A row whose target is out of range gets
    NaN loss and gradient. An ignored row has loss 0 and gradient 0 * p: 0, or NaN where its
    softmax p is NaN (a NaN or +inf logit, or every logit -inf), as PyTorch's gradient is."""
    N, C = logits.shape
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    counted = target != ignore_index
    valid = counted & (target >= 0) & (target < C)
    t = torch.where(valid, target, 0).long()
    w = torch.ones(C, dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
    w_t = torch.where(valid, w[t], 0)  # 0: an ignored row's gradient is 0 * p
    eps = label_smoothing
    log_p = torch.log_softmax(x, 1)
    nll = -log_p.gather(1, t[:, None])[:, 0]
    smooth = -(log_p * w).sum(1)
    denominator = w_t.sum()
    scale = 1 / denominator if reduction == "mean" else torch.ones((), dtype=x.dtype, device=x.device)
    out_of_range = (counted & ~valid)[:, None]
    rows = torch.where(valid, (1 - eps) * w_t * nll + eps / C * smooth, torch.where(counted, torch.nan, 0.0))
    p_coef = torch.where(valid, scale * ((1 - eps) * w_t + eps / C * w.sum()), 0)
    dx = log_p.exp() * p_coef[:, None] - torch.where(valid, scale * eps / C, 0)[:, None] * w
    dx = dx - torch.nn.functional.one_hot(t, C).to(x.dtype) * torch.where(valid, scale * (1 - eps) * w_t, 0)[:, None]
    dx = torch.where(out_of_range, torch.nan, dx)
    loss = rows if reduction == "none" else rows.sum() * (scale if reduction == "mean" else 1)
    return loss, dx, ~out_of_range.any()


def bad_target_error(target: torch.Tensor, row: int, C: int, ignore_index: int) -> ValueError:
    return ValueError(f"cross_entropy: target[{row}] = {int(target[row])} is out of range for {C} classes "
                      f"(valid: 0..{C - 1}, or ignore_index={ignore_index})")


def first_bad_target_error(target: torch.Tensor, C: int, ignore_index: int) -> ValueError | None:
    """The error naming the first of the (rows,) targets that is neither ignore_index nor in
    [0, C), or None where there is none."""
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    return bad_target_error(target, int(bad.nonzero()[0, 0]), C, ignore_index) if bad.any() else None


def raise_for_bad_targets(ok: torch.Tensor, target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Raise for a target that is neither ignore_index nor in [0, C), given the one-element flag
    ``ok`` that none is: at once (ValueError naming the row) for CPU tensors; on a GPU, where
    reading the flag would synchronise with the host, as a device-side assert on the stream
    (``torch._assert_async``), which fails the next synchronising call."""
    if ok.device.type == "cpu":
        if not ok.item():
            raise first_bad_target_error(target, C, ignore_index)
    else:
        torch._assert_async(ok.reshape(()), f"cross_entropy: a target is out of range [0, {C}) and is not ignore_index")
