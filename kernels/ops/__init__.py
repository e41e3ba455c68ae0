"""The public ops, one module each: the functional form with its input checks, the
torch.autograd.Function that calls the backend chosen by kernels._dispatch.implementation, and
the nn.Module or torch.optim.Optimizer drop-in."""
