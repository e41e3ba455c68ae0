"""Kernel launches per MNIST training step on the Triton backend (interpreted on CPU tensors,
compiled on a GPU): each launch costs microseconds of host time, which at MNIST size is most of
a step, so a step launches only what it needs."""
import collections
import contextlib

import torch

import kernels
from ffnn.model import MLP

HAS_CUDA = torch.cuda.is_available()


@contextlib.contextmanager
def triton_launches():
    """Counts the Triton kernels launched inside the block, by the module that defines each
    (``kernels.triton.linear``, ...): every launch, compiled or interpreted, direct or through an
    autotuner, goes through ``run`` of the kernel's JITFunction (InterpretedFunction under
    TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:
        pass
    counts = collections.Counter()
    originals = {cls: cls.run for cls in classes}

    def counting(original):
        def run(self, *args, **kwargs):
            counts[self.fn.__module__] += 1
            return original(self, *args, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = counting(original)
    try:
        yield counts
    finally:
        for cls, original in originals.items():
            cls.run = original


def test_mnist_training_step_launches():
    """One step of the MLP 784-128-64-10 at batch 64 (forward, cross-entropy, backward, FusedAdam)
    launches: linear 3 forward GEMMs and 5 backward ones (dx and dW with db for the two upper
    layers, dW with db alone for the first, whose input needs no gradient); cross-entropy one
    kernel for the loss and its gradient, and at most one in the backward; Adam one for all six
    parameters."""
    kernels.set_backend("triton")
    device = "cuda" if HAS_CUDA else "cpu"
    model = MLP(device=device)
    optimizer = kernels.FusedAdam(model.parameters(), lr=1e-3)
    images = torch.randn(64, 784, device=device)
    labels = torch.randint(0, 10, (64,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=False)
        kernels.cross_entropy(model(images), labels).backward()
        optimizer.step()

    if HAS_CUDA:
        step()  # compiles every kernel, and would count the autotuner's timing runs
    with triton_launches() as counts:  # under the interpreter one step takes a minute: the first one counts
        step()
    assert counts["kernels.triton.linear"] == 8, counts
    assert 1 <= counts["kernels.triton.cross_entropy"] <= 2, counts
    assert counts["kernels.triton.adam"] == 1, counts
    assert sum(counts.values()) == sum(counts[k] for k in ("kernels.triton.linear", "kernels.triton.cross_entropy",
                                                           "kernels.triton.adam")), counts
