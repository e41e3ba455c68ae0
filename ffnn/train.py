"""Train the MNIST MLP with the library's fused kernels (or plain PyTorch with --impl torch).

    python -m ffnn.train --dataset fashion-mnist --epochs 5 --out runs/fashion
    python -m ffnn.train --resume runs/fashion/checkpoint.pt --epochs 10
    torchrun --nproc-per-node 2 -m ffnn.train --dataset fashion-mnist     # data-parallel

The dataset lives on the training device; each step gathers its batch with index_select from a
per-epoch permutation, runs forward, loss, backward and the optimizer, and adds the loss to a
device-side sum that is read once per epoch: no host synchronisation inside a step. On CUDA the
whole step is captured once into a CUDA graph and replayed (--no-cuda-graph: eager). Every epoch
has ``len(train) // batch_size`` full steps (937 for 60000 / 64): the last partial batch of each
epoch's permutation is dropped, on every device and path, so the graph has one fixed shape.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from ffnn import checkpoint, data as datasets, plots
from ffnn.cli import add_data_options, add_device_options, resolve_device, run_command
from ffnn.errors import FFNNError
from ffnn.evaluate import evaluate_model
from ffnn.model import TORCH_ACTIVATIONS, build, count_parameters, loss_function

PROG = "ffnn-train"
# Options that define a run. Unset, they take these defaults, or on --resume the checkpoint's
# values; set on --resume, they must agree with the checkpoint.
RUN_DEFAULTS = {"dataset": "mnist", "hidden": "128,64", "activation": "relu", "batch_size": 64, "lr": 1e-3,
                "optimizer": "adam", "weight_decay": None, "seed": 0, "impl": "fused"}
ARCHITECTURE = ("hidden", "activation")
DEFAULT_EPOCHS = 5
INTERRUPTED = 130  # the shell's status for a run ended by Ctrl-C
SAMPLE_IMAGES = 32


def _hidden(text: str) -> str:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        sizes = [0]
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive layer widths like 128,64, got {text!r}")
    return ",".join(map(str, sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_data_options(p, unset="mnist, or the checkpoint's with --resume")
    add_device_options(p, impl_unset="fused, or the checkpoint's with --resume")
    p.add_argument("--epochs", type=int, help=f"total epochs to train (default {DEFAULT_EPOCHS}, or the checkpoint's)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 64)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--hidden", type=_hidden, help="hidden layer widths (default 128,64)")
    p.add_argument("--activation", choices=tuple(TORCH_ACTIVATIONS), help="hidden-layer activation (default relu)")
    p.add_argument("--optimizer", choices=("adam", "adamw"), help="default adam")
    p.add_argument("--weight-decay", type=float, help="default: the optimizer's (0 for adam, 1e-2 for adamw)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and of the shuffling (default 0)")
    p.add_argument("--out", help="output directory (default runs/DATASET-IMPL, or the checkpoint's directory)")
    p.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run the CUDA step eagerly instead of replaying a captured CUDA graph")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def settle_args(args: argparse.Namespace, ckpt: dict | None) -> None:
    """Fill in unset options from the defaults, or on --resume from the checkpoint's run."""
    saved = ckpt.get("args", {}) if ckpt else {}
    for name, default in RUN_DEFAULTS.items():
        given, before = getattr(args, name), saved.get(name, default)
        if ckpt is not None and given is not None and given != before:
            what = "it is a checkpoint of another architecture" if name in ARCHITECTURE else "a resumed run keeps its settings"
            raise FFNNError(f"--{name.replace('_', '-')} {given} does not match the checkpoint {args.resume}, "
                            f"which was trained with --{name.replace('_', '-')} {before}: {what}")
        setattr(args, name, before if given is None else given)
    if args.epochs is None:
        args.epochs = saved.get("epochs", DEFAULT_EPOCHS)
    if args.data_dir is None:
        args.data_dir = saved.get("data_dir")
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.resume else os.path.join("runs", f"{args.dataset}-{args.impl}")


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

    def stop(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a request to stop after the current step, so the
    checkpoint saved then is a consistent one; a second Ctrl-C interrupts at once."""

    def __init__(self, enabled: bool = True) -> None:
        self.requested = False
        self._enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> StopRequest:
        if self._enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._enabled and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)


def make_optimizer(args: argparse.Namespace, params, capturable: bool) -> torch.optim.Optimizer:
    kwargs = {"lr": args.lr}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.impl == "fused":
        cls = kernels.FusedAdamW if args.optimizer == "adamw" else kernels.FusedAdam
    else:
        cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
        kwargs["fused"] = True
    return cls(params, capturable=capturable, **kwargs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, capturable: bool) -> None:
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # load_state_dict restores the saved run's flag too
        if "capturable" in group:
            group["capturable"] = capturable


def make_step(model, optimizer, loss_fn, x_all, y_all, loss_sum, world: World, shard_weight: float):
    """The training step on one batch of row indices into (x_all, y_all).

    Across ranks, each takes rows [lo, hi) of the global batch and its mean loss; the global
    mean's gradient is the sum over ranks of (hi - lo) / batch_size times each rank's gradient,
    so gradients are scaled by that weight and all-reduced with SUM. Their storage is one flat
    buffer (each .grad a view of it) so that this is one all-reduce per step.
    """
    params = list(model.parameters())
    if world.size > 1:
        flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=params[0].dtype)
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p)  # backward accumulates into it in place
            offset += p.numel()

        def sync_grads():
            flat.mul_(shard_weight)
            dist.all_reduce(flat)

        def clear_grads():
            flat.zero_()
    else:
        def sync_grads():
            pass

        def clear_grads():
            for p in params:
                p.grad = None

    def step(idx: torch.Tensor) -> None:
        loss = loss_fn(model(x_all.index_select(0, idx)), y_all.index_select(0, idx))
        loss.backward()
        sync_grads()
        optimizer.step()
        clear_grads()
        loss_sum.add_(loss.detach())

    return step


def capture_step(step, batch_size: int, model, optimizer, device: torch.device):
    """Capture ``step`` into a CUDA graph; returns run(idx), which copies the batch's indices
    into the graph's static index buffer and replays it.

    Warm-up steps run first on a side stream (they compile and autotune the kernels and create
    the optimizer state, none of which may happen during capture); the weights and optimizer
    state are restored afterwards, so the run proceeds exactly as if there had been no warm-up.
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
        for p in params:  # state created by the warm-up goes back to fresh (zeros)
            for k, v in optimizer.state[p].items():
                if torch.is_tensor(v):
                    v.copy_(saved_state[p][k]) if p in saved_state else v.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(static_idx)

    def run(idx: torch.Tensor) -> None:
        static_idx.copy_(idx, non_blocking=True)
        graph.replay()

    return run


def _write_metrics(out: Path, meta: dict, history: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps({**meta, "epochs": history}, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)


def train(args: argparse.Namespace) -> int:
    world = World.from_env()
    device = resolve_device(args.device, world.local_rank)
    ckpt = checkpoint.load(args.resume) if args.resume else None
    settle_args(args, ckpt)
    world.start(device)
    try:
        return _train(args, ckpt, world, device)
    except KeyboardInterrupt:  # only reached without the SIGINT handler, i.e. under torchrun
        if world.main:
            print(f"interrupted; the last checkpoint is in {args.out}", file=sys.stderr)
        return INTERRUPTED
    finally:
        world.stop()


def _train(args: argparse.Namespace, ckpt: dict | None, world: World, device: torch.device) -> int:
    say = print if world.main else (lambda *a, **k: None)
    data = datasets.load(args.dataset, args.data_dir, device, args.download)
    n, batch = len(data.train_y), args.batch_size
    if n < batch:
        raise FFNNError(f"--batch-size {batch} is larger than the training set ({n} images)")
    if batch < world.size:
        raise FFNNError(f"--batch-size {batch} cannot be split over {world.size} processes")
    hidden = [int(h) for h in args.hidden.split(",") if h]
    sizes = (data.num_features, *hidden, len(data.classes))
    model = build(args.impl, sizes, args.activation, seed=args.seed, device=device)
    use_graph = args.cuda_graph and device.type == "cuda" and world.size == 1
    optimizer = make_optimizer(args, model.parameters(), capturable=use_graph)
    generator = torch.Generator().manual_seed(args.seed)
    start_epoch, start_step, partial_loss, history = 0, 0, 0.0, []
    if ckpt is not None:
        checkpoint.check_architecture(ckpt["model"], sizes, "this run's model")
        model.load_state_dict(ckpt["model"])
        load_optimizer_state(optimizer, ckpt["optimizer"], capturable=use_graph)
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, start_step, partial_loss = ckpt["epoch"], ckpt["step"], ckpt["partial_loss_sum"]
        history = list(ckpt["history"])

    steps = n // batch
    lo, hi = world.shard(batch)
    loss_sum = torch.zeros((), device=device)
    step = make_step(model, optimizer, loss_function(args.impl), data.train_x, data.train_y, loss_sum,
                     world, (hi - lo) / batch)
    if use_graph:
        step = capture_step(step, hi - lo, model, optimizer, device)

    out = Path(args.out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    n_params = count_parameters(model)
    arch = f"MLP {'-'.join(map(str, sizes))} ({args.activation})"
    say(f"data: {data.name} from {data.source}: {n:,} training / {len(data.test_y):,} test images")
    say(f"model: {arch}, {n_params:,} parameters, impl {args.impl}")
    say(f"training: {steps} steps of {batch} per epoch on {device}"
        + (f" x {world.size} processes" if world.size > 1 else "")
        + f", {'CUDA graph' if use_graph else 'eager'}, {args.optimizer} lr {args.lr}, seed {args.seed}"
        + (f", resumed at epoch {start_epoch + 1} step {start_step}" if ckpt else ""))
    meta = {"args": vars(args), "model": arch, "parameters": n_params, "device": str(device),
            "world_size": world.size, "cuda_graph": use_graph, "data_source": data.source}

    def save(epoch: int, step_in_epoch: int, generator_state: torch.Tensor, loss_so_far: float) -> Path:
        return checkpoint.save({
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "arch": {"sizes": list(sizes), "activation": args.activation},
            "image_shape": list(data.image_shape), "classes": list(data.classes),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step": step_in_epoch, "generator": generator_state,
            "partial_loss_sum": loss_so_far, "torch_rng": torch.get_rng_state(),
            "history": history, "args": vars(args),
        }, out / "checkpoint.pt")

    show_bar = world.main and not args.quiet and sys.stderr.isatty()
    from tqdm import tqdm

    with StopRequest(enabled=world.size == 1) as stop:
        for epoch in range(start_epoch, args.epochs):
            epoch_start_state = generator.get_state()
            batches = datasets.epoch_batches(n, batch, generator, device, shard=(lo, hi))
            first = start_step if epoch == start_epoch else 0
            loss_sum.fill_(partial_loss if epoch == start_epoch else 0.0)
            done = first
            t0 = time.perf_counter()
            for idx in tqdm(batches[first:], desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                            leave=False, disable=not show_bar, dynamic_ncols=True):
                if stop.requested:
                    break
                step(idx)
                done += 1
            local_loss = loss_sum.item()  # the one host sync of the epoch
            seconds = time.perf_counter() - t0
            if done < steps:
                path = save(epoch, done, epoch_start_state, local_loss)
                say(f"interrupted at epoch {epoch + 1} step {done}/{steps}: saved {path}; "
                    f"continue with --resume {path}")
                return INTERRUPTED
            train_loss = local_loss / steps
            if world.size > 1:
                total = torch.tensor([local_loss * (hi - lo) / batch], dtype=torch.float64, device=device)
                dist.all_reduce(total)
                train_loss = total.item() / steps
            ev = evaluate_model(model, data.test_x, data.test_y, loss_function(args.impl), len(data.classes))
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_loss": ev.loss,
                            "test_accuracy": ev.accuracy, "samples_per_s": (done - first) * batch / seconds,
                            "epoch_seconds": seconds})
            h = history[-1]
            say(f"epoch {epoch + 1}/{args.epochs}  train loss {train_loss:.4f}  test loss {ev.loss:.4f}  "
                f"test acc {100 * ev.accuracy:.2f}%  {h['samples_per_s']:,.0f} samples/s  ({seconds:.2f} s)", flush=True)
            if world.main:
                _write_metrics(out, meta, history)
                save(epoch + 1, 0, generator.get_state(), 0.0)
            if stop.requested:
                say(f"interrupted after epoch {epoch + 1}: saved {out / 'checkpoint.pt'}")
                return INTERRUPTED

    if world.main and history:
        plots.loss_curves(history, out / "loss.png", title=f"{arch} on {data.name}, impl {args.impl}")
        x, y = data.test_x[:SAMPLE_IMAGES], data.test_y[:SAMPLE_IMAGES]
        with torch.no_grad():
            predictions = model(x).argmax(1).tolist()
        plots.sample_grid(x.view(-1, *data.image_shape), y.tolist(), predictions, data.classes, out / "samples.png")
        last = history[-1]
        say(f"done: test accuracy {100 * last['test_accuracy']:.2f}% after {last['epoch']} epochs; "
            f"wrote {out / 'checkpoint.pt'}, metrics.json, metrics.csv, loss.png, samples.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
