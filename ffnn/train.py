"""Train the MNIST MLP with the library's fused kernels (or plain PyTorch with --impl torch).

    python -m ffnn.train --dataset fashion-mnist --epochs 5 --out runs/fashion
    python -m ffnn.train --resume runs/fashion/checkpoint.pt --epochs 10
    torchrun --nproc-per-node 2 -m ffnn.train --dataset fashion-mnist     # data-parallel

The dataset lives on the training device; each step (ffnn/step.py) gathers its batch with
index_select from a per-epoch permutation, runs forward, loss, backward and the optimizer, and
adds the loss to a device-side sum that is read once per epoch: no host synchronisation inside a
step. On CUDA the whole step is captured once into a CUDA graph and replayed (--no-cuda-graph:
eager). Every epoch has ``len(train) // batch_size`` full steps (937 for 60000 / 64): the last
partial batch of each epoch's permutation is dropped, on every device and path, so the graph has
one fixed shape; --keep-last-batch keeps it (eager, single process), as a DataLoader does.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the slow imports below
    from ffnn.launch import exit_quietly_on_ctrl_c

    exit_quietly_on_ctrl_c()

import argparse
import csv
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ffnn import checkpoint, data as datasets, plots
from ffnn.cli import (add_data_options, add_device_options, machine_summary, plural, resolve_device,
                      run_command)
from ffnn.errors import FFNNError
from ffnn.evaluate import evaluate_model
from ffnn.launch import INTERRUPTED
from ffnn.model import TORCH_ACTIVATIONS, build, count_parameters, describe, loss_function
from ffnn.step import OPTIMIZERS, World, calls, capture_step, make_optimizer, make_step

PROG = "ffnn-train"
# Options that define a run. Unset, they take these defaults, or on --resume the checkpoint's
# values; set on --resume, they must agree with the checkpoint.
RUN_DEFAULTS = {"dataset": "mnist", "hidden": "128,64", "activation": "relu", "batch_size": 64, "lr": 1e-3,
                "optimizer": "adam", "weight_decay": None, "momentum": 0.0, "nesterov": False, "seed": 0,
                "impl": "fused", "normalize": datasets.DEFAULT_NORMALIZATION, "keep_last_batch": False}
ARCHITECTURE = ("hidden", "activation")
SGD_OPTIONS = ("momentum", "nesterov")
DEFAULT_EPOCHS = 5
SAMPLE_IMAGES = 32
CHECKPOINT = "checkpoint.pt"


def _hidden(text: str) -> str:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        sizes = [0]
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive layer widths like 128,64 "
                                         f"(or \"\" for none), got {text!r}")
    return ",".join(map(str, sizes))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    """A finite float >= 0: what torch.optim accepts for lr, weight decay and momentum (it lets NaN through)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_data_options(p, unset="mnist, or the checkpoint's with --resume")
    add_device_options(p, impl_unset="fused, or the checkpoint's with --resume")
    p.add_argument("--epochs", type=_positive_int,
                   help=f"total epochs to train (default {DEFAULT_EPOCHS}, or the checkpoint's)")
    p.add_argument("--batch-size", type=_positive_int, help="global batch size (default 64)")
    p.add_argument("--lr", type=_non_negative, help="learning rate (default 1e-3)")
    p.add_argument("--hidden", type=_hidden, help='hidden layer widths (default 128,64; "" for none: one linear layer)')
    p.add_argument("--activation", choices=tuple(TORCH_ACTIVATIONS), help="hidden-layer activation (default relu)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    p.add_argument("--weight-decay", type=_non_negative, help="default: the optimizer's (1e-2 for adamw, else 0)")
    p.add_argument("--momentum", type=_non_negative, help="SGD momentum (default 0)")
    p.add_argument("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    p.add_argument("--keep-last-batch", action="store_true", default=None,
                   help="also train on each epoch's last partial batch, as a DataLoader does (eager, one process; "
                        "default: drop it)")
    p.add_argument("--seed", type=int, help="seed of the initial weights and of the shuffling (default 0)")
    p.add_argument("--out", help="output directory (default runs/DATASET-IMPL, or the checkpoint's directory)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one")
    p.add_argument("--resume", metavar="CKPT", help="continue the run saved in this checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run the CUDA step eagerly instead of replaying a captured CUDA graph")
    return p.parse_args(argv)


def _option(name: str, value) -> str:
    """How the option ``name`` set to ``value`` reads on a command line."""
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f'{flag} ""' if value == "" else f"{flag} {value}"


def settle_args(args: argparse.Namespace, ckpt: dict | None) -> None:
    """Fill in unset options from the defaults, or on --resume from the checkpoint's run, and
    reject combinations that cannot run."""
    saved = ckpt.get("args", {}) if ckpt else {}
    for name, default in RUN_DEFAULTS.items():
        given, before = getattr(args, name), saved.get(name, default)
        if ckpt is not None and given is not None and given != before:
            what = "it is a checkpoint of another architecture" if name in ARCHITECTURE else "a resumed run keeps its settings"
            raise FFNNError(f"{_option(name, given)} does not match the checkpoint {args.resume}, "
                            f"which was trained with {_option(name, before)}: {what}")
        setattr(args, name, before if given is None else given)
    if args.epochs is None:
        args.epochs = saved.get("epochs", DEFAULT_EPOCHS)
    if args.data_dir is None:
        args.data_dir = saved.get("data_dir")
    if args.out is None:
        args.out = str(Path(args.resume).parent) if args.resume else str(Path("runs", f"{args.dataset}-{args.impl}"))
    if args.optimizer != "sgd" and (args.momentum or args.nesterov):
        raise FFNNError(f"--momentum and --nesterov are options of --optimizer sgd, not of {args.optimizer}")
    if args.nesterov and args.momentum <= 0:
        raise FFNNError("--nesterov needs a --momentum above 0")
    if ckpt is not None and args.epochs <= ckpt["epoch"]:
        raise FFNNError(f"nothing to train: the checkpoint {args.resume} has already trained "
                        f"{plural(ckpt['epoch'], 'epoch')} and --epochs is {args.epochs}; pass --epochs above "
                        f"{ckpt['epoch']} to train more")


def claim_output(args: argparse.Namespace) -> Path:
    """The run's output directory, unless it holds another run that this one would overwrite
    (allowed with --overwrite, or when resuming the checkpoint in it)."""
    out = Path(args.out)
    existing = out / CHECKPOINT
    resuming_it = args.resume is not None and existing.resolve() == Path(args.resume).resolve()
    if existing.exists() and not (resuming_it or args.overwrite):
        raise FFNNError(f"{out} already holds a run ({existing}): continue it with --resume {existing} "
                        "(and --epochs N for more epochs), start over with --overwrite, or choose another --out")
    return out


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a request to stop after the current step (on the
    native CPU path, the current call of up to STEPS_PER_CALL steps), so the checkpoint saved then
    is a consistent one; a second Ctrl-C interrupts at once."""

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


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, capturable: bool) -> None:
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:  # load_state_dict restores the saved run's flag too
        if "capturable" in group:
            group["capturable"] = capturable


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
    if ckpt is not None and "optimizer" not in ckpt:
        raise FFNNError(f"{args.resume} holds a model's weights only, not a training run: it can be evaluated "
                        "(ffnn.evaluate) but not resumed")
    settle_args(args, ckpt)
    if args.keep_last_batch and world.size > 1:
        raise FFNNError("--keep-last-batch runs in one process only: its last batch cannot be split evenly")
    out = claim_output(args)
    world.start(device)
    try:
        status = _train(args, ckpt, world, device, out)
    except BaseException:
        world.stop(wait_for_all=False)  # another rank may never reach a barrier
        raise
    world.stop(wait_for_all=True)
    return status


def _train(args: argparse.Namespace, ckpt: dict | None, world: World, device: torch.device, out: Path) -> int:
    say = print if world.main else (lambda *a, **k: None)
    data = datasets.load(args.dataset, args.data_dir, device, args.download, normalization=args.normalize)
    n, batch = len(data.train_y), args.batch_size
    if n < batch and not args.keep_last_batch:
        raise FFNNError(f"--batch-size {batch} is larger than the training set ({n} images)")
    if batch < world.size:
        raise FFNNError(f"--batch-size {batch} cannot be split over {world.size} processes")
    hidden = [int(h) for h in args.hidden.split(",") if h]
    sizes = (data.num_features, *hidden, len(data.classes))
    model = build(args.impl, sizes, args.activation, seed=args.seed, device=device)
    use_graph = args.cuda_graph and device.type == "cuda" and world.size == 1 and not args.keep_last_batch
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

    steps = datasets.steps_per_epoch(n, batch, args.keep_last_batch)
    lo, hi = world.shard(batch)
    loss_sum = torch.zeros((), device=device)
    step = make_step(model, optimizer, loss_function(args.impl), data.train_x, data.train_y, loss_sum,
                     world, (hi - lo) / batch)
    if use_graph:
        step = capture_step(step, hi - lo, model, optimizer, device)

    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial_saves(out / CHECKPOINT)
    n_params = count_parameters(model)
    arch = describe(sizes, args.activation)
    optimizer_text = args.optimizer + (f" momentum {args.momentum}" if args.momentum else "") + (
        " nesterov" if args.nesterov else "")
    say(f"data: {data.name} from {data.source}: {n:,} training / {len(data.test_y):,} test images, "
        f"normalized: {args.normalize}")
    say(f"model: {arch}, {n_params:,} parameters, impl {args.impl}")
    say(f"training: {steps} steps of {batch} per epoch"
        + (" (the last one partial)" if steps * batch > n else "") + f" on {device}"
        + (f" ({machine_summary()})" if device.type == "cpu" else "")
        + (f" x {world.size} processes" if world.size > 1 else "")
        + f", {'CUDA graph' if use_graph else 'eager'}, {optimizer_text} lr {args.lr}, seed {args.seed}"
        + (f", resumed at epoch {start_epoch + 1} step {start_step}" if ckpt else ""))
    meta = {"args": vars(args), "model": arch, "parameters": n_params, "device": str(device),
            "machine": machine_summary() if device.type == "cpu" else torch.cuda.get_device_name(device),
            "world_size": world.size, "cuda_graph": use_graph, "data_source": data.source}

    def save(epoch: int, step_in_epoch: int, generator_state: torch.Tensor, loss_so_far: float) -> Path:
        return checkpoint.save({
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "arch": {"sizes": list(sizes), "activation": args.activation},
            "image_shape": list(data.image_shape), "classes": list(data.classes),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch, "step": step_in_epoch, "generator": generator_state,
            "partial_loss_sum": loss_so_far, "torch_rng": torch.get_rng_state(),
            "history": history, "args": vars(args),
        }, out / CHECKPOINT)

    show_bar = world.main and not args.quiet and sys.stderr.isatty()
    from tqdm import tqdm

    with StopRequest(enabled=world.size == 1) as stop:
        for epoch in range(start_epoch, args.epochs):
            epoch_start_state = generator.get_state()
            batches = datasets.epoch_batches(n, batch, generator, device, shard=(lo, hi) if world.size > 1 else None,
                                             keep_last=args.keep_last_batch)
            first = start_step if epoch == start_epoch else 0
            loss_sum.fill_(partial_loss if epoch == start_epoch else 0.0)
            done = first
            t0 = time.perf_counter()
            with tqdm(total=len(batches) - first, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                      leave=False, disable=not show_bar, dynamic_ncols=True) as bar:
                for idx in calls(batches[first:], step.steps_per_call):
                    if stop.requested:
                        break
                    step(idx)
                    ran = 1 if idx.dim() == 1 else len(idx)
                    done += ran
                    bar.update(ran)
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
            samples = min(done * batch, n) - first * batch
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_loss": ev.loss,
                            "test_accuracy": ev.accuracy, "samples_per_s": samples / seconds,
                            "epoch_seconds": seconds})
            h = history[-1]
            say(f"epoch {epoch + 1}/{args.epochs}  train loss {train_loss:.4f}  test loss {ev.loss:.4f}  "
                f"test acc {100 * ev.accuracy:.2f}%  {h['samples_per_s']:,.0f} samples/s  ({seconds:.2f} s)", flush=True)
            if world.main:
                _write_metrics(out, meta, history)
                save(epoch + 1, 0, generator.get_state(), 0.0)
            if stop.requested:
                say(f"interrupted after epoch {epoch + 1}: saved {out / CHECKPOINT}")
                return INTERRUPTED

    if world.main and history:
        plots.loss_curves(history, out / "loss.png", title=f"{arch} on {data.name}, impl {args.impl}")
        x, y = data.test_x[:SAMPLE_IMAGES], data.test_y[:SAMPLE_IMAGES]
        with torch.no_grad():
            predictions = model(x).argmax(1).tolist()
        plots.sample_grid(x.view(-1, *data.image_shape), y.tolist(), predictions, data.classes, out / "samples.png",
                          value_range=datasets.NORMALIZATIONS[args.normalize])
        last = history[-1]
        say(f"done: test accuracy {100 * last['test_accuracy']:.2f}% after {plural(last['epoch'], 'epoch')}; "
            f"wrote {out / CHECKPOINT}, metrics.json, metrics.csv, loss.png, samples.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
