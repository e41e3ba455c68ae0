"""Triton GPU kernels, one module per op. Imported on first use by kernels._dispatch.implementation."""
