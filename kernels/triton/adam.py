"""FusedAdam's GPU backend: one launch updates every tensor of a parameter group.

Per element, as torch.optim.Adam computes it (g: gradient, p: parameter, t: the tensor's step
after the increment; states in float32 also for bfloat16/float16 parameters):

    g  = -g                                   if maximize
    g  = g + wd * p                           Adam with weight decay
    p  = p * (1 - lr * wd)                    AdamW (decoupled weight decay)
    m  = lerp(m, g, 1 - beta1)                first moment, PyTorch's two-sided lerp (from m for a
                                              weight below 0.5, from g above: beta1 = 0 gives m = g)
    v  = v * beta2 + (1 - beta2) * g * g      second moment
    v' = max(v', v)                           amsgrad: the running maximum replaces v below
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

The tensors of a group are described by a table in device memory (``TensorTable``, shared with
kernels/triton/sgd.py): one int64 row per tensor with the fields of kernels/ops/param_table.py's
layout followed by the tensor's number of chunks, and a list of chunks (row, first element). Each
program updates one chunk of one tensor, so a launch covers the whole group whatever the sizes of
its tensors. The rows are copied to the device from pinned memory, and only when the table is
built (never during a CUDA graph capture: kernels/ops/param_table.py refuses that).

Each tensor's step is a float32 scalar in device memory, so the launch needs no host
synchronisation and can be captured in a CUDA graph. Every program of a tensor reads the old
step and takes a ticket from an atomic counter afterwards; the program holding the last
ticket stores step + 1 and resets the counter, so no program can read an incremented step.

The bias corrections are computed per program in float64, like PyTorch's, from the
hyper-parameters passed as the bits of float64 scalars in int64 arguments (Triton passes Python
floats as float32, which would move 1 - beta2 by 1e-5 relative; the int64 annotation keeps one
compiled variant for every value, 0.0 included). A tensor lr or tensor betas on the device are
read by the kernel instead, without a host synchronisation. The kernel avoids small @triton.jit
helpers: the interpreter re-patches triton.language at every nested call (~1 ms each).
"""
from __future__ import annotations

import functools
import struct

import torch
import triton
import triton.language as tl

from kernels._dispatch import triton_interpreting
from kernels.ops.param_table import ADAM_LAYOUT, Entry
from kernels.triton.utils import TORCH_TO_TL, accumulator, device_guard

# Positions of the fields in a table row (ADAM_LAYOUT, then the tensor's number of chunks).
PARAM = tl.constexpr(ADAM_LAYOUT.index("param"))
GRAD = tl.constexpr(ADAM_LAYOUT.index("grad"))
EXP_AVG = tl.constexpr(ADAM_LAYOUT.index("exp_avg"))
EXP_AVG_SQ = tl.constexpr(ADAM_LAYOUT.index("exp_avg_sq"))
MAX_EXP_AVG_SQ = tl.constexpr(ADAM_LAYOUT.index("max_exp_avg_sq"))
STEP = tl.constexpr(ADAM_LAYOUT.index("step"))
NUMEL = tl.constexpr(ADAM_LAYOUT.index("numel"))
CHUNKS = tl.constexpr(len(ADAM_LAYOUT))
ROW = tl.constexpr(len(ADAM_LAYOUT) + 1)

# Elements per block. The interpreter runs each program in Python, so there small blocks and
# two blocks per chunk keep test tensors spread over several chunks and a partial block.
if triton_interpreting():
    BLOCK, NUM_WARPS, MAX_BLOCKS_PER_CHUNK = 64, 1, 2
else:
    BLOCK, NUM_WARPS, MAX_BLOCKS_PER_CHUNK = 1024, 4, 64
PROGRAMS_PER_SM = 8  # enough resident programs to keep the memory system busy


@triton.jit
def _update_block(offsets, mask, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                  lerp_coeff, lerp_from_m, beta2, one_minus_beta2, weight_decay, decay, eps,
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
    m = tl.where(lerp_from_m, m, g) + lerp_coeff * (g - m)
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
def adam_kernel(tensors, chunks, tickets, lr_ptr, beta1_ptr, beta2_ptr, chunk_size,
                lr_bits: tl.int64, beta1_bits: tl.int64, beta2_bits: tl.int64, eps_bits: tl.int64,
                weight_decay_bits: tl.int64,
                PARAM_DTYPE: tl.constexpr, COMPUTE: tl.constexpr, LR_ON_DEVICE: tl.constexpr,
                BETAS_ON_DEVICE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr,
                AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    row = tl.load(chunks + 2 * chunk)
    start = tl.multiple_of(tl.load(chunks + 2 * chunk + 1), BLOCK)
    entry = tensors + row * ROW
    param = tl.load(entry + PARAM).to(tl.pointer_type(PARAM_DTYPE))
    grad = tl.load(entry + GRAD).to(tl.pointer_type(PARAM_DTYPE))
    exp_avg = tl.load(entry + EXP_AVG).to(tl.pointer_type(COMPUTE))
    exp_avg_sq = tl.load(entry + EXP_AVG_SQ).to(tl.pointer_type(COMPUTE))
    max_exp_avg_sq = tl.load(entry + MAX_EXP_AVG_SQ).to(tl.pointer_type(COMPUTE))
    step_ptr = tl.load(entry + STEP).to(tl.pointer_type(tl.float32))
    numel = tl.load(entry + NUMEL)
    num_chunks = tl.load(entry + CHUNKS)
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
    # Each arrives as the bits of a float64 (the interpreter may hand a small value as int32),
    # or from device memory.
    if LR_ON_DEVICE:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = lr_bits.to(tl.int64).to(tl.float64, bitcast=True)
    if BETAS_ON_DEVICE:
        beta1 = tl.load(beta1_ptr).to(tl.float64)
        beta2 = tl.load(beta2_ptr).to(tl.float64)
    else:
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
    # PyTorch's lerp(m, g, w): m + w (g - m) when |w| < 0.5, else g + (w - 1) (g - m), w in COMPUTE
    lerp_weight = (1 - beta1).to(COMPUTE)
    lerp_from_m = tl.abs(lerp_weight) < 0.5
    lerp_coeff = tl.where(lerp_from_m, lerp_weight, lerp_weight - 1)
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
                      lerp_coeff, lerp_from_m, beta2, one_minus_beta2, weight_decay, decay, eps,
                      inv_bias_correction2_sqrt, neg_step_size,
                      COMPUTE, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE)
    if full_end < end:
        offsets = full_end + block
        _update_block(offsets, offsets < end, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                      lerp_coeff, lerp_from_m, beta2, one_minus_beta2, weight_decay, decay, eps,
                      inv_bias_correction2_sqrt, neg_step_size,
                      COMPUTE, HAS_WEIGHT_DECAY, DECOUPLED, AMSGRAD, MAXIMIZE)


_SM_COUNT: dict[int, int] = {}


def _chunk_size(total: int, device: torch.device) -> int:
    """Elements per program: whole blocks, small enough to give every SM several programs
    (the MNIST parameters need ~100 programs), large enough that big groups do not pay for
    a table lookup and the scalar set-up per block."""
    if device.type != "cuda":
        return BLOCK * MAX_BLOCKS_PER_CHUNK
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    blocks = triton.cdiv(total, _SM_COUNT[index] * PROGRAMS_PER_SM * BLOCK)
    return BLOCK * min(MAX_BLOCKS_PER_CHUNK, triton.next_power_of_2(blocks))


class TensorTable:
    """One launch's worth of tensors (one parameter dtype) in device memory: the entries' rows
    (each followed by its number of chunks) and the chunks (row, first element). Built once per
    table; the kernels write only their tickets and flags in it, so a CUDA graph that captured a
    launch keeps reading valid rows. The rows go to the device from pinned host memory."""

    def __init__(self, entries: list[Entry], device: torch.device, *, vector_fields: tuple[str, ...],
                 layout: tuple[str, ...]):
        numel = layout.index("numel")
        chunk_size = _chunk_size(sum(e.row[numel] for e in entries), device)
        table, chunks = [], []
        for index, e in enumerate(entries):
            num_chunks = max(1, triton.cdiv(e.row[numel], chunk_size))  # an empty tensor still counts its step
            table.extend(e.row)
            table.append(num_chunks)
            for c in range(num_chunks):
                chunks.extend((index, c * chunk_size))
        host = torch.tensor(table + chunks, dtype=torch.int64)
        if device.type == "cuda":
            host = host.pin_memory()
        self.host = host  # kept until the table goes: the copy below may still be reading it
        device_copy = host.to(device, non_blocking=True)
        self.rows, self.chunks = device_copy[: len(table)], device_copy[len(table):]
        self.tickets = torch.zeros(len(entries), dtype=torch.int32, device=device)
        self.num_chunks = len(chunks) // 2
        self.chunk_size = chunk_size
        param = entries[0].tensors["param"]
        self.param_dtype = TORCH_TO_TL[param.dtype]
        self.compute_dtype = accumulator(param.dtype)
        self.device_tensor = param  # the device the launch goes to
        fields = [layout.index(f) for f in vector_fields]
        self.aligned = all(e.row[f] % 16 == 0 for e in entries for f in fields)


def table(entries: list[Entry], device: torch.device) -> TensorTable:
    return TensorTable(entries, device, layout=ADAM_LAYOUT,
                       vector_fields=("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"))


_pack_float64 = struct.Struct("<d").pack
_unpack_int64 = struct.Struct("<q").unpack


@functools.lru_cache(maxsize=1024)
def float_bits(x: float) -> int:
    """The bits of ``x`` as a float64, as an int (how the kernels receive their scalars)."""
    return _unpack_int64(_pack_float64(float(x)))[0]


def scalar(x, device: torch.device) -> tuple[torch.Tensor | None, int]:
    """(pointer, bits) of a hyper-parameter: a tensor on ``device`` goes by pointer (read by the
    kernel, no host synchronisation), anything else by the bits of its float64 value."""
    if isinstance(x, torch.Tensor) and x.device == device:
        return x, 0
    return None, float_bits(float(x))


def step(table: TensorTable, lr, beta1, beta2, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
         maximize: bool) -> None:
    """One Adam (AdamW with ``decoupled``) step of the table's tensors."""
    device = table.device_tensor.device
    lr_ptr, lr_bits = scalar(lr, device)
    beta1_ptr, beta1_bits = scalar(beta1, device)
    beta2_ptr, beta2_bits = scalar(beta2, device)
    betas_on_device = beta1_ptr is not None and beta2_ptr is not None
    if not betas_on_device:  # one on the device, one not: both by value
        beta1_ptr = beta2_ptr = None
        beta1_bits, beta2_bits = float_bits(float(beta1)), float_bits(float(beta2))
    with device_guard(table.device_tensor):
        adam_kernel[(table.num_chunks,)](
            table.rows, table.chunks, table.tickets, lr_ptr, beta1_ptr, beta2_ptr, table.chunk_size,
            lr_bits, beta1_bits, beta2_bits, float_bits(eps), float_bits(weight_decay),
            PARAM_DTYPE=table.param_dtype, COMPUTE=table.compute_dtype, LR_ON_DEVICE=lr_ptr is not None,
            BETAS_ON_DEVICE=betas_on_device, HAS_WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled,
            AMSGRAD=amsgrad, MAXIMIZE=maximize, ALIGNED=table.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
