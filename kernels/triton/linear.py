"""Fused Linear + bias + activation on the GPU: y = act(x W^T + b) and its backward.

With x (M, K), W (N, K), b (N), z = x W^T + b and y = act(z)::

    forward    y  = act(x W^T + b)            one GEMM; bias and activation in its epilogue
    backward   dz = dy * act'(y)              relu: y <= 0 ? 0 : dy, sigmoid: y (1 - y), tanh: 1 - y^2
               dx = dz W                      one GEMM, dz formed as its A operand is loaded
               dW = dz^T x,  db = sum_m dz    one GEMM, dz formed the same way; the programs of
                                              the first column block also sum db from the loaded dz

so the backward never materialises dz, and the forward saves only y (activation "none" saves
nothing). The activations treat NaN and +-inf as torch.relu/sigmoid/tanh and relu's backward as
torch's threshold_backward (a NaN output passes its gradient).

All three GEMMs are one call, ``gemm(a, b, c, ...)``: C = epilogue(prologue(A) @ B) with A and B
given as views of the stored tensors (``weight.t()``, ``dy.t()``), so transposes and
non-contiguous inputs cost no copies. It runs one of two forms of the kernel, which take the same
arguments:

* ``matmul``, the generic kernel: any strides; offsets in int64, so operands of 2^31 elements
  and more are addressed correctly.
* ``matmul_tma``, for large bf16/fp16 GEMMs on chips with the tensor copy engine (compute
  capability 9+) whose shared memory holds its tiles: every tile of A, Y, B and C moves through a
  TMA descriptor (partial tiles are zero-filled or clipped by the hardware), an operand stored
  transposed is read as stored and transposed on chip, and the grid is persistent, one program per
  multiprocessor walking the output tiles in grouped order. It takes what TMA can describe: rows of
  unit stride that do not overlap, 16-byte-aligned starts and row strides.

Matmul precision follows PyTorch: fp32 inputs use full-precision ``ieee`` dots unless PyTorch's
settings allow TF32 (``kernels.triton.utils.dot_precision``); bf16/fp16 use the tensor cores and
accumulate in fp32 (fp64, which exists for the interpreter's exact tests, accumulates in fp64).

Large GEMMs are autotuned over tile tables, one per kernel form, operand width and prologue, less
the tiles whose shared memory (``shared_memory``) exceeds what the chip gives a block. The
autotuner remembers its choice per shape with M and K rounded up to powers of two (the batch is
one of them), so a new batch size does not re-time every config; a shape first seen inside a CUDA
graph capture raises instead of timing configs there. Small problems skip the autotuner.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.triton.utils import accumulator, autotune, device_guard, dot_precision

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), measured on the H100. The generic kernel's:
# large ones for big GEMMs (those TMA cannot take), mid ones for mid shapes, small-M ones for
# batch-64 layers. The interpreter runs the first tile of a table.
_TILES = [
    (128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (256, 128, 64, 4, 8),
    (128, 128, 64, 3, 8), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 64, 32, 5, 2), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 64, 128, 3, 4), (16, 128, 64, 4, 4),
]
HOPPER_SHARED_MEMORY = 227 * 1024  # what one block may take on sm_90 (H100, H200)
# Tiles that spill registers on sm_90 (tests/hopper_compile.py), keyed like GENERIC_TILES: fp32
# operands take the FMA path and hold fp32 operand tiles in registers; the activation-gradient
# prologue (GRAD_OF) adds the fp32 dz.
_SPILLS = {(2, False): set(), (2, True): {(128, 128, 64, 4, 4)},
           (4, False): {(128, 128, 32, 4, 4)}, (4, True): {(128, 128, 32, 4, 4)}}
# The TMA kernel's bf16/fp16 tiles, keyed by whether A has the prologue: the pipeline's stages of
# A (and Y) and B tiles plus one C tile for the TMA store (128x256 with 3 stages takes 213 KB of
# sm_90's 227 KB); with the prologue, fewer stages or smaller tiles.
TMA_TILES = {
    False: [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 5, 4), (256, 128, 64, 3, 8),
            (64, 256, 64, 4, 4), (128, 128, 128, 3, 8)],
    True: [(128, 256, 32, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 8), (256, 128, 32, 3, 8),
           (64, 256, 64, 4, 4), (128, 128, 128, 2, 8)],
}

# Problems up to this many multiply-adds skip the autotuner: at MNIST sizes its dispatch costs
# more than the GEMM, and one small tile fits them all (within 99 KB of shared memory even in
# fp32 with the prologue).
SMALL_PROBLEM = 1 << 23
SMALL_TILE = (32, 64, 64, 3, 4)
GROUP_M = 8
# Shared memory beyond the tiles: the TMA kernel's barriers, the row sums' reduction (bytes).
_SHARED_SCRATCH = 2048


def shared_memory(tile, element_size: int, prologue: bool, tma: bool) -> int:
    """Shared memory a tile needs, in bytes (an upper bound, checked against the compiler's by
    tests/hopper_compile.py): a buffer of the A tile (and of the Y tile with the prologue) and of
    the B tile per pipeline stage, and for the TMA kernel the C tile its store goes through."""
    bm, bn, bk, stages, _ = tile
    need = stages * (bm * bk * (2 if prologue else 1) + bk * bn) * element_size + _SHARED_SCRATCH
    return need + (bm * bn * element_size if tma else 0)


# The generic kernel's tables, keyed by (bytes per operand element, whether A has the prologue):
# the tiles that fit sm_90's shared memory and do not spill there.
GENERIC_TILES = {(size, prologue): [t for t in _TILES if t not in spills
                                    and shared_memory(t, size, prologue, False) <= HOPPER_SHARED_MEMORY]
                 for (size, prologue), spills in _SPILLS.items()}


@functools.cache
def _chip(index: int) -> tuple[int, int, int]:
    """(compute capability major, shared memory a block can opt in to, multiprocessors) of GPU ``index``."""
    p = torch.cuda.get_device_properties(index)
    return p.major, p.shared_memory_per_block_optin, p.multi_processor_count


def fitting_tiles(tma: bool, dtype: torch.dtype, prologue: bool, device: torch.device) -> list[tuple]:
    """The tiles of a table whose shared memory fits a block of ``device``'s chip (all of them
    on a CPU, where the interpreter runs them). Where no tile of the generic kernel's table fits
    (fp32 with the prologue on a chip with 99 KB), the small-problem tile, which does. float64
    (for the interpreter's tests) takes fp32's table, less what its wider elements overflow."""
    tiles = TMA_TILES[prologue] if tma else GENERIC_TILES[(min(dtype.itemsize, 4), prologue)]
    if device.type != "cuda":
        return tiles
    limit = _chip(device.index)[1]
    fitting = [t for t in tiles if shared_memory(t, dtype.itemsize, prologue, tma) <= limit]
    return fitting if fitting or tma else [SMALL_TILE]


def _config(tile, pre_hook=None) -> triton.Config:
    bm, bn, bk, stages, warps = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": GROUP_M},
                         num_stages=stages, num_warps=warps, pre_hook=pre_hook)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """act(z) as torch computes it: relu keeps NaN (a select, where max would drop it), sigmoid and
    tanh saturate at +-inf."""
    if ACTIVATION == "relu":
        z = tl.where(z < 0.0, 0.0, z)
    elif ACTIVATION == "sigmoid":
        z = tl.sigmoid(z)
    elif ACTIVATION == "tanh":
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return z


@triton.jit
def _activation_grad(dy, y, ACTIVATION: tl.constexpr):
    """dz = dy * act'(z), written with the activation's output y; relu as torch's threshold_backward."""
    if ACTIVATION == "relu":
        dy = tl.where(y <= 0.0, 0.0, dy)
    elif ACTIVATION == "sigmoid":
        dy = dy * y * (1.0 - y)
    elif ACTIVATION == "tanh":
        dy = dy * (1.0 - y * y)
    return dy


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile number ``tile`` in grouped order: GROUP_M row
    blocks take each column block in turn, so the tiles that share a block of B run together
    while it is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = tile // num_pid_in_group * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fused_matmul_kernel(
    a_ptr, y_ptr, b_ptr, c_ptr, bias_ptr, row_sum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_ym, stride_yk, stride_bk, stride_bn, stride_cm,
    ACTIVATION: tl.constexpr,  # epilogue: C = act(A' B + bias)
    GRAD_OF: tl.constexpr,  # prologue: A' = A * act'(Y) for this activation, Y laid out like A ("none": A' = A)
    HAS_BIAS: tl.constexpr,
    ROW_SUM: tl.constexpr,  # also row_sum[m] = sum_k A'[m, k], by the programs of column block 0
    STORE_C: tl.constexpr,  # False: only the row sums (a grid of one column block)
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = act(A' @ B + bias) with A' = prologue(A) (M, K), B (K, N), C with unit column
    stride; fp32/fp64 accumulation."""
    pid = tl.program_id(0)
    if STORE_C:
        pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    else:
        pid_m = pid
        pid_n = 0

    # Rows and columns wrap around (modulo) instead of being masked: loads stay in bounds and
    # unmasked along M and N; the wrapped duplicates are never stored. Index times stride is
    # formed in int64: an operand of 2^31 elements or more overflows int32 offsets.
    offs_m = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    rows_k = offs_k.to(tl.int64)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + rows_k[None, :] * stride_ak
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + rows_k[None, :] * stride_yk
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    y_step = tl.cast(stride_yk, tl.int64) * BLOCK_K
    if STORE_C:
        offs_n = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        b_ptrs = b_ptr + rows_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_in = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
        if GRAD_OF != "none":
            y = tl.load(y_ptrs, mask=k_in[None, :], other=0.0)
            a = _activation_grad(a.to(ACC_DTYPE), y.to(ACC_DTYPE), GRAD_OF)
        if ROW_SUM:
            if pid_n == 0:
                row_sum += tl.sum(a.to(ACC_DTYPE), axis=1)
        if STORE_C:
            b = tl.load(b_ptrs, mask=k_in[:, None], other=0.0)
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            b_ptrs += b_step
        a_ptrs += a_step
        y_ptrs += y_step

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if ROW_SUM:
        if pid_n == 0:
            tl.store(row_sum_ptr + offs_cm, row_sum.to(row_sum_ptr.dtype.element_ty), mask=offs_cm < M)
    if STORE_C:
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_cn, mask=offs_cn < N, other=0.0)
            acc += bias.to(ACC_DTYPE)[None, :]
        acc = _activate(acc, ACTIVATION)
        c_ptrs = c_ptr + offs_cm.to(tl.int64)[:, None] * stride_cm + offs_cn[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


@triton.jit
def _fused_matmul_tma_kernel(
    a_desc, y_desc, b_desc, c_desc, bias_ptr, row_sum_ptr, M, N, K,
    A_TRANSPOSED: tl.constexpr,  # a_desc and y_desc describe A^T (K, M), not A (M, K)
    B_TRANSPOSED: tl.constexpr,  # b_desc describes B^T (N, K), not B (K, N)
    ACTIVATION: tl.constexpr, GRAD_OF: tl.constexpr, HAS_BIAS: tl.constexpr, ROW_SUM: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """_fused_matmul_kernel's C = act(A' @ B + bias) and row sums of A', with every tile of A, Y,
    B and C moved by TMA; NUM_PROGRAMS programs share the output tiles round-robin. Tiles are
    addressed by coordinates, so no offset here grows with the tensors' size."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # flatten: the compiler pipelines the loads of a program's next tile under this one's epilogue.
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            k0 = ki * BLOCK_K
            a = a_desc.load([k0, m0]).T if A_TRANSPOSED else a_desc.load([m0, k0])
            dz = a.to(tl.float32)
            if GRAD_OF != "none":
                y = y_desc.load([k0, m0]).T if A_TRANSPOSED else y_desc.load([m0, k0])
                dz = _activation_grad(dz, y.to(tl.float32), GRAD_OF)
                a = dz.to(a.dtype)
            if ROW_SUM:  # from the fp32 dz, before it is rounded for the dot
                row_sum += tl.sum(dz, axis=1)
            b = b_desc.load([n0, k0]).T if B_TRANSPOSED else b_desc.load([k0, n0])
            acc = tl.dot(a, b, acc)
        if ROW_SUM:
            if pid_n == 0:
                offs_m = m0 + tl.arange(0, BLOCK_M)
                tl.store(row_sum_ptr + offs_m, row_sum.to(row_sum_ptr.dtype.element_ty), mask=offs_m < M)
        if HAS_BIAS:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACTIVATION)
        c_desc.store([m0, n0], acc.to(c_desc.dtype))


# ---------------------------------------------------------------------------------------------
# Autotuning: one autotuner per kernel form, dtype, prologue, device and (M, K) bucket.

# What each form's autotuner tells shapes apart by, within one bucket.
_GENERIC_KEY = ("N", "stride_am", "stride_ak", "stride_bk", "stride_bn", "ACTIVATION", "GRAD_OF", "HAS_BIAS",
                "ROW_SUM", "STORE_C")
_TMA_KEY = ("N", "A_TRANSPOSED", "B_TRANSPOSED", "ACTIVATION", "GRAD_OF", "HAS_BIAS", "ROW_SUM")
_tuned_keys: set[tuple] = set()  # the keys each autotuner has already timed


def bucket(n: int) -> int:
    """The autotuner's bucket of a GEMM dimension: the next power of two."""
    return triton.next_power_of_2(n)


@functools.cache
def _autotuned(tma: bool, dtype: torch.dtype, prologue: bool, device: torch.device, m_bucket: int, k_bucket: int):
    """The autotuner for one form, dtype, prologue and device, over the tiles that fit the chip,
    for the GEMMs whose M and K fall in these buckets (each autotuner keeps its own choices)."""
    tiles = fitting_tiles(tma, dtype, prologue, device)
    if tma:
        return autotune([_config(t, pre_hook=_set_tma_blocks) for t in tiles], key=list(_TMA_KEY))(
            _fused_matmul_tma_kernel)
    return autotune([_config(t) for t in tiles], key=list(_GENERIC_KEY))(_fused_matmul_kernel)


def _launch_tuned(tuned_args: tuple, key_names: tuple, grid, args: dict) -> None:
    """Launches the autotuner for ``tuned_args`` (those of ``_autotuned``). The first launch of a
    key times every config, synchronising the GPU: inside a CUDA graph capture that must not
    happen, so it raises instead."""
    key = (tuned_args, *(args[name] for name in key_names))
    if key not in _tuned_keys and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        M, N, K = args["M"], args["N"], args["K"]
        raise RuntimeError(
            f"linear: a GEMM of shape M={M}, N={N}, K={K} reached its autotuner for the first time inside a CUDA "
            "graph capture, where timing its configs is impossible; run the same step once before capturing "
            "(the usual warm-up) so that every shape is tuned first")
    _autotuned(*tuned_args)[grid](**args)
    _tuned_keys.add(key)


# ---------------------------------------------------------------------------------------------
# Launchers. Both forms take the same arguments: A and Y as (M, K) views, B as a (K, N) view.

def matmul(a, b, c, *, y=None, bias=None, row_sum=None, activation="none", grad_of="none"):
    """C (M, N) = act(A' @ B + bias) with A' = A * act'(Y) for ``grad_of`` (Y laid out like A) and
    the row sums of A' into ``row_sum``, on the generic kernel. a, y: (M, K) and b: (K, N), any
    strides; c: (M, N) with unit column stride, or None for the row sums alone."""
    M, K = a.shape
    N = b.shape[1]
    store_c = c is not None
    dummy = c if store_c else row_sum  # any tensor, for the pointers a variant never reads
    args = dict(a_ptr=a, y_ptr=dummy if y is None else y, b_ptr=b, c_ptr=dummy,
                bias_ptr=dummy if bias is None else bias, row_sum_ptr=dummy if row_sum is None else row_sum,
                M=M, N=N, K=K, stride_am=a.stride(0), stride_ak=a.stride(1),
                stride_ym=0 if y is None else y.stride(0), stride_yk=0 if y is None else y.stride(1),
                stride_bk=b.stride(0), stride_bn=b.stride(1), stride_cm=c.stride(0) if store_c else 0,
                ACTIVATION=activation, GRAD_OF=grad_of, HAS_BIAS=bias is not None, ROW_SUM=row_sum is not None,
                STORE_C=store_c, DOT_PRECISION=dot_precision(a.dtype), ACC_DTYPE=accumulator(a.dtype))
    n_blocks = (lambda bn: triton.cdiv(N, bn)) if store_c else (lambda bn: 1)
    if M * N * K <= SMALL_PROBLEM:
        bm, bn, bk, stages, warps = SMALL_TILE
        grid = (triton.cdiv(M, bm) * n_blocks(bn),)
        _fused_matmul_kernel[grid](**args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
                                   num_stages=stages, num_warps=warps)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * n_blocks(meta["BLOCK_N"]),)  # noqa: E731
        tuned = (False, a.dtype, grad_of != "none", a.device, bucket(M), bucket(K))
        _launch_tuned(tuned, _GENERIC_KEY, grid, args)


def _tma_ready(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor describes the 2-D tensor ``t`` as stored: rows of unit stride that
    do not overlap (no stride-0 or expanded rows), 16-byte aligned start and row stride."""
    return (t.shape[0] > 0 and t.shape[1] > 0 and t.stride(1) == 1 and t.stride(0) >= t.shape[1]
            and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0)


def _tma_view(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """(the tensor a descriptor describes, whether that is t transposed) for an operand view ``t``:
    t itself, or t.T when t is a transposed view of a TMA-ready tensor; None if neither is."""
    if _tma_ready(t):
        return t, False
    if _tma_ready(t.t()):
        return t.t(), True
    return None


def _tma_kernel_fits(device: torch.device, dtype: torch.dtype, work: int, prologue: bool) -> bool:
    """Whether a GEMM of ``work`` multiply-adds takes the TMA kernel on ``device`` (operands aside):
    bf16/fp16, large enough, and a chip with the tensor copy engine (compute capability 9+) whose
    shared memory holds at least one of the kernel's tiles."""
    return (dtype in (torch.bfloat16, torch.float16) and work > SMALL_PROBLEM and device.type == "cuda"
            and _chip(device.index)[0] >= 9 and bool(fitting_tiles(True, dtype, prologue, device)))


def _use_tma(a, b, c, y) -> bool:
    """Whether the GEMM of ``gemm``'s arguments takes the TMA kernel: the chip and size allow it,
    TMA describes every operand, and Y is stored as A is."""
    if c is None or not _tma_kernel_fits(c.device, c.dtype, c.numel() * a.shape[1], y is not None):
        return False
    views = [_tma_view(t) for t in (a, b, c) + ((y,) if y is not None else ())]
    if None in views or views[2][1]:
        return False
    return y is None or views[3][1] == views[0][1]


def _tma_blocks(meta) -> dict[str, list[int]]:
    """The tile shape of each descriptor, for a config and the layout flags in ``meta``."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    a = [bk, bm] if meta["A_TRANSPOSED"] else [bm, bk]
    return {"a_desc": a, "y_desc": a, "b_desc": [bn, bk] if meta["B_TRANSPOSED"] else [bk, bn], "c_desc": [bm, bn]}


def _set_tma_blocks(nargs):
    """The autotuner's pre-hook: each config's tile shapes go into the descriptors."""
    for name, block in _tma_blocks(nargs).items():
        nargs[name].block_shape = block


def matmul_tma(a, b, c, *, y=None, bias=None, row_sum=None, activation="none", grad_of="none", num_programs=None):
    """``matmul`` on the TMA kernel, for operands that TMA describes (``_use_tma``). One program per
    multiprocessor unless ``num_programs`` says otherwise (the interpreter's tests)."""
    M, K = a.shape
    N = b.shape[1]
    prologue = grad_of != "none"
    (a_stored, a_transposed), (b_stored, b_transposed) = _tma_view(a), _tma_view(b)
    y_stored = a_stored if y is None else _tma_view(y)[0]
    if num_programs is None:
        num_programs = _chip(c.device.index)[2]
    layout = dict(A_TRANSPOSED=a_transposed, B_TRANSPOSED=b_transposed)
    # Descriptors start with the first tile's shapes, the one the interpreter runs; on a GPU the
    # autotuner's pre-hook sets each config's own.
    first = fitting_tiles(True, a.dtype, prologue, c.device)[0]
    blocks = _tma_blocks({**_config(first).kwargs, **layout})
    descriptors = {name: TensorDescriptor.from_tensor(t, blocks[name])
                   for name, t in (("a_desc", a_stored), ("y_desc", y_stored), ("b_desc", b_stored), ("c_desc", c))}

    def grid(meta):
        return (min(num_programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    args = dict(**descriptors, bias_ptr=c if bias is None else bias, row_sum_ptr=c if row_sum is None else row_sum,
                M=M, N=N, K=K, **layout, ACTIVATION=activation, GRAD_OF=grad_of, HAS_BIAS=bias is not None,
                ROW_SUM=row_sum is not None, NUM_PROGRAMS=num_programs)
    _launch_tuned((True, a.dtype, prologue, c.device, bucket(M), bucket(K)), _TMA_KEY, grid, args)


def gemm(a, b, c, *, y=None, bias=None, row_sum=None, activation="none", grad_of="none"):
    """``matmul``'s GEMM on the TMA kernel where ``_use_tma`` allows, on the generic one otherwise."""
    launch = matmul_tma if _use_tma(a, b, c, y) else matmul
    launch(a, b, c, y=y, bias=bias, row_sum=row_sum, activation=activation, grad_of=grad_of)


# ---------------------------------------------------------------------------------------------
# The backend's functions (kernels/ops/linear.py calls them).

def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y = act(x W^T + b) for x (M, K) with any strides, weight (N, K), bias (N,) or None."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M and N:
        with device_guard(x):
            gemm(x, weight.t(), y, bias=None if bias is None else bias.contiguous(), activation=activation)
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor | None, activation: str,
             need_x: bool, need_weight: bool, need_bias: bool):
    """(dx, dW, db) of y = act(x W^T + b), each None unless needed; y may be None for "none".
    Launches one GEMM for dx and one for dW and db together, each only when needed."""
    M, K = x.shape
    N = weight.shape[0]
    if _tma_kernel_fits(x.device, x.dtype, M * N * K, activation != "none") and _tma_view(dy) is None:
        # A layer large enough for the TMA kernel, but a dy it cannot read (y.sum() gives stride
        # 0): one copy of dy costs a small fraction of the GEMMs it lets run there.
        dy = dy.contiguous()
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if need_x else None
    dw = torch.empty((N, K), device=x.device, dtype=x.dtype) if need_weight else None
    db = torch.empty((N,), device=x.device, dtype=x.dtype) if need_bias else None
    with device_guard(x):
        if need_x and M and K:
            gemm(dy, weight, dx, y=y, grad_of=activation)  # dx = dz W: A = dy (M, N), B = W (N, K)
        store_w = need_weight and K > 0
        if N and (store_w or need_bias):  # dW = dz^T x, db = row sums of dz^T: A = dy^T (N, M), B = x (M, K)
            gemm(dy.t(), x, dw if store_w else None, y=None if y is None else y.t(), row_sum=db, grad_of=activation)
    return dx, dw, db
