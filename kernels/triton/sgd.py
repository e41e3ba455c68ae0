"""FusedSGD's GPU backend: one launch updates every tensor of a parameter group.

Per element, as torch.optim.SGD computes it (g: gradient, p: parameter, b: momentum buffer, in
float32 also for bfloat16/float16 parameters):

    g = -g                                    if maximize
    g = g + wd * p                            weight decay
    b = g                                     momentum, the tensor's first step (torch clones g)
    b = b * momentum + (1 - dampening) * g    momentum, later steps
    g = g + momentum * b  if nesterov, else b
    p = p - lr * g

The table is kernels/triton/adam.py's TensorTable with the rows of kernels/ops/param_table.py's
SGD_LAYOUT. A row's first_step flag is read by every program of its tensor and cleared on the
device by the last of them (each takes a ticket after reading it, as Adam's step count), so a
CUDA graph captured after the first step replays later steps, and the host never rewrites the
table. Scalars arrive as float64 bits in int64 arguments (one compiled variant for every value);
a tensor lr on the device is read by the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ops.param_table import SGD_LAYOUT, Entry
from kernels.triton.adam import BLOCK, NUM_WARPS, TensorTable, float_bits, scalar
from kernels.triton.utils import device_guard

PARAM = tl.constexpr(SGD_LAYOUT.index("param"))
GRAD = tl.constexpr(SGD_LAYOUT.index("grad"))
MOMENTUM_BUFFER = tl.constexpr(SGD_LAYOUT.index("momentum_buffer"))
FIRST_STEP = tl.constexpr(SGD_LAYOUT.index("first_step"))
NUMEL = tl.constexpr(SGD_LAYOUT.index("numel"))
CHUNKS = tl.constexpr(len(SGD_LAYOUT))
ROW = tl.constexpr(len(SGD_LAYOUT) + 1)


@triton.jit
def _update_block(offsets, mask, param, grad, buffer, first, neg_lr, momentum, one_minus_dampening, weight_decay,
                  COMPUTE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    p = tl.load(param + offsets, mask=mask).to(COMPUTE)
    g = tl.load(grad + offsets, mask=mask).to(COMPUTE)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + p * weight_decay
    if MOMENTUM:
        b = tl.where(first, g, tl.load(buffer + offsets, mask=mask) * momentum + g * one_minus_dampening)
        tl.store(buffer + offsets, b, mask=mask)
        if NESTEROV:
            g = g + b * momentum
        else:
            g = b
    tl.store(param + offsets, (p + g * neg_lr).to(param.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["chunk_size", "lr_bits", "momentum_bits", "dampening_bits", "weight_decay_bits"])
def sgd_kernel(tensors, chunks, tickets, lr_ptr, chunk_size,
               lr_bits: tl.int64, momentum_bits: tl.int64, dampening_bits: tl.int64, weight_decay_bits: tl.int64,
               PARAM_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
               HAS_WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.load(chunks + 2 * chunk)
    start = tl.multiple_of(tl.load(chunks + 2 * chunk + 1), BLOCK)
    entry = tensors + row * ROW
    param = tl.load(entry + PARAM).to(tl.pointer_type(PARAM_DTYPE))
    grad = tl.load(entry + GRAD).to(tl.pointer_type(PARAM_DTYPE))
    buffer = tl.load(entry + MOMENTUM_BUFFER).to(tl.pointer_type(COMPUTE))
    numel = tl.load(entry + NUMEL)
    if ALIGNED:  # every address is 16-byte aligned: vectorised loads and stores
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
        buffer = tl.multiple_of(buffer, 16)
    first = False
    if MOMENTUM:
        first = tl.load(entry + FIRST_STEP) != 0
        # Every thread has read the flag before the ticket is taken (see adam_kernel's step).
        tl.debug_barrier()
        ticket = tl.atomic_add(tickets + row, 1)
        last = ticket == tl.load(entry + CHUNKS) - 1
        tl.store(entry + FIRST_STEP, 0, mask=last & first)
        tl.store(tickets + row, 0, mask=last)

    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    neg_lr = (-lr).to(COMPUTE)
    momentum = momentum_bits.to(tl.int64).to(tl.float64, bitcast=True)
    one_minus_dampening = (1 - dampening_bits.to(tl.int64).to(tl.float64, bitcast=True)).to(COMPUTE)
    weight_decay = weight_decay_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
    momentum = momentum.to(COMPUTE)

    # Whole blocks without a mask (a mask of unknown bound would stop vectorisation), then the tail.
    end = tl.minimum(start + chunk_size, numel)
    full_end = start + (end - start) // BLOCK * BLOCK
    block = tl.arange(0, BLOCK)
    for block_start in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block_start + block, BLOCK), BLOCK)
        _update_block(offsets, None, param, grad, buffer, first, neg_lr, momentum, one_minus_dampening, weight_decay,
                      COMPUTE, HAS_WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE)
    if full_end < end:
        offsets = full_end + block
        _update_block(offsets, offsets < end, param, grad, buffer, first, neg_lr, momentum, one_minus_dampening,
                      weight_decay, COMPUTE, HAS_WEIGHT_DECAY, MOMENTUM, NESTEROV, MAXIMIZE)


def table(entries: list[Entry], device: torch.device) -> TensorTable:
    return TensorTable(entries, device, layout=SGD_LAYOUT, vector_fields=("param", "grad", "momentum_buffer"))


def step(table: TensorTable, lr, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
         maximize: bool) -> None:
    """One SGD step of the table's tensors (torch.optim.SGD's rule)."""
    lr_ptr, lr_bits = scalar(lr, table.device_tensor.device)
    with device_guard(table.device_tensor):
        sgd_kernel[(table.num_chunks,)](
            table.rows, table.chunks, table.tickets, lr_ptr, table.chunk_size,
            lr_bits, float_bits(momentum), float_bits(dampening), float_bits(float(weight_decay)),
            PARAM_DTYPE=table.param_dtype, COMPUTE=table.compute_dtype, LR_ON_DEVICE=lr_ptr is not None,
            HAS_WEIGHT_DECAY=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize,
            ALIGNED=table.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
