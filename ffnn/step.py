"""One training step of the MLP, and its capture into a CUDA graph: what ``ffnn.train`` runs and
``benchmarks/bench_e2e.py`` times.

A step gathers its batch from the device-resident dataset with index_select, runs forward,
loss, backward, the data-parallel all-reduce when there are several processes, and the
optimizer, and adds the loss to a device-side sum: no host synchronisation. On the CPU, where
one process runs the whole step natively (kernels.MLPStep with the optimizer inside), a call runs
up to STEPS_PER_CALL steps, each on its own batch (``calls``): the Python of a call, about 20 us,
is then paid once for them. Every gradient is
a view of one flat buffer that the step zeroes in place at its start and never sets to None, so
gradient addresses stay fixed from the first step on: a captured CUDA graph replays with the
addresses it was captured with, FusedAdam's table of addresses is built once, and the gradients
are all-reduced in one call.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

import kernels
from ffnn.model import MLP

# --optimizer's choices: the torch.optim class of each, and the name of this library's drop-in for it
TORCH_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
FUSED_OPTIMIZERS = {"adam": "FusedAdam", "adamw": "FusedAdamW", "sgd": "FusedSGD"}
OPTIMIZERS = tuple(TORCH_OPTIMIZERS)
# Steps of the native CPU path per call: the Python of a call (about 20 us, a seventh of an MNIST
# step on two cores) is paid once for them; an epoch of 937 in one call gained nothing more.
# Ctrl-C stops a run at the end of a call.
STEPS_PER_CALL = 16


@dataclass
class World:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of every global batch."""
        return self.rank * batch_size // self.size, (self.rank + 1) * batch_size // self.size

    def start(self, device: torch.device) -> None:
        if self.size > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def stop(self, wait_for_all: bool) -> None:
        """Leave the job. ``wait_for_all`` (a run that ended normally): first wait until every rank
        is done, so no rank tears its connections down while another still uses them (a gloo
        worker thread then aborts its process: "terminate called without an active exception")."""
        if self.size > 1 and dist.is_initialized():
            if wait_for_all:
                dist.barrier()
            dist.destroy_process_group()


def make_optimizer(args, params, capturable: bool) -> torch.optim.Optimizer:
    """The optimizer ``args`` names (``optimizer``: adam, adamw or sgd; ``lr``; ``weight_decay``,
    None for the optimizer's default; for sgd ``momentum`` and ``nesterov``): this library's fused
    one for ``impl`` fused, torch.optim's (its fused implementation) for ``impl`` torch.
    ``capturable`` makes Adam's steps capturable in a CUDA graph (SGD keeps no step count)."""
    kwargs = {"lr": args.lr}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.optimizer == "sgd":
        kwargs.update(momentum=args.momentum, nesterov=args.nesterov)
    if args.impl == "fused":
        return getattr(kernels, FUSED_OPTIMIZERS[args.optimizer])(params, capturable=capturable, **kwargs)
    if args.optimizer != "sgd":
        kwargs["capturable"] = capturable
    return TORCH_OPTIMIZERS[args.optimizer](params, fused=True, **kwargs)


def flat_gradients(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One zeroed buffer holding every parameter's gradient: each ``p.grad`` becomes a view of
    it, into which backward accumulates in place. The parameters share one dtype and device."""
    flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


def native_step(model: torch.nn.Module, loss_fn, x_all: torch.Tensor, optimizer=None):
    """``kernels.MLPStep`` for the fused MLP on the C++ backend: forward, loss and backward in
    one native call, writing the gradients in place, and with ``optimizer`` its step too; None
    where the autograd path runs."""
    if isinstance(model, MLP) and loss_fn is kernels.cross_entropy and kernels.backend_for(x_all) == "cpu":
        return kernels.MLPStep(model.children(), optimizer)
    return None


def make_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, x_all: torch.Tensor,
              y_all: torch.Tensor, loss_sum: torch.Tensor, world: World,
              shard_weight: float) -> Callable[[torch.Tensor], None]:
    """The training step on one batch of row indices into (x_all, y_all): ``step(idx)``; where the
    whole step runs natively, ``step.steps_per_call`` is STEPS_PER_CALL and ``step(idx)`` with idx
    of shape (S, M) runs S steps, one per row (1 and one batch otherwise: ``calls`` groups them).

    Across ranks, each takes rows [lo, hi) of the global batch and its mean loss; the global
    mean's gradient is the sum over ranks of (hi - lo) / batch_size times each rank's gradient,
    so gradients are scaled by that weight (``shard_weight``) and all-reduced with SUM."""
    grads = flat_gradients(list(model.parameters()))
    # A single process runs the whole step natively, the optimizer's included; several must
    # all-reduce the gradients between the backward and the optimizer.
    native = native_step(model, loss_fn, x_all, optimizer if world.size == 1 else None)
    optimizer_inside = native is not None and native.optimizer is not None

    def step(idx: torch.Tensor) -> None:
        if native is not None:  # sets the gradients: nothing to zero
            loss = native(x_all, y_all, idx)
            if idx.dim() == 2:  # the losses of several steps, their optimizer's steps done inside
                loss = loss.sum()
        else:
            grads.zero_()
            loss = loss_fn(model(x_all.index_select(0, idx)), y_all.index_select(0, idx))
            loss.backward()
        if world.size > 1:
            grads.mul_(shard_weight)
            dist.all_reduce(grads)
        if not optimizer_inside:
            optimizer.step()
        loss_sum.add_(loss.detach())

    step.steps_per_call = STEPS_PER_CALL if optimizer_inside else 1
    return step


def calls(batches, steps_per_call: int):
    """The epoch's batches as the step takes them: one at a time, or up to ``steps_per_call``
    batches of one size at a time, stacked into (S, M); a last batch of another size
    (``--keep-last-batch``) goes in a call of its own."""
    i = 0
    while i < len(batches):
        end = i + 1
        while end < len(batches) and end - i < steps_per_call and len(batches[end]) == len(batches[i]):
            end += 1
        yield torch.stack(batches[i:end]) if end - i > 1 else batches[i]
        i = end


def capture_step(step, batch_size: int, model, optimizer, device: torch.device):
    """Capture ``step`` into a CUDA graph; returns run(idx), which copies the batch's indices
    into the graph's static index buffer and replays it.

    Warm-up steps run first on a side stream (they compile and autotune the kernels and create
    the optimizer state, none of which may happen during capture); the weights and optimizer
    state are restored afterwards (state the warm-up created goes back to zeros, which is where
    Adam's moments and step start, and from which SGD's first momentum step, without dampening,
    gives the gradient as torch.optim.SGD's does), so the run proceeds exactly as if there had
    been no warm-up.
    """
    static_idx = torch.zeros(batch_size, dtype=torch.long, device=device)
    params = list(model.parameters())
    saved_params = [p.detach().clone() for p in params]
    saved_state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                   for p in params if p in optimizer.state}

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_idx)
    torch.cuda.current_stream(device).wait_stream(side)

    with torch.no_grad():
        for p, saved in zip(params, saved_params):
            p.copy_(saved)
        for p in params:
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v):
                    v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_idx)

    def run(idx: torch.Tensor) -> None:
        static_idx.copy_(idx, non_blocking=True)
        graph.replay()

    run.steps_per_call = 1
    return run
