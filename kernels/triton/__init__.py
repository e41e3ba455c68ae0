"""Triton GPU kernels, one module per op. Imported lazily by kernels._dispatch.triton_op."""
