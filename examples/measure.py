"""Runs every tutorial example in full on this library and on plain PyTorch, in turn, and prints
the README's table of training time and result (the examples' own output is hidden).

    python -m examples.measure --dataset fashion-mnist [--only mnist_mlp,mnist_nll] [--repeat 3]

Each example runs --repeat times each way, the two ways taking turns (which one goes first
alternates), so that a machine whose speed drifts slows both alike: the times are the medians and
the speed-up is the median of the per-turn ratios. Short examples take more turns, until each way
has trained for --min-seconds in all: a toy network's run lasts a tenth of a second, shorter than
the slow and quick spells of a shared host, and three of them say little.
"""
import argparse
import contextlib
import importlib
import io
import statistics

# example: (what it trains, whether it trains on --dataset, how its result reads)
SYSTEMS = {
    "one_layer": ("784-10 (one layer), Adam 1e-3, batch 100, 5 epochs, pixels in [0, 1]", True,
                  lambda r: f"{100 * r['accuracy']:.2f} %"),
    "toy_sigmoid": ("1-2-1 sigmoid, one sample, MSE, SGD lr 0.5, 500 steps", False,
                    lambda r: f"output {r['output']:.4f} (target 0)"),
    "regression": ("3-5-1 ReLU regression, MSE, SGD lr 0.01, 1000 full-batch steps", False,
                   lambda r: f"MSE {r['losses'][-1]:.4f}"),
    "mnist_mlp": ("784-128-64-10 ReLU, Adam 1e-3, batch 64, 5 epochs", True,
                  lambda r: f"{100 * r['accuracy']:.2f} %"),
    "mnist_mlp_sgd": ("784-512-128-10 ReLU, SGD lr 0.01 momentum 0.9, batch 64, 10 epochs", True,
                      lambda r: f"{100 * r['accuracy']:.2f} %"),
    "mnist_nll": ("784-128-64-10 ReLU, log_softmax + NLLLoss, Adam 3e-3, batch 64, 15 epochs", True,
                  lambda r: f"{100 * r['accuracy']:.2f} %"),
}


MAX_TURNS = 101


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", help="for the examples that train on images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=",".join(SYSTEMS), help="comma-separated examples (default: all)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each example each way, taking turns (default 3)")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="more turns until each way has trained this long in all (default 2; at most "
                        f"{MAX_TURNS} turns)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.min_seconds < 0:
        p.error("--min-seconds must not be negative")
    print("| tutorial system | command | training time: ours | plain PyTorch | speed-up | result: ours | plain PyTorch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.only.split(","):
        what, on_images, result = SYSTEMS[name]
        data = ["--dataset", args.dataset] if on_images else []
        runs = {"fused": [], "torch": []}
        turn = 0
        while turn < args.repeat or (turn < MAX_TURNS and min(sum(r["seconds"] for r in done) for done in runs.values())
                                     < args.min_seconds):
            for impl in ("fused", "torch") if turn % 2 == 0 else ("torch", "fused"):
                with contextlib.redirect_stdout(io.StringIO()):
                    runs[impl].append(importlib.import_module(f"examples.{name}").main(
                        ["--device", args.device, *data, "--impl", impl]))
            turn += 1
        seconds = {impl: [r["seconds"] for r in done] for impl, done in runs.items()}
        speedup = statistics.median(t / f for f, t in zip(seconds["fused"], seconds["torch"]))
        command = f"`python -m examples.{name}{''.join(' ' + a for a in data)}`"
        print(f"| {what} | {command} | {statistics.median(seconds['fused']):.2f} s | "
              f"{statistics.median(seconds['torch']):.2f} s | {speedup:.2f}x | {result(runs['fused'][0])} | "
              f"{result(runs['torch'][0])} |", flush=True)


if __name__ == "__main__":
    main()
