"""Adam / AdamW on the GPU: one launch updates every tensor of a parameter group.

Per element, as torch.optim.Adam computes it (g: gradient, p: parameter, t: the tensor's
step after the increment; states in float32 also for bfloat16/float16 parameters):

    g  = -g                                   if maximize
    g  = g + wd * p                           Adam with weight decay
    p  = p * (1 - lr * wd)                    AdamW (decoupled weight decay)
    m  = lerp(m, g, 1 - beta1)                first moment
    v  = v * beta2 + (1 - beta2) * g * g      second moment
    v' = max(v', v)                           amsgrad: the running maximum replaces v below
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The tensors of a group are described by a table in device memory, one int64 row per tensor
(addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq and step, numel, number of
chunks), and a list of chunks (row, first element). Each program updates one chunk of one
tensor, so a launch covers the whole group whatever the sizes of its tensors, and the host
only rebuilds the table when a gradient moves to a new address.

Each tensor's step is a float32 scalar in device memory, so the launch needs no host
synchronisation and can be captured in a CUDA graph. Every program of a tensor reads the old
step and takes a ticket from an atomic counter afterwards; the program holding the last
ticket stores step + 1 and resets the counter, so no program can read an incremented step.

The bias corrections are computed per program in float64, like PyTorch's, from the
hyper-parameters passed as the bits of float64 scalars (Triton passes Python floats as
float32, which would move 1 - beta2 by 1e-5 relative). The kernel avoids small @triton.jit
helpers: the interpreter re-patches triton.language at every nested call (~1 ms each).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from kernels._dispatch import triton_interpreting
from kernels.triton.utils import TORCH_TO_TL, accumulator

# The fields of a table row that kernels/adam.py fills; AdamTable appends the number of
# chunks (the kernel reads the eight by position).
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, NUMEL = range(7)

# Elements per block. The interpreter runs each program in Python, so there small blocks and
# two blocks per chunk keep test tensors spread over several chunks and a partial block.
if triton_interpreting():
    BLOCK, NUM_WARPS, MAX_BLOCKS_PER_CHUNK = 64, 1, 2
else:
    BLOCK, NUM_WARPS, MAX_BLOCKS_PER_CHUNK = 1024, 4, 64
PROGRAMS_PER_SM = 8  # enough resident programs to keep the memory system busy


@triton.jit
def _update_block(offsets, mask, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                  lerp_weight, beta2, one_minus_beta2, weight_decay, decay, eps,
                  inv_bias_correction2_sqrt, neg_step_size,
                  COMPUTE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                  AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr):
    p = tl.load(param + offsets, mask=mask).to(COMPUTE)
    g = tl.load(grad + offsets, mask=mask).to(COMPUTE)
    m = tl.load(exp_avg + offsets, mask=mask)
    v = tl.load(exp_avg_sq + offsets, mask=mask)
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + p * weight_decay
    m = m + (g - m) * lerp_weight
    v = v * beta2 + g * g * one_minus_beta2
    tl.store(exp_avg + offsets, m, mask=mask)
    tl.store(exp_avg_sq + offsets, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(max_exp_avg_sq + offsets, mask=mask), v)
        tl.store(max_exp_avg_sq + offsets, v, mask=mask)
    # Correctly rounded sqrt and division, as PyTorch's (tl.sqrt and / approximate in float32).
    if COMPUTE == tl.float32:
        p = p + neg_step_size * tl.div_rn(m, tl.sqrt_rn(v) * inv_bias_correction2_sqrt + eps)
    else:
        p = p + neg_step_size * (m / (tl.sqrt(v) * inv_bias_correction2_sqrt + eps))
    tl.store(param + offsets, p.to(param.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["chunk_size", "lr_bits", "beta1_bits", "beta2_bits", "eps_bits", "weight_decay_bits"])
def adam_kernel(tensors, chunks, tickets, lr_ptr, chunk_size,
                lr_bits, beta1_bits, beta2_bits, eps_bits, weight_decay_bits,
                PARAM_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.load(chunks + 2 * chunk)
    start = tl.multiple_of(tl.load(chunks + 2 * chunk + 1), BLOCK)
    entry = tensors + row * 8  # PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ, STEP, NUMEL, chunks
    param = tl.load(entry + 0).to(tl.pointer_type(PARAM_DTYPE))
    grad = tl.load(entry + 1).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg = tl.load(entry + 2).to(tl.pointer_type(COMPUTE))
    exp_avg_sq = tl.load(entry + 3).to(tl.pointer_type(COMPUTE))
    max_exp_avg_sq = tl.load(entry + 4).to(tl.pointer_type(COMPUTE))
    step_ptr = tl.load(entry + 5).to(tl.pointer_type(tl.float32))
    numel = tl.load(entry + 6)
    num_chunks = tl.load(entry + 7)
    if ALIGNED:  # every address is 16-byte aligned: vectorised loads and stores
        param = tl.multiple_of(param, 16)
        grad = tl.multiple_of(grad, 16)
        exp_avg = tl.multiple_of(exp_avg, 16)
        exp_avg_sq = tl.multiple_of(exp_avg_sq, 16)
        max_exp_avg_sq = tl.multiple_of(max_exp_avg_sq, 16)

    old_step = tl.load(step_ptr)
    # Every thread of the program has read old_step before the ticket is taken (one thread
    # takes it; its acq_rel ordering covers the reads of the others through the barrier).
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets + row, 1)
    last = ticket == num_chunks - 1
    tl.store(step_ptr, old_step + 1, mask=last)
    tl.store(tickets + row, 0, mask=last)

    # The scalars of the update, in float64 like PyTorch, rounded once to the compute dtype.
    # Each arrives as the bits of a float64 (an int32 argument when they fit in one: 0.0).
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    beta2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)
    weight_decay = weight_decay_bits.to(tl.int64).to(tl.float64, bitcast=True)
    # beta ** step by repeated squaring (exact up to float64 rounding, as the host's pow)
    beta1_power, beta2_power = beta1 * 0 + 1, beta2 * 0 + 1
    beta1_square, beta2_square = beta1, beta2
    n = old_step.to(tl.int64) + 1
    while n > 0:
        odd = (n & 1) != 0
        beta1_power = tl.where(odd, beta1_power * beta1_square, beta1_power)
        beta2_power = tl.where(odd, beta2_power * beta2_square, beta2_power)
        beta1_square, beta2_square = beta1_square * beta1_square, beta2_square * beta2_square
        n = n >> 1
    neg_step_size = (-(lr / (1 - beta1_power))).to(COMPUTE)
    inv_bias_correction2_sqrt = (1 / tl.sqrt(1 - beta2_power)).to(COMPUTE)
    lerp_weight = (1 - beta1).to(COMPUTE)
    one_minus_beta2 = (1 - beta2).to(COMPUTE)
    decay = (1 - lr * weight_decay).to(COMPUTE)
    beta2 = beta2.to(COMPUTE)
    weight_decay = weight_decay.to(COMPUTE)

    # Whole blocks without a mask (a mask of unknown bound would stop vectorisation), then the tail.
    end = tl.minimum(start + chunk_size, numel)
    full_end = start + (end - start) // BLOCK * BLOCK
    block = tl.arange(0, BLOCK)
    for block_start in range(start, full_end, BLOCK):
        offsets = tl.max_contiguous(tl.multiple_of(block_start + block, BLOCK), BLOCK)
        _update_block(offsets, None, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      lerp_weight, beta2, one_minus_beta2, weight_decay, decay, eps,
                      inv_bias_correction2_sqrt, neg_step_size,
                      COMPUTE, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE)
    if full_end < end:
        offsets = full_end + block
        _update_block(offsets, offsets < end, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      lerp_weight, beta2, one_minus_beta2, weight_decay, decay, eps,
                      inv_bias_correction2_sqrt, neg_step_size,
                      COMPUTE, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE)


_SM_COUNT: dict[int, int] = {}


def _chunk_size(total: int, device: torch.device) -> int:
    """Elements per program: whole blocks, small enough to give every SM several programs
    (the MNIST parameters need ~100 programs), large enough that big groups do not pay for
    a table lookup and the bias corrections per block."""
    if device.type != "cuda":
        return BLOCK * MAX_BLOCKS_PER_CHUNK
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    blocks = triton.cdiv(total, _SM_COUNT[index] * PROGRAMS_PER_SM * BLOCK)
    return BLOCK * min(MAX_BLOCKS_PER_CHUNK, triton.next_power_of_2(blocks))


class AdamTable:
    """One launch's worth of tensors (same parameter dtype) in device memory.

    ``rows`` holds, per tensor, the addresses of param, grad, exp_avg, exp_avg_sq,
    max_exp_avg_sq (0 without amsgrad) and step, then numel. A table is never modified after
    it is built, so a CUDA graph that captured a launch keeps reading valid rows. The host
    copy is kept too: a table built during a capture is copied by a graph node that reads it
    at every replay."""

    def __init__(self, rows: list[tuple[int, ...]], param_dtype: torch.dtype, device: torch.device):
        chunk_size = _chunk_size(sum(r[NUMEL] for r in rows), device)
        table, chunks = [], []
        for index, r in enumerate(rows):
            num_chunks = max(1, triton.cdiv(r[NUMEL], chunk_size))  # an empty tensor still counts its step
            table.extend(r)
            table.append(num_chunks)
            for c in range(num_chunks):
                chunks.extend((index, c * chunk_size))
        self.host = torch.tensor(table + chunks, dtype=torch.int64)
        device_copy = self.host.to(device, non_blocking=True)
        self.rows, self.chunks = device_copy[: len(table)], device_copy[len(table):]
        self.tickets = torch.zeros(len(rows), dtype=torch.int32, device=device)
        self.num_chunks = len(chunks) // 2
        self.chunk_size = chunk_size
        self.param_dtype = TORCH_TO_TL[param_dtype]
        self.compute_dtype = accumulator(param_dtype)
        vector_addresses = [r[f] for r in rows for f in (PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ)]
        self.aligned = all(a % 16 == 0 for a in vector_addresses)


_pack_float64 = struct.Struct("<d").pack
_unpack_int64 = struct.Struct("<q").unpack


def float_bits(x: float) -> int:
    """The bits of ``x`` as a float64, as an int (how the kernel receives its scalars)."""
    return _unpack_int64(_pack_float64(x))[0]


def adam_step(table: AdamTable, lr: float | torch.Tensor, bits: tuple[int, int, int, int, int], *,
              weight_decay: bool, decoupled: bool, amsgrad: bool, maximize: bool) -> None:
    """One step for the tensors of ``table``. ``bits`` are float_bits of (lr, beta1, beta2,
    eps, weight_decay); a tensor ``lr`` on the parameters' device is read by the kernel.
    ``weight_decay`` says whether the weight decay is non-zero."""
    lr_on_device = isinstance(lr, torch.Tensor)
    adam_kernel[(table.num_chunks,)](
        table.rows, table.chunks, table.tickets, lr if lr_on_device else None, table.chunk_size, *bits,
        PARAM_DTYPE=table.param_dtype, COMPUTE=table.compute_dtype, LR_ON_DEVICE=lr_on_device,
        HAS_WEIGHT_DECAY=weight_decay, DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        ALIGNED=table.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
