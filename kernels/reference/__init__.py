"""The "torch" backend: every op in plain PyTorch, with the same functions and signatures as
the kernels/triton and kernels/cpu modules of that op. It runs on any device, and it is the
readable statement of what the kernels compute, next to which each kernel is checked."""
