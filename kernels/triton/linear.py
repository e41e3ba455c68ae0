"""Fused Linear + bias + activation on the GPU: y = act(x W^T + b) and its backward.

With x (M, K), W (N, K), b (N), z = x W^T + b and y = act(z)::

    forward    y  = act(x W^T + b)            one GEMM; bias and activation in its epilogue
    backward   dz = dy * act'(y)              relu: y > 0, sigmoid: y (1 - y), tanh: 1 - y^2, none: 1
               dx = dz W                      one GEMM, dz formed as its A operand is loaded
               dW = dz^T x,  db = sum_m dz    one GEMM, dz formed the same way; the programs of
                                              the first column block also sum db from the loaded dz

so the backward never materialises dz, and the forward saves only y (activation "none" saves
nothing). All three GEMMs are one kernel, C = epilogue(prologue(A) @ B), with the operands
given by strides: the transposes (W^T, dz^T) and non-contiguous inputs cost no copies.

Matmul precision follows PyTorch: fp32 inputs use full-precision ``ieee`` dots unless the user
allowed TF32 (``kernels.triton.utils.dot_precision``); bf16/fp16 use the tensor cores and
accumulate in fp32 (fp64, for the interpreter's tests, accumulates in fp64).

Large bf16/fp16 layers on Hopper and later (compute capability 9+) run the same three GEMMs on a
second form of that kernel, built for the chip's tensor copy engine: every tile of A, Y, B and C
moves through a TMA descriptor (between global and shared memory without the threads; partial
tiles are zero-filled or clipped by the hardware), a transposed operand is read as stored and
transposed on chip, and the grid is persistent, one program per multiprocessor walking the output
tiles in the same grouped order. It takes what TMA takes: rows of unit stride, 16-byte-aligned
starts and row strides; anything else runs on the generic kernel.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.triton.utils import accumulator, autotune, dot_precision


def _config(bm, bn, bk, stages, warps, pre_hook=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps, pre_hook=pre_hook)


# H100 tiles (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): large ones for big GEMMs (those TMA
# cannot take), mid ones for mid shapes, small-M ones for batch-64 layers. fp32 (and fp64 under
# the interpreter) leaves out those that overflow shared memory or spill kilobytes of fp32 operand
# registers on sm_90 (tests/hopper_compile.py). The interpreter runs the first config.
_TILES = [
    (128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (256, 128, 64, 4, 8),
    (128, 128, 64, 3, 8), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
    (64, 64, 32, 5, 2), (32, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 64, 128, 3, 4), (16, 128, 64, 4, 4),
]
_TOO_BIG_FOR_FP32 = {(128, 128, 64, 4, 4), (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8),
                     (256, 128, 64, 4, 8), (128, 128, 32, 4, 4)}
_CONFIGS = {16: [_config(*t) for t in _TILES], 32: [_config(*t) for t in _TILES if t not in _TOO_BIG_FOR_FP32]}

# Problems up to this many multiply-adds skip the autotuner: at MNIST sizes its dispatch costs
# more than the GEMM, and one small tile fits them all.
_SMALL_PROBLEM = 1 << 23
_SMALL_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == "relu":
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == "sigmoid":
        z = tl.sigmoid(z)
    elif ACTIVATION == "tanh":
        z = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    return z


@triton.jit
def _activation_grad(dy, y, ACTIVATION: tl.constexpr):
    """dz = dy * act'(z), written with the activation's output y."""
    if ACTIVATION == "relu":
        dy = tl.where(y > 0.0, dy, 0.0)
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
    stride_am, stride_ak, stride_ym, stride_yk, stride_bk, stride_bn, stride_cm, stride_cn,
    ACTIVATION: tl.constexpr,  # epilogue: C = act(A' B + bias)
    GRAD_OF: tl.constexpr,  # prologue: A' = A * act'(Y) for this activation, Y laid out like A ("none": A' = A)
    HAS_BIAS: tl.constexpr,
    ROW_SUM: tl.constexpr,  # also row_sum[m] = sum_k A'[m, k], by the programs of column block 0
    STORE_C: tl.constexpr,  # False: only the row sums (a grid of one column block)
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (M, N) = act(A' @ B + bias) with A' = prologue(A) (M, K), B (K, N), fp32/fp64 accumulation."""
    pid = tl.program_id(0)
    if STORE_C:
        pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    else:
        pid_m = pid
        pid_n = 0

    # Rows and columns wrap around (modulo) instead of being masked: loads stay in bounds and
    # unmasked along M and N; the wrapped duplicates are never stored.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_k[None, :] * stride_yk
    if STORE_C:
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

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
            b_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        y_ptrs += BLOCK_K * stride_yk

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
        c_ptrs = c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


_fused_matmul_tuned = {
    bits: autotune(configs, key=["M", "N", "K", "GRAD_OF", "ROW_SUM", "STORE_C"])(_fused_matmul_kernel)
    for bits, configs in _CONFIGS.items()
}


def _matmul(a, a_strides, b, b_strides, c, M, N, K, *, y=None, y_strides=(0, 0), bias=None, row_sum=None,
            activation="none", grad_of="none", store_c=True):
    """Launches C = act(prologue(A) @ B + bias) (and/or the row sums of prologue(A)); c is
    (M, N) contiguous, a and y are (M, K) and b is (K, N) through the given strides."""
    dummy = c if store_c else row_sum  # any tensor for the pointers a variant never reads
    args = (a, y if y is not None else dummy, b, c if store_c else dummy,
            bias if bias is not None else dummy, row_sum if row_sum is not None else dummy,
            M, N, K, *a_strides, *y_strides, *b_strides, N if store_c else 0, 1)
    meta = dict(ACTIVATION=activation, GRAD_OF=grad_of, HAS_BIAS=bias is not None, ROW_SUM=row_sum is not None,
                STORE_C=store_c, DOT_PRECISION=dot_precision(a.dtype), ACC_DTYPE=accumulator(a.dtype))
    n_blocks = (lambda bn: triton.cdiv(N, bn)) if store_c else (lambda bn: 1)
    if M * N * K <= _SMALL_PROBLEM:
        grid = (triton.cdiv(M, _SMALL_CONFIG["BLOCK_M"]) * n_blocks(_SMALL_CONFIG["BLOCK_N"]),)
        _fused_matmul_kernel[grid](*args, **meta, **_SMALL_CONFIG)
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * n_blocks(META["BLOCK_N"]),)  # noqa: E731
        _fused_matmul_tuned[16 if a.element_size() == 2 else 32][grid](*args, **meta)


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
    B and C moved by TMA; NUM_PROGRAMS programs share the output tiles round-robin."""
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


def _tma_blocks(meta) -> dict[str, list[int]]:
    """The tile shape of each descriptor, for a config and the layout flags in ``meta``."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    a = [bk, bm] if meta["A_TRANSPOSED"] else [bm, bk]
    return {"a_desc": a, "y_desc": a, "b_desc": [bn, bk] if meta["B_TRANSPOSED"] else [bk, bn], "c_desc": [bm, bn]}


def _set_tma_blocks(nargs):
    """The autotuner's pre-hook: each config's tile shapes go into the descriptors."""
    for name, block in _tma_blocks(nargs).items():
        nargs[name].block_shape = block


def _tma_config(bm, bn, bk, stages, warps):
    return _config(bm, bn, bk, stages, warps, pre_hook=_set_tma_blocks)


# bf16/fp16 tiles for Hopper's 227 KB of shared memory per block: the pipeline's stages of A and
# B tiles plus one C tile for the TMA store (128x256 with 3 stages takes 213 KB). With a prologue
# (GRAD_OF) each stage also holds a tile of Y, so those configs have fewer stages or smaller tiles.
_TMA_TILES = {  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), without and with a prologue
    False: [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 5, 4), (256, 128, 64, 3, 8),
            (64, 256, 64, 4, 4), (128, 128, 128, 3, 8)],
    True: [(128, 256, 32, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 8), (256, 128, 32, 3, 8),
           (64, 256, 64, 4, 4), (128, 128, 128, 2, 8)],
}
_TMA_CONFIGS = {with_y: [_tma_config(*t) for t in tiles] for with_y, tiles in _TMA_TILES.items()}
_fused_matmul_tma_tuned = {
    with_y: autotune(configs, key=["M", "N", "K", "A_TRANSPOSED", "B_TRANSPOSED", "GRAD_OF", "ROW_SUM"])(
        _fused_matmul_tma_kernel)
    for with_y, configs in _TMA_CONFIGS.items()
}


def _tma_ready(t: torch.Tensor) -> bool:
    """What a TMA descriptor of a 2-D tensor needs: unit stride along the rows, 16-byte
    aligned start and row stride."""
    return (t.stride(1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
            and t.shape[0] > 0 and t.shape[1] > 0)


@functools.cache
def _device_properties(device: torch.device):
    return torch.cuda.get_device_properties(device)


def _use_tma(c: torch.Tensor, K: int, *operands: torch.Tensor | None) -> bool:
    """Whether the GEMM writing ``c`` over a reduction of K, reading ``operands``, takes the TMA
    kernel: bf16/fp16 on Hopper or later, large enough, every tensor TMA-ready."""
    return (c.is_cuda and c.dtype in (torch.bfloat16, torch.float16) and c.numel() * K > _SMALL_PROBLEM
            and _device_properties(c.device).major >= 9
            and all(t is None or _tma_ready(t) for t in (c, *operands)))


def matmul_tma(a, b, c, M, N, K, *, a_transposed=False, b_transposed=False, y=None, bias=None, row_sum=None,
               activation="none", grad_of="none", num_programs=None):
    """C (M, N) = act(A' @ B + bias), A' = A * act'(Y) for ``grad_of``, and the row sums of A'
    into ``row_sum``, through the TMA kernel. a (and y) hold A (M, K), or A^T (K, M) with
    ``a_transposed``; b holds B (K, N), or B^T (N, K) with ``b_transposed``; all are TMA-ready.
    One program per multiprocessor unless ``num_programs`` says otherwise (the interpreter's tests)."""
    if num_programs is None:
        num_programs = _device_properties(c.device).multi_processor_count
    layout = dict(A_TRANSPOSED=a_transposed, B_TRANSPOSED=b_transposed)
    with_y = grad_of != "none"
    # Descriptors start with the first config's tiles, the one the interpreter runs; on a GPU
    # the autotuner's pre-hook sets each config's own.
    blocks = _tma_blocks({**_TMA_CONFIGS[with_y][0].kwargs, **layout})
    descriptors = [TensorDescriptor.from_tensor(t, blocks[name])
                   for name, t in (("a_desc", a), ("y_desc", a if y is None else y), ("b_desc", b), ("c_desc", c))]

    def grid(meta):
        return (min(num_programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

    _fused_matmul_tma_tuned[with_y][grid](
        *descriptors, c if bias is None else bias, c if row_sum is None else row_sum, M, N, K, **layout,
        ACTIVATION=activation, GRAD_OF=grad_of, HAS_BIAS=bias is not None, ROW_SUM=row_sum is not None,
        NUM_PROGRAMS=num_programs)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """y = act(x W^T + b) for x (M, K) with any strides, weight (N, K), bias (N,) or None."""
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    bias = None if bias is None else bias.contiguous()
    if M and N and K and _use_tma(y, K, x, weight):
        matmul_tma(x, weight, y, M, N, K, b_transposed=True, bias=bias, activation=activation)
    elif M and N:
        # B = W^T: element (k, n) is W[n, k].
        _matmul(x, x.stride(), weight, (weight.stride(1), weight.stride(0)), y, M, N, K, bias=bias,
                activation=activation)
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor | None, activation: str,
             need_x: bool, need_weight: bool, need_bias: bool):
    """(dx, dW, db) of y = act(x W^T + b), each None unless needed; y may be None for "none"."""
    M, K = x.shape
    N = weight.shape[0]
    if not _tma_ready(dy) and _use_tma(x, N, weight):
        # A layer large enough for the TMA kernel, but a dy it cannot read (y.sum() gives stride
        # 0): one copy of dy costs a small fraction of the GEMMs it lets run there.
        dy = dy.contiguous()
    y_strides = (0, 0) if y is None else y.stride()
    dx = dw = db = None
    if need_x:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        if M and K and N and _use_tma(dx, N, dy, weight, y):
            matmul_tma(dy, weight, dx, M, K, N, y=y, grad_of=activation)
        elif M and K:
            _matmul(dy, dy.stride(), weight, weight.stride(), dx, M, K, N, y=y, y_strides=y_strides,
                    grad_of=activation)
    if need_weight or need_bias:
        dw = torch.empty((N, K), device=x.device, dtype=x.dtype) if need_weight else None
        db = torch.empty((N,), device=x.device, dtype=x.dtype) if need_bias else None
        store_c = need_weight and K > 0
        if store_c and M and N and _use_tma(dw, M, dy, x, y):
            # A = dz^T: dy and y as stored are A^T.
            matmul_tma(dy, x, dw, N, K, M, a_transposed=True, y=y, row_sum=db, grad_of=activation)
        elif N and (store_c or need_bias):
            # A = dz^T (N, M): element (n, m) is dz[m, n]; B = x (M, K).
            _matmul(dy, dy.stride()[::-1], x, x.stride(), dw if store_c else None, N, K, M,
                    y=y, y_strides=y_strides[::-1], row_sum=db, grad_of=activation, store_c=store_c)
    return dx, dw, db
