"""Triton kernels, one module per op, and ``utils``, the helpers their launchers share.

CUDA tensors run them compiled; CPU tensors under ``TRITON_INTERPRET=1`` run them in Triton's
interpreter, which is how the tests check them without a GPU. ``kernels._dispatch.implementation``
imports an op's module on its first use. They take float32, bfloat16 and float16, and float64
(accumulated in float64), which exists for the interpreter's exact tests and is not tuned for GPUs.
"""
