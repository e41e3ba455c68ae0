"""End to end: one epoch of the MNIST MLP (784-128-64-10, batch 64, Adam lr 1e-3) and the test
accuracy it reaches, for the tutorial-style loop, PyTorch's faster ways to run it, and ffnn.

Peers, all from the same initial weights:
* tutorial DataLoader loop: a torchvision-style Dataset (PIL image + ToTensor + Normalize per
  sample), DataLoader(shuffle=True), nn.CrossEntropyLoss, torch.optim.Adam, loss.item() per step;
* resident eager: the dataset as one normalised tensor on the device, batches by index_select,
  nn.Linear + F.cross_entropy + torch.optim.Adam(fused=True): ffnn.train's loop with --impl torch;
* torch.compile: the same with gather + forward + loss compiled;
* CUDA graph of torch ops (CUDA only): the resident eager step captured whole, as ffnn.train does;
* ours: ffnn.train's step with FusedLinear, cross_entropy and FusedAdam (a CUDA graph on CUDA;
  on the CPU kernels.MLPStep, forward, loss and backward in one native call).

On the CPU more cases time the resident eager loop and ours side by side: with one thread, and
with the default threads beside one competing busy process (a loaded machine: the thread pools
must degrade no worse than PyTorch's own). ``python -m benchmarks.run --isa avx2`` runs all of it
as an AVX2-only CPU would.

The resident loops of a case run their epochs in turns (eager's first epoch, compile's, ours,
then the second of each, in an order that rotates), so that a machine whose speed drifts slows
them alike. The time is the median over the epochs after the first (which includes compilation,
autotuning and capture), and ``ours faster by`` the median over those epochs of the peer's epoch
/ ours in the same turn; the accuracy table below the timings gives the first epoch too.

"The same accuracy" is judged over seeds, not on one run: a seeded run's trajectory follows its
roundings, and two trainings that sum in different orders end some tenths of a point apart
either way. The last table trains the resident eager loop and ours for the timed cases' epochs
from ACCURACY_SEEDS seeds (each seed: the same initial weights and batch order for both) and
gives the mean of the per-seed differences with its standard error.
"""
from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.harness import OURS, Results, error_note, in_turn, setting
from ffnn import data as datasets
from ffnn.errors import FFNNError
from ffnn.evaluate import evaluate_model
from ffnn.model import build, loss_function
from ffnn.step import World, calls, capture_step, make_optimizer, make_step

BATCH, LR, SEED = 64, 1e-3, 0
ACCURACY_SEEDS = 10  # 2 in a --quick run
EAGER = "resident eager + fused Adam"


class E2EResults(Results):
    """Results with a second table: epochs run, first-epoch time and final test accuracy."""

    def markdown(self) -> str:
        lines = ["", "| case | impl | epochs | first epoch | test accuracy |", "|---|---|---:|---:|---:|"]
        for r in self.meta.get("runs", []):
            lines.append(f"| {r['case']} | {r['impl']} | {r['epochs']} | {r['first_epoch_s']:.3f} s | "
                         f"{100 * r['test_accuracy']:.2f}% |")
        for seeds in self.meta.get("accuracy_over_seeds", []):
            lines += ["", *accuracy_table(seeds)]
        return super().markdown() + "\n".join(lines) + "\n"


def accuracy_table(seeds: dict) -> list[str]:
    """Markdown lines of one case's accuracy over seeds (``seeds``: case, epochs, and per seed the
    test accuracy of EAGER and OURS): a row per seed, then the means and the mean difference of
    ours minus eager, with its standard error, in points."""
    rows = seeds["rows"]
    eager = [100 * r[EAGER] for r in rows]
    ours = [100 * r[OURS] for r in rows]
    differences = [o - e for o, e in zip(ours, eager)]
    error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    lines = [f"{seeds['case']}: test accuracy after {seeds['epochs']} epochs from {len(rows)} seeds",
             "", f"| seed | {EAGER} | {OURS} | ours - eager |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {e:.2f}% | {o:.2f}% | {d:+.2f} |" for r, e, o, d in zip(rows, eager, ours, differences)]
    lines.append(f"| mean | {statistics.mean(eager):.2f}% | {statistics.mean(ours):.2f}% | "
                 f"{statistics.mean(differences):+.2f} (standard error {error:.2f}) |")
    return lines


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _resident(impl: str, data: datasets.Data, device: torch.device, graph: bool = False, compiled: bool = False,
              seed: int = SEED):
    """(model, step(idx), loss_sum) of the device-resident loop, built as ffnn.train builds it."""
    model = build(impl, (data.num_features, 128, 64, len(data.classes)), seed=seed, device=device)
    args = SimpleNamespace(lr=LR, weight_decay=None, impl=impl, optimizer="adam")
    optimizer = make_optimizer(args, model.parameters(), capturable=graph)
    loss_sum = torch.zeros((), device=device)
    if compiled:
        x_all, y_all, params = data.train_x, data.train_y, list(model.parameters())
        loss_of = torch.compile(lambda idx: F.cross_entropy(model(x_all.index_select(0, idx)), y_all.index_select(0, idx)))

        def step(idx):
            loss = loss_of(idx)
            loss.backward()
            optimizer.step()
            for p in params:
                p.grad = None
            loss_sum.add_(loss.detach())

        step.steps_per_call = 1
    else:
        step = make_step(model, optimizer, loss_function(impl), data.train_x, data.train_y, loss_sum, World(), 1.0)
        if graph:
            step = capture_step(step, BATCH, model, optimizer, device)
    return model, step, loss_sum


def _resident_epochs(step, loss_sum, data: datasets.Data, device: torch.device, seed: int = SEED):
    """The loop's epochs, one per ``next()``: yields each one's seconds (a generator, so that the
    epochs of several implementations can take turns)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        batches = datasets.epoch_batches(len(data.train_y), BATCH, generator, device)
        _sync(device)
        t0 = time.perf_counter()
        for idx in calls(batches, step.steps_per_call):
            step(idx)
        loss_sum.item()
        yield time.perf_counter() - t0


def _interleaved(loops: dict[str, object], epochs: int) -> dict[str, list[float]]:
    """Runs ``epochs`` epochs of each loop (from _resident_epochs), the loops taking turns epoch by
    epoch in an order that rotates, so a machine whose speed drifts slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    for e in range(epochs):
        for name in in_turn(list(loops), e):
            times[name].append(next(loops[name]))
    return times


def _tutorial(data: datasets.Data, device: torch.device, epochs: int):
    """The seed tutorials' loop, from the raw uint8 images through PIL and transforms per sample."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class IDXImages(Dataset):  # what torchvision.datasets.MNIST's __getitem__ does
        def __init__(self, images, labels, transform):
            self.images, self.labels, self.transform = images, labels, transform

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return self.transform(Image.fromarray(self.images[i].numpy(), mode="L")), int(self.labels[i])

    images, labels = datasets.read_split(data.source, "train")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    loader = DataLoader(IDXImages(images, labels, transform), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(SEED))
    model = build("torch", (data.num_features, 128, 64, len(data.classes)), seed=SEED, device=device)
    criterion, optimizer = torch.nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=LR)
    times = []
    for _ in range(epochs):
        running_loss = 0.0
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        times.append(time.perf_counter() - t0)
    return model, times


def _accuracy_over_seeds(case: str, data: datasets.Data, device: torch.device, epochs: int, seeds: int,
                         graph: bool) -> dict:
    """The test accuracy of the resident eager loop and of ours after ``epochs`` epochs, from
    seeds 0 .. seeds - 1 (for accuracy_table)."""
    rows = []
    for seed in range(seeds):
        row = {"seed": seed}
        for impl_name, impl, graphed in ((EAGER, "torch", False), (OURS, "fused", graph)):
            model, step, loss_sum = _resident(impl, data, device, graph=graphed, seed=seed)
            loop = _resident_epochs(step, loss_sum, data, device, seed=seed)
            for _ in range(epochs):
                next(loop)
            row[impl_name] = evaluate_model(model, data.test_x, data.test_y, F.cross_entropy,
                                            len(data.classes)).accuracy
        rows.append(row)
    return {"case": case, "epochs": epochs, "rows": rows}


@contextlib.contextmanager
def _busy_process():
    """One other process spinning on a core while the block runs."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it start spinning
        yield
    finally:
        busy.kill()
        busy.wait()


def _threads(n: int):
    return setting(torch.get_num_threads, torch.set_num_threads, n)


def _datasets() -> list[str]:
    """fashion-mnist (Debian's dataset-fashion-mnist), and MNIST where its files are present."""
    present = []
    for name in ("fashion-mnist", "mnist"):
        try:
            datasets.locate(name, download=False)
            present.append(name)
        except FFNNError:
            pass
    if not present:
        raise FFNNError("no dataset for the e2e benchmark: `apt-get install dataset-fashion-mnist`, or put "
                        f"MNIST's IDX files into ./{datasets.DEFAULT_DATA_DIR}")
    return present


def run(device: torch.device, quick: bool = False) -> Results:
    results = E2EResults("e2e", str(device))
    results.meta["runs"] = []
    results.meta["per"] = "epoch"
    epochs = 2 if quick else 5
    on_cuda = device.type == "cuda"
    for name in _datasets():
        data = datasets.load(name, device=device, download=False)
        steps = len(data.train_y) // BATCH
        case = f"{name}: epoch of {steps} steps x {BATCH}"

        def record(impl: str, model, times: list[float], samples: int = steps * BATCH,
                   ours: list[float] | None = None) -> None:
            """One row: the median of the epochs after the first; with ``ours`` (our epochs, taken
            in turns with these), the median over those epochs of this epoch's time / ours."""
            accuracy = evaluate_model(model, data.test_x, data.test_y, F.cross_entropy, len(data.classes)).accuracy
            warm = statistics.median(times[1:]) if len(times) > 1 else times[0]
            speedup = None
            if ours is not None and ours is not times and len(times) > 1:
                speedup = statistics.median(t / mine for t, mine in zip(times[1:], ours[1:]))
            results.add(case, impl, warm, work=samples, unit="samples/s", speedup=speedup)
            results.meta["runs"].append({"case": case, "impl": impl, "epochs": len(times), "first_epoch_s": times[0],
                                         "epoch_s": times, "test_accuracy": accuracy})
            print(f"  {case} | {impl}: epochs {', '.join(f'{t:.3f}' for t in times)} s, "
                  f"test accuracy {100 * accuracy:.2f}%", flush=True)

        def run_interleaved(peers: list[tuple[str, str, bool, bool]], epochs: int) -> None:
            """The resident loops of ``peers`` (name, impl, CUDA graph, compiled), epochs in turns."""
            models, loops = {}, {}
            for impl_name, impl, graph, compiled in peers:
                try:
                    model, step, loss_sum = _resident(impl, data, device, graph=graph, compiled=compiled)
                    models[impl_name], loops[impl_name] = model, _resident_epochs(step, loss_sum, data, device)
                except Exception as e:  # a peer that cannot run is a result, not a crash
                    results.add(case, impl_name, None, note=error_note(e))
            times = _interleaved(loops, epochs)
            for impl_name, model in models.items():
                record(impl_name, model, times[impl_name], ours=times.get(OURS))

        model, times = _tutorial(data, device, 1 if quick and not on_cuda else epochs)
        record("tutorial DataLoader loop", model, times, samples=len(data.train_y))
        peers = [(EAGER, "torch", False, False),
                 ("torch.compile", "torch", False, True)]
        if on_cuda:
            peers.append(("CUDA graph of torch ops", "torch", True, False))
        peers.append((OURS, "fused", on_cuda, False))
        run_interleaved(peers, epochs)
        results.meta.setdefault("accuracy_over_seeds", []).append(
            _accuracy_over_seeds(case, data, device, epochs, 2 if quick else ACCURACY_SEEDS, graph=on_cuda))
        print("\n".join(accuracy_table(results.meta["accuracy_over_seeds"][-1])), flush=True)
        if on_cuda:
            continue
        for case, context in ((f"{case}, 1 thread", _threads(1)), (f"{case}, beside one busy process", _busy_process())):
            with context:
                run_interleaved([(EAGER, "torch", False, False), (OURS, "fused", False, False)],
                                2 if quick else 3)
    return results
