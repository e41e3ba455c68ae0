"""ffnn end to end on a tiny synthetic MNIST-format dataset written by the tests.

Every class c draws a bright 6x6 square at its own place on a noisy background, so a 784-32-10
MLP learns it in a couple of epochs. Runs call the commands' main(argv) in-process, except the
Ctrl-C test (a real `python -m ffnn.train` subprocess) and the torchrun test.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ffnn
from ffnn import checkpoint, data as datasets, evaluate, predict, step as steps, train
from ffnn.errors import FFNNError
from ffnn.model import MLP, TorchMLP, sizes_from_state_dict

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 256, 64
# small and quick: batch 16 gives 16 steps per epoch
RUN = ["--hidden", "32", "--batch-size", "16", "--lr", "3e-3", "--epochs", "2", "--quiet", "--device", "cpu"]


def _write_idx(path: Path, array: torch.Tensor, gz: bool) -> None:
    header = struct.pack(f">BBBB{array.dim()}i", 0, 0, 0x08, array.dim(), *array.shape)
    raw = header + array.to(torch.uint8).contiguous().numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw, compresslevel=1)
    path.write_bytes(raw)


def _synthetic(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 80, (n, 28, 28), generator=g)
    for i, c in enumerate(labels.tolist()):
        r, col = 4 + 12 * (c // 5), 1 + 5 * (c % 5)
        images[i, r:r + 6, col:col + 6] = 230
    return images, labels


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The four IDX files; training ones gzipped, test ones not (both forms are read)."""
    d = tmp_path_factory.mktemp("idx")
    g = torch.Generator().manual_seed(1)
    for split, n, gz in (("train", N_TRAIN, True), ("t10k", N_TEST, False)):
        images, labels = _synthetic(n, g)
        _write_idx(d / f"{split}-images-idx3-ubyte", images, gz)
        _write_idx(d / f"{split}-labels-idx1-ubyte", labels, gz)
    return d


def _train(out: Path, data_dir: Path, *extra: str) -> dict:
    assert train.main([*RUN, "--data-dir", str(data_dir), "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _weights(out: Path) -> dict:
    return checkpoint.load(out / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """One 2-epoch run per impl from seed 0, shared by the tests that read their outputs."""
    root = tmp_path_factory.mktemp("runs")
    for impl in ("fused", "torch"):
        _train(root / impl, data_dir, "--impl", impl)
    return {impl: root / impl for impl in ("fused", "torch")}


# --- model -----------------------------------------------------------------------------------

def test_mlp_is_the_tutorial_network_with_fused_layers():
    torch.manual_seed(0)
    fused, plain = MLP(), TorchMLP()
    assert ffnn.count_parameters(fused) == ffnn.count_parameters(plain) == 109_386
    assert list(fused.state_dict()) == [f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    assert all(type(m).__name__ == "FusedLinear" for m in (fused.fc1, fused.fc2, fused.fc3))

    class NeuralNetwork(nn.Module):  # the tutorials' model, verbatim
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(28 * 28, 128), nn.Linear(128, 64), nn.Linear(64, 10)

        def forward(self, x):
            x = x.view(-1, 28 * 28)
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    tutorial = NeuralNetwork()
    fused.load_state_dict(tutorial.state_dict())
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(fused(x), tutorial(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(x.view(8, 784)), tutorial(x), rtol=1e-5, atol=1e-5)
    tutorial2 = NeuralNetwork()
    tutorial2.load_state_dict(fused.state_dict())  # and back
    torch.testing.assert_close(tutorial2(x), tutorial(x))


def test_both_impls_start_from_the_same_weights():
    a = ffnn.build_model("fused", (784, 32, 10), seed=3).state_dict()
    b = ffnn.build_model("torch", (784, 32, 10), seed=3).state_dict()
    c = ffnn.build_model("torch", (784, 32, 10), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_training_steps_on_the_triton_kernels_match_pytorch(monkeypatch):
    """ffnn's step on the GPU's kernels (Triton, interpreted when there is no GPU) against torch."""
    from types import SimpleNamespace

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = torch.randn(24, 784, device=device), torch.randint(0, 10, (24,), device=device)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")  # what the fused impl runs on; torch's ignores it
    weights = {}
    for impl in ("fused", "torch"):
        model = ffnn.build_model(impl, (784, 16, 10), seed=0, device=device)
        args = SimpleNamespace(lr=1e-2, weight_decay=None, impl=impl, optimizer="adam")
        optimizer = steps.make_optimizer(args, model.parameters(), capturable=False)
        loss_sum = torch.zeros((), device=device)
        step = steps.make_step(model, optimizer, ffnn.model.loss_function(impl), x, y, loss_sum, steps.World(), 1.0)
        for i in range(3):
            step(torch.arange(8 * i, 8 * i + 8, device=device))
        weights[impl] = (model.state_dict(), loss_sum.item())
    assert weights["fused"][1] == pytest.approx(weights["torch"][1], rel=1e-5)
    for k, v in weights["torch"][0].items():
        torch.testing.assert_close(weights["fused"][0][k], v, rtol=1e-4, atol=1e-4)


def test_sizes_from_state_dict_rejects_other_models():
    assert sizes_from_state_dict(TorchMLP((784, 128, 64, 10)).state_dict()) == (784, 128, 64, 10)
    with pytest.raises(FFNNError, match="unexpected key 'conv1.weight'"):
        sizes_from_state_dict({"conv1.weight": torch.zeros(8, 1, 3, 3), "fc1.weight": torch.zeros(10, 8)})
    with pytest.raises(FFNNError, match="fc2.weight has shape"):
        sizes_from_state_dict({"fc1.weight": torch.zeros(16, 784), "fc2.weight": torch.zeros(10, 15)})


# --- data ------------------------------------------------------------------------------------

def test_idx_files_read_gzipped_or_not(data_dir):
    d = datasets.load("mnist", data_dir)
    assert d.train_x.shape == (N_TRAIN, 784) and d.test_x.shape == (N_TEST, 784)
    assert d.train_x.dtype == torch.float32 and d.train_y.dtype == torch.long
    raw = datasets.read_idx(data_dir / "t10k-images-idx3-ubyte")
    # normalised once, exactly as the tutorials' ToTensor() + Normalize((0.5,), (0.5,))
    torch.testing.assert_close(d.test_x, ((raw.float() / 255 - 0.5) / 0.5).view(N_TEST, 784), rtol=0, atol=0)
    assert d.image_shape == (28, 28) and d.classes[3] == "3"


def test_epoch_batches_drop_the_last_partial_batch_and_follow_the_seed():
    a = datasets.epoch_batches(60_000, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = datasets.epoch_batches(60_000, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert len(a) == 937 and a[0].shape == (64,)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(torch.cat(a).unique()) == 937 * 64
    halves = [datasets.epoch_batches(100, 10, torch.Generator().manual_seed(5), torch.device("cpu"), shard=s)
              for s in ((0, 5), (5, 10))]
    whole = datasets.epoch_batches(100, 10, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert all(torch.equal(torch.cat([h0, h1]), w) for h0, h1, w in zip(*halves, whole))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x08\x03" + b[2:], "not an IDX file"),
    (lambda b: b[:-100], "truncated or corrupt"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "element type 0x0d is not supported"),
    (lambda b: b"", "not an IDX file"),
])
def test_corrupt_idx_files_are_named_in_the_error(tmp_path, data_dir, damage, message):
    for f in data_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    target = tmp_path / "t10k-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(FFNNError, match=message) as e:
        datasets.load("mnist", tmp_path)
    assert str(target) in str(e.value)


def test_idx_with_mismatched_counts(tmp_path, data_dir):
    for f in data_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.zeros(N_TEST - 1), gz=False)
    with pytest.raises(FFNNError, match=f"holds {N_TEST} images but .* holds {N_TEST - 1} labels"):
        datasets.load("mnist", tmp_path)


def test_missing_data_dir_says_what_to_do(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert train.main([*RUN, "--data-dir", str(missing), "--no-download", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffnn-train: error: no mnist data: looked for train-images-idx3-ubyte[.gz]")
    assert f"in {missing}, {missing / 'MNIST' / 'raw'}, and downloading is off (--no-download)" in err
    assert "--data-dir" in err and "--dataset fashion-mnist" in err and err.count("\n") == 1


def test_failed_download_says_what_to_do_in_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def offline(dataset, directory, files):
        (directory / files[0]).write_bytes(b"partial")  # what an interrupted download leaves
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                           "<urlopen error [Errno -3] Temporary failure in name resolution>\n")

    monkeypatch.setattr(datasets, "_torchvision_download", offline)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "package-not-installed")
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "dta"
    for data_dir in (typo, None):  # a mistyped --data-dir, and the default ./data
        with pytest.raises(FFNNError) as e:
            datasets.load("fashion-mnist", data_dir)
        message = str(e.value)
        assert "\n" not in message
        assert "download failed (RuntimeError: <urlopen error [Errno -3] Temporary failure" in message
        assert "train-images-idx3-ubyte[.gz]" in message and "apt-get install -y dataset-fashion-mnist" in message
    assert list(tmp_path.iterdir()) == []  # no ./data, no dta/FashionMNIST/raw


def test_nothing_is_downloaded_into_a_system_dataset_directory(tmp_path, monkeypatch):
    def must_not_download(dataset, directory, files):
        raise AssertionError("downloaded")

    monkeypatch.setattr(datasets, "_torchvision_download", must_not_download)
    monkeypatch.setattr(datasets, "SYSTEM_DATASETS", tmp_path)
    empty_package_dir = tmp_path / "fashion-mnist"
    empty_package_dir.mkdir()
    with pytest.raises(FFNNError, match="nothing is downloaded into"):
        datasets.load("fashion-mnist", empty_package_dir)
    assert list(empty_package_dir.iterdir()) == []


def test_a_download_fetches_only_the_files_a_command_needs(tmp_path, data_dir, monkeypatch):
    fetched = []

    def mirror(dataset, directory, files):
        fetched.extend(files)
        for name in files:
            (directory / name).write_bytes((data_dir / name).read_bytes())

    monkeypatch.setattr(datasets, "_torchvision_download", mirror)  # data_dir's test files are not gzipped
    d = datasets.load("mnist", tmp_path / "new", splits=("test",))
    assert fetched == list(datasets.SPLIT_FILES["test"]) and len(d.test_y) == N_TEST and len(d.train_y) == 0
    assert sorted(p.name for p in (tmp_path / "new" / "MNIST" / "raw").iterdir()) == sorted(fetched)


# --- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_training_lowers_the_loss_and_writes_its_outputs(runs, impl):
    out = runs[impl]
    metrics = json.loads((out / "metrics.json").read_text())
    first, last = metrics["epochs"]
    assert last["train_loss"] < first["train_loss"] < 2.0 and last["test_loss"] < first["test_loss"]
    assert last["test_accuracy"] > 0.5 and last["samples_per_s"] > 0
    assert metrics["parameters"] == 784 * 32 + 32 + 32 * 10 + 10
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss,test_loss,test_accuracy,samples_per_s") and len(csv_lines) == 3
    for png in ("loss.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (2, 0) and ckpt["args"]["impl"] == impl
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temporaries


def test_fused_and_torch_runs_agree(runs):
    fused, plain = (json.loads((runs[i] / "metrics.json").read_text())["epochs"] for i in ("fused", "torch"))
    for f, p in zip(fused, plain):
        assert f["train_loss"] == pytest.approx(p["train_loss"], rel=1e-4)
        assert f["test_loss"] == pytest.approx(p["test_loss"], rel=1e-4)
    a, b = _weights(runs["fused"]), _weights(runs["torch"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_resume_gives_the_uninterrupted_weights(runs, data_dir, tmp_path):
    out = tmp_path / "run"
    _train(out, data_dir, "--impl", "fused", "--epochs", "1")
    metrics = _train(out, data_dir, "--resume", str(out / "checkpoint.pt"))
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    resumed, whole = _weights(out), _weights(runs["fused"])
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_stop_mid_epoch_saves_the_position_and_resumes_exactly(runs, data_dir, tmp_path, monkeypatch):
    """What Ctrl-C does, deterministically: the stop request arrives before step 6 of epoch 2 (the
    native CPU step here runs 5 steps a call: calls of 5, 5, 5 and 1 of the epoch's 16)."""

    class StopAtSixthStepOfEpochTwo(train.StopRequest):
        checks = 0  # one check per call, and one after each epoch

        @property
        def requested(self):
            type(self).checks += 1
            return self.checks > 4 + 1 + 1

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(train, "StopRequest", StopAtSixthStepOfEpochTwo)
    monkeypatch.setattr(steps, "STEPS_PER_CALL", 5)
    out = tmp_path / "run"
    assert train.main([*RUN, "--data-dir", str(data_dir), "--impl", "fused", "--out", str(out)]) == train.INTERRUPTED
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"], len(ckpt["history"])) == (1, 5, 1)
    monkeypatch.undo()
    metrics = _train(out, data_dir, "--resume", str(out / "checkpoint.pt"))
    whole = json.loads((runs["fused"] / "metrics.json").read_text())["epochs"]
    assert metrics["epochs"][1]["train_loss"] == pytest.approx(whole[1]["train_loss"], rel=1e-6)
    resumed, uninterrupted = _weights(out), _weights(runs["fused"])
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


def test_resume_rejects_another_architecture(runs, capsys):
    ckpt = str(runs["fused"] / "checkpoint.pt")
    assert train.main(["--resume", ckpt, "--hidden", "64", "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--hidden 64 does not match the checkpoint" in err and "--hidden 32" in err
    assert "another architecture" in err


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(data_dir, tmp_path):
    """A real `python -m ffnn.train` process gets SIGINT mid-run, saves and exits; resuming it
    ends with exactly the weights of a run that was never interrupted."""
    args = [*RUN, "--data-dir", str(data_dir), "--impl", "fused", "--epochs", "40"]
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "ffnn.train", *args, "--out", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.INTERRUPTED, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert ckpt["epoch"] < 40
    assert train.main(["--resume", str(out / "checkpoint.pt"), "--quiet", "--device", "cpu"]) == 0
    whole = tmp_path / "whole"
    _train(whole, data_dir, "--impl", "fused", "--epochs", "40")
    a, b = _weights(out), _weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(runs, data_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "ffnn.train", *RUN, "--data-dir", str(data_dir), "--impl", "fused", "--out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    # both streams: where a rank stopped (its epochs on stdout) and why (stderr)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-1500:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 2/2") == 1  # rank 0 logs alone
    a, b = _weights(out), _weights(runs["fused"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    one, two = (json.loads((o / "metrics.json").read_text())["epochs"] for o in (runs["fused"], out))
    assert two[-1]["train_loss"] == pytest.approx(one[-1]["train_loss"], rel=1e-5)


# --- the training step ---------------------------------------------------------------------

@pytest.mark.parametrize("impl, optimizer", [("fused", "adam"), ("torch", "adam"), ("fused", "sgd"), ("torch", "sgd")])
def test_gradient_addresses_never_change_across_steps(impl, optimizer):
    """What a CUDA graph replays and FusedAdam's address table hold: every .grad is a view of one
    flat buffer, zeroed in place by the step, never replaced."""
    from types import SimpleNamespace

    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    model = ffnn.build_model(impl, (784, 16, 10), seed=0)
    args = SimpleNamespace(lr=1e-2, weight_decay=None, impl=impl, optimizer=optimizer, momentum=0.9, nesterov=False)
    opt = steps.make_optimizer(args, model.parameters(), capturable=False)
    step = steps.make_step(model, opt, ffnn.model.loss_function(impl), x, y, torch.zeros(()), steps.World(), 1.0)
    params = list(model.parameters())
    addresses = None
    for i in range(4):
        step(torch.arange(8 * i, 8 * i + 8))
        now = [p.grad.data_ptr() for p in params]
        assert addresses is None or now == addresses
        addresses = now
    flat_start = addresses[0]
    assert addresses == [flat_start + 4 * sum(p.numel() for p in params[:i]) for i in range(len(params))]
    # the step zeroes the buffer rather than accumulating: the last gradient is the last batch's alone
    model.zero_grad(set_to_none=False)
    ffnn.model.loss_function(impl)(model(x[24:32]), y[24:32]).backward()
    expected = [p.grad.clone() for p in params]
    step(torch.arange(24, 32))
    assert all(torch.allclose(p.grad, e, atol=1e-6) for p, e in zip(params, expected))


def _plain_pytorch_run(data_dir: Path, sizes, make_optimizer, batch: int, epochs: int, keep_last: bool,
                       normalization: str = "tutorial") -> dict:
    """The training loop written as the tutorials write it (nn.Linear, F.cross_entropy, a
    non-fused torch.optim), on the batches ffnn.train draws: its final weights."""
    data = datasets.load("mnist", data_dir, normalization=normalization)
    model = ffnn.build_model("torch", sizes, seed=0)
    opt = make_optimizer(model.parameters())
    generator = torch.Generator().manual_seed(0)
    n = len(data.train_y)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        batches = perm.split(batch) if keep_last else perm[: n // batch * batch].split(batch)
        for idx in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            opt.step()
    return model.state_dict()


SGD_RUN = ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--nesterov", "--weight-decay", "1e-3"]


def _assert_weights_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


def test_sgd_with_nesterov_momentum_matches_plain_pytorch(data_dir, tmp_path):
    out = tmp_path / "sgd"
    _train(out, data_dir, "--impl", "torch", *SGD_RUN)
    expected = _plain_pytorch_run(data_dir, (784, 32, 10), lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False), batch=16, epochs=2, keep_last=False)
    _assert_weights_close(_weights(out), expected)
    args = checkpoint.load(out / "checkpoint.pt")["args"]
    assert (args["optimizer"], args["momentum"], args["nesterov"]) == ("sgd", 0.9, True)


def test_fused_sgd_matches_plain_pytorch(data_dir, tmp_path):
    out = tmp_path / "sgd"
    _train(out, data_dir, "--impl", "fused", *SGD_RUN)
    expected = _plain_pytorch_run(data_dir, (784, 32, 10), lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, foreach=False), batch=16, epochs=2, keep_last=False)
    _assert_weights_close(_weights(out), expected, tol=1e-4)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_keep_last_batch_trains_on_every_image_like_a_dataloader(data_dir, tmp_path, capsys, impl):
    """Also on the native CPU step, which takes the batches several a call: the partial last one
    in a call of its own."""
    out = tmp_path / "keep"
    _train(out, data_dir, "--impl", impl, "--batch-size", "24", "--keep-last-batch", "--hidden", "",
           "--normalize", "unit", "--optimizer", "adam")
    printed = capsys.readouterr().out
    assert "11 steps of 24 per epoch (the last one partial)" in printed  # 256 = 10 x 24 + 16
    assert "model: MLP 784-10 (no hidden layer)" in printed
    expected = _plain_pytorch_run(data_dir, (784, 10), lambda p: torch.optim.Adam(p, lr=3e-3, foreach=False),
                                  batch=24, epochs=2, keep_last=True, normalization="unit")
    _assert_weights_close(_weights(out), expected)


def test_calls_group_batches_of_one_size():
    b = [torch.arange(i * 4, i * 4 + 4) for i in range(5)] + [torch.tensor([99, 98])]
    assert [tuple(c.shape) for c in steps.calls(b, 2)] == [(2, 4), (2, 4), (4,), (2,)]
    assert [tuple(c.shape) for c in steps.calls(b, 16)] == [(5, 4), (2,)]
    assert [tuple(c.shape) for c in steps.calls(b, 1)] == [(4,)] * 5 + [(2,)]
    assert torch.equal(torch.cat([c.reshape(-1) for c in steps.calls(b, 3)]), torch.cat(b))
    assert list(steps.calls([], 16)) == []


def test_normalization_is_recorded_and_used_by_evaluate_and_predict(data_dir, tmp_path, capsys):
    out = tmp_path / "unit"
    metrics = _train(out, data_dir, "--normalize", "unit")
    assert checkpoint.load(out / "checkpoint.pt")["args"]["normalize"] == "unit"
    d = datasets.load("mnist", data_dir, normalization="unit")
    assert 0 <= d.train_x.min() and d.train_x.max() <= 1
    torch.testing.assert_close(datasets.load("mnist", data_dir, normalization="none").train_x, d.train_x * 255)
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", str(out / "checkpoint.pt"), "--device", "cpu"]) == 0
    assert f"accuracy:   {100 * metrics['epochs'][-1]['test_accuracy']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--impl", "torch", "--optimizer", "sgd", "--momentum", "0.5", "--keep-last-batch",
                                        "--batch-size", "24", "--normalize", "none", "--lr", "1e-4"]])
def test_resume_keeps_the_run_settings(data_dir, tmp_path, extra, capsys):
    whole, half = tmp_path / "whole", tmp_path / "half"
    _train(whole, data_dir, *extra)
    _train(half, data_dir, *extra, "--epochs", "1")
    assert train.main(["--resume", str(half / "checkpoint.pt"), "--epochs", "2", "--quiet"]) == 0
    _assert_weights_close(_weights(half), _weights(whole), tol=0)
    if extra:
        assert train.main(["--resume", str(half / "checkpoint.pt"), "--epochs", "3", "--momentum", "0.9"]) == 2
        assert "--momentum 0.9 does not match the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr: must be a finite number >= 0"),
    (["--lr", "nan"], "--lr: must be a finite number >= 0"),
    (["--weight-decay", "-1"], "--weight-decay: must be a finite number >= 0"),
    (["--momentum", "inf"], "--momentum: must be a finite number >= 0"),
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--batch-size", "x"], "--batch-size: expected a whole number"),
])
def test_bad_values_are_rejected_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--momentum", "0.9"], "--momentum and --nesterov are options of --optimizer sgd, not of adam"),
    (["--optimizer", "sgd", "--nesterov"], "--nesterov needs a --momentum above 0"),
])
def test_sgd_options_need_sgd(data_dir, tmp_path, argv, message, capsys):
    assert train.main([*RUN, "--data-dir", str(data_dir), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_an_existing_run_is_not_overwritten(runs, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, data_dir, "--epochs", "1")
    before = (out / "checkpoint.pt").read_bytes()
    assert train.main([*RUN, "--data-dir", str(data_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run" in err and f"--resume {out / 'checkpoint.pt'}" in err and "--overwrite" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    metrics = _train(out, data_dir, "--overwrite")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    _assert_weights_close(_weights(out), _weights(runs["fused"]), tol=0)


def test_resume_with_no_epochs_left_says_so(runs, capsys):
    ckpt = runs["fused"] / "checkpoint.pt"
    for argv in (["--epochs", "1"], ["--epochs", "2"], []):
        assert train.main(["--resume", str(ckpt), "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert f"nothing to train: the checkpoint {ckpt} has already trained 2 epochs" in err
        assert "pass --epochs above 2" in err


def test_one_epoch_is_singular(data_dir, tmp_path, capsys):
    _train(tmp_path / "one", data_dir, "--epochs", "1")
    assert "after 1 epoch;" in capsys.readouterr().out


def test_ctrl_c_while_torch_imports_exits_quietly(data_dir, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ffnn.train", *RUN, "--data-dir", str(data_dir),
                             "--out", str(tmp_path / "o")], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    def importing_torch() -> bool:  # torch's libraries are being mapped: the import has begun
        try:
            return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:  # it has exited
            return True

    deadline = time.monotonic() + 120
    while not importing_torch() and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.INTERRUPTED and stderr == "" and stdout == ""
    assert not (tmp_path / "o").exists()


def test_ctrl_c_while_the_data_loads_exits_with_130(data_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "load", interrupted)
    assert train.main([*RUN, "--data-dir", str(data_dir), "--out", str(tmp_path / "o")]) == train.INTERRUPTED
    assert capsys.readouterr().err == "ffnn-train: interrupted\n"


# --- checkpoints -----------------------------------------------------------------------------

def _damaged_copy(runs, tmp_path, damage) -> Path:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(damage(bytearray((runs["fused"] / "checkpoint.pt").read_bytes())))
    return path


def _flip_in_payload(data: bytearray) -> bytearray:
    """Flip one byte of the stored payload (torch.save keeps tensor data uncompressed, in a zip
    record after its name and a header of under 100 bytes)."""
    data[data.find(b"/data/0") + 400] ^= 0xFF
    return data


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:0], "is damaged (the file is empty)"),
    (lambda b: b[: len(b) // 2], "is damaged (PyTorch cannot read it: it is truncated"),
    (lambda b: bytearray(b"hello, not a checkpoint\n"), "is not a checkpoint of ffnn.train nor a PyTorch state_dict"),
    (_flip_in_payload, "is damaged (its contents do not match the checksum stored with them)"),
])
def test_damaged_checkpoints_are_named_in_a_clear_error(runs, tmp_path, capsys, damage, message):
    path = _damaged_copy(runs, tmp_path, damage)
    with pytest.raises(FFNNError, match=re.escape(message)) as e:
        checkpoint.load(path)
    assert str(path) in str(e.value)
    assert evaluate.main(["--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and message in err


def test_checkpoint_files_follow_the_umask_and_partial_saves_are_cleaned(runs, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.12345-deadbeef.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    other = out / "notes.tmp"
    other.write_text("not ours")
    previous = os.umask(0o027)
    try:
        _train(out, data_dir, "--epochs", "1")
    finally:
        os.umask(previous)
    assert not stale.exists() and other.exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.name != "notes.tmp"}
    assert modes["checkpoint.pt"] == modes["metrics.json"] == 0o640, modes


# --- evaluate and predict --------------------------------------------------------------------

def test_evaluate_prints_accuracy_per_class_and_writes_the_confusion_matrix(runs, tmp_path, capsys):
    png = tmp_path / "cm.png"
    assert evaluate.main(["--checkpoint", str(runs["fused"] / "checkpoint.pt"), "--device", "cpu", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    acc = json.loads((runs["fused"] / "metrics.json").read_text())["epochs"][-1]["test_accuracy"]
    assert f"accuracy:   {100 * acc:.2f}%" in out
    assert out.count("images)") == 10 and png.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_takes_a_plain_pytorch_state_dict(runs, data_dir, tmp_path, capsys):
    """A model trained with plain PyTorch, saved as the tutorials do, evaluates with the fused model."""
    path = tmp_path / "model.pth"
    torch.save(_weights(runs["torch"]), path)
    assert evaluate.main(["--checkpoint", str(path), "--data-dir", str(data_dir), "--device", "cpu"]) == 0
    acc = json.loads((runs["torch"] / "metrics.json").read_text())["epochs"][-1]["test_accuracy"]
    assert f"accuracy:   {100 * acc:.2f}%" in capsys.readouterr().out
    assert (tmp_path / "confusion.png").exists()


def test_evaluate_rejects_a_checkpoint_of_another_architecture(data_dir, tmp_path, capsys):
    path = tmp_path / "cifar.pth"
    torch.save(TorchMLP((3 * 32 * 32, 64, 10)).state_dict(), path)
    assert evaluate.main(["--checkpoint", str(path), "--data-dir", str(data_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "takes 3072 inputs but the images have 784 pixels" in err and "another architecture" in err
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3)}, path)
    assert evaluate.main(["--checkpoint", str(path), "--data-dir", str(data_dir)]) == 2
    assert "not an MLP state_dict" in capsys.readouterr().err


def test_predict_a_test_image_and_image_files(runs, data_dir, tmp_path, capsys):
    from PIL import Image

    ckpt = str(runs["fused"] / "checkpoint.pt")
    assert predict.main(["--checkpoint", ckpt, "--index", "0", "--device", "cpu"]) == 0
    by_index = capsys.readouterr().out
    label = int(datasets.read_idx(data_dir / "t10k-labels-idx1-ubyte")[0])
    assert f"test image 0 (label {label})" in by_index and by_index.count("  0.") + by_index.count("  1.0") == 10

    pixels = datasets.read_idx(data_dir / "t10k-images-idx3-ubyte")[0]
    same = tmp_path / "same.png"
    Image.fromarray(pixels.numpy()).save(same)
    assert predict.main(["--checkpoint", ckpt, str(same)]) == 0
    from_file = capsys.readouterr().out
    assert "28x28 grayscale" in from_file
    assert by_index.splitlines()[1].split("(")[0] in from_file  # the same prediction

    big = tmp_path / "big.jpg"  # RGB, 3x larger, dark strokes on a light background
    Image.fromarray((255 - pixels).numpy()).convert("RGB").resize((84, 84)).save(big)
    assert predict.main(["--checkpoint", ckpt, str(big)]) == 0
    out = capsys.readouterr().out
    assert "84x84 RGB, converted to grayscale, resized to 28x28, inverted to light-on-dark" in out
    assert "predicted:" in out


def test_predict_pads_a_non_square_image_instead_of_stretching_it(tmp_path):
    from PIL import Image

    wide = torch.full((20, 40), 10, dtype=torch.uint8)  # a dark 40x20 picture with a bright square in the middle
    wide[5:15, 15:25] = 250
    path = tmp_path / "wide.png"
    Image.fromarray(wide.numpy()).save(path)
    pixels, notes = predict.read_image(path)
    assert notes == "40x20 grayscale, padded to 40x40, resized to 28x28"
    rows, cols = (pixels > 128).nonzero().unbind(1)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(int(height) - int(width)) <= 1 and 6 <= int(width) <= 8  # still square: 10 px of 40 -> 7 of 28
    assert int(pixels[0].float().mean()) < 20  # the padding took the background's colour


def test_predict_rejects_a_file_that_is_not_an_image(runs, tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert predict.main(["--checkpoint", str(runs["fused"] / "checkpoint.pt"), str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffnn-predict: error:") and "is not an image file" in err and str(notes) in err


def test_evaluate_needs_only_the_test_files(runs, data_dir, tmp_path, monkeypatch, capsys):
    def must_not_download(dataset, directory, files):
        raise AssertionError(f"downloaded {files}")

    monkeypatch.setattr(datasets, "_torchvision_download", must_not_download)
    for name in datasets.SPLIT_FILES["test"]:
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())
    assert evaluate.main(["--checkpoint", str(runs["fused"] / "checkpoint.pt"), "--data-dir", str(tmp_path),
                          "--out", str(tmp_path / "cm.png")]) == 0
    assert "accuracy:" in capsys.readouterr().out


# --- GPU -------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["fused", "torch"])
def test_cuda_graph_step_matches_eager_and_resumes_exactly(data_dir, tmp_path, impl):
    gpu = [a if a != "cpu" else "cuda" for a in RUN]
    runs = {}
    for name, extra in (("graph", []), ("eager", ["--no-cuda-graph"])):
        assert train.main([*gpu, "--data-dir", str(data_dir), "--impl", impl, "--out", str(tmp_path / name), *extra]) == 0
        runs[name] = _weights(tmp_path / name)
    for k in runs["graph"]:
        torch.testing.assert_close(runs["graph"][k], runs["eager"][k], rtol=1e-4, atol=1e-5)
    half = tmp_path / "half"
    assert train.main([*gpu, "--data-dir", str(data_dir), "--impl", impl, "--out", str(half), "--epochs", "1"]) == 0
    assert train.main(["--resume", str(half / "checkpoint.pt"), "--epochs", "2", "--quiet"]) == 0
    resumed = _weights(half)
    assert all(torch.equal(resumed[k], runs["graph"][k]) for k in resumed)


# --- set-up and benchmarks -------------------------------------------------------------------

def test_building_without_pybind11_says_what_to_install():
    """`pip install --no-build-isolation` runs setup.py in an environment that may lack pybind11."""
    hide_pybind11 = ("import sys; sys.modules['pybind11'] = None; sys.argv = ['setup.py', '--version']; "
                     "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    result = subprocess.run([sys.executable, "-c", hide_pybind11], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "needs pybind11 >= 2.11, which is not installed" in result.stderr
    assert "pip install pybind11" in result.stderr


def test_benchmark_compare_interleaves_rounds_and_takes_the_median_ratio(monkeypatch):
    """A case's implementations take turns round by round (each round in a rotated order); the
    speedup of a peer is the median of its per-round ratios to ours, not the ratio of the medians
    (which a drift between rounds would skew), and one that raises is a row saying why."""
    from benchmarks import harness

    per_round = {"ours": [1.0, 4.0, 2.0], "peer": [2.0, 2.0, 8.0]}  # ratios 2, 0.5, 4: median 2
    calls = []

    def fake_bench(fn, device, *, min_time=None):
        calls.append(fn.__name__)
        return per_round[fn.__name__][sum(c == fn.__name__ for c in calls) - 1]

    def ours(): pass
    def peer(): pass
    def broken(): raise RuntimeError("cannot run this case\nsecond line")

    monkeypatch.setattr(harness, "bench", fake_bench)
    monkeypatch.setitem(harness.ROUNDS, "full", 3)
    results = harness.Results("linear", "cpu")
    seconds = results.compare("case", {"ours": ours, "broken": broken, "peer": peer}, work=8.0, unit="flop/s")
    assert calls == ["ours", "peer", "peer", "ours", "ours", "peer"]
    assert seconds == {"ours": 2.0, "broken": None, "peer": 2.0}
    assert [r.impl for r in results.rows] == ["ours", "broken", "peer"]
    assert results.rows[1].note == "RuntimeError: cannot run this case"
    assert results.rows[2].speedup == 2.0 and results.rows[0].speedup is None
    assert "| case | peer | 2.000 s | 4.00 flop/s | 2.00x |" in results.markdown()


def test_benchmark_e2e_accuracy_over_seeds(data_dir):
    """The e2e benchmark's accuracy table: per seed, eager PyTorch and ours trained from that
    seed's weights and batch order (the accuracies those runs reach, evaluated again here), and
    the mean difference with its standard error."""
    from benchmarks import bench_e2e
    from ffnn.evaluate import evaluate_model

    data = datasets.load("mnist", data_dir, download=False)
    seeds = bench_e2e._accuracy_over_seeds("tiny", data, torch.device("cpu"), epochs=1, seeds=3, graph=False)
    assert [r["seed"] for r in seeds["rows"]] == [0, 1, 2] and seeds["epochs"] == 1
    for r in seeds["rows"]:
        for impl_name, impl in ((bench_e2e.EAGER, "torch"), (bench_e2e.OURS, "fused")):
            model, step, loss_sum = bench_e2e._resident(impl, data, torch.device("cpu"), seed=r["seed"])
            next(bench_e2e._resident_epochs(step, loss_sum, data, torch.device("cpu"), seed=r["seed"]))
            assert r[impl_name] == evaluate_model(model, data.test_x, data.test_y, torch.nn.functional.cross_entropy,
                                                  10).accuracy
    assert seeds["rows"][0][bench_e2e.EAGER] != seeds["rows"][1][bench_e2e.EAGER]  # the seeds differ

    rows = [{"seed": 0, bench_e2e.EAGER: 0.870, bench_e2e.OURS: 0.875},
            {"seed": 1, bench_e2e.EAGER: 0.868, bench_e2e.OURS: 0.866},
            {"seed": 2, bench_e2e.EAGER: 0.872, bench_e2e.OURS: 0.878}]
    table = bench_e2e.accuracy_table({"case": "c", "epochs": 5, "rows": rows})
    differences = [0.5, -0.2, 0.6]
    error = statistics.stdev(differences) / 3 ** 0.5
    assert table[4] == "| 0 | 87.00% | 87.50% | +0.50 |"
    assert table[-1] == f"| mean | 87.00% | 87.30% | +0.30 (standard error {error:.2f}) |"


@pytest.mark.parametrize("module, args", [
    ("benchmarks.run", ["--ops", "adam", "--device", "cpu", "--isa", "avx2", "--quick"]),
    ("benchmarks.profile_step", ["--threads", "1", "--isa", "avx2"]),
])
def test_benchmark_isa_avx2_starts_the_command_again_held_to_avx2(monkeypatch, module, args):
    """--isa avx2 runs the command again with MKL, oneDNN and ATen held to AVX2 (they read that
    when they load), and returns the new process's exit status."""
    import importlib

    from benchmarks import harness
    from kernels import _C

    if _C.isa() == "portable":
        pytest.skip("this CPU has no AVX2")
    started = []
    monkeypatch.setattr(harness.subprocess, "run",
                        lambda command, env: started.append((command, env)) or subprocess.CompletedProcess(command, 3))
    for key in harness.AVX2_ENVIRONMENT:
        monkeypatch.delenv(key, raising=False)
    assert importlib.import_module(module).main(args) == 3
    (command, env), = started
    assert command[1:] == ["-m", module, *args]
    assert all(env[k] == v for k, v in harness.AVX2_ENVIRONMENT.items())


def test_benchmark_isa_the_cpu_lacks_is_a_usage_error(monkeypatch, capsys):
    from benchmarks import harness, profile_step
    from kernels import _C

    def refuse(name):
        raise ValueError(f"kernels._C.set_isa: this CPU does not support {name}")

    for key, value in harness.AVX2_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(_C, "set_isa", refuse)
    with pytest.raises(SystemExit) as e:
        profile_step.main(["--isa", "avx2"])
    assert e.value.code == 2 and "this CPU does not support avx2" in capsys.readouterr().err


def test_benchmark_isa_avx2_runs_ours_and_pytorch_on_avx2(tmp_path, monkeypatch):
    """In the process started again (the environment set), the C++ kernels run their AVX2 build
    and the tables say so in their name."""
    from benchmarks import bench_adam, harness, run as bench_run
    from kernels import _C

    if _C.isa() == "portable":
        pytest.skip("this CPU has no AVX2")
    seen = []
    for key, value in harness.AVX2_ENVIRONMENT.items():
        monkeypatch.setenv(key, value)

    def one_row(device, quick):
        seen.append(_C.isa())
        results = harness.Results("adam", str(device))
        results.time("tiny", harness.OURS, lambda: None)
        return results

    best = _C.isa()
    monkeypatch.setattr(bench_adam, "run", one_row)
    monkeypatch.setattr(harness, "_variant", "")
    monkeypatch.setattr(harness, "_mode", harness._mode)
    try:
        assert bench_run.main(["--ops", "adam", "--device", "cpu", "--isa", "avx2", "--quick",
                               "--out", str(tmp_path)]) == 0
    finally:
        _C.set_isa(best)
    assert seen == ["avx2"]
    stem = f"adam_cpu_{harness.cpu_tag()}_as-avx2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    assert "AVX2-only CPU emulated" in (tmp_path / f"{stem}.md").read_text()


@pytest.mark.parametrize("model, brand", [
    ("Intel(R) Xeon(R) Processor (family 6, model 143)", "xeon"),
    ("AMD EPYC (family 26, model 2)", "epyc"),
    ("AMD Ryzen 9 7950X 16-Core Processor", "ryzen"),
    ("Intel(R) Core(TM) i7-1165G7 @ 2.80GHz", "core"),
])
def test_cpu_tables_are_filed_under_the_cpu_brand_and_its_best_simd_path(monkeypatch, model, brand):
    from benchmarks import harness
    from kernels import _C

    monkeypatch.setattr(harness, "cpu_model", lambda: model)
    best = _C.isa()
    try:
        _C.set_isa("portable")  # an --isa run lowers the kernels' path, not the machine's name
        assert _C.supported_isa() == best
        assert harness.cpu_tag() == f"{brand}-{best}"
    finally:
        _C.set_isa(best)


def test_benchmark_results_go_to_a_scratch_directory_unless_update(tmp_path, monkeypatch):
    from benchmarks import bench_adam, harness, run as bench_run

    def one_row(device, quick):
        results = harness.Results("adam", str(device))
        results.time("tiny", harness.OURS, lambda: None)
        results.time("tiny", "torch.compile", lambda: None)
        assert quick and harness.MIN_TIME["quick"] < harness.MIN_TIME["full"]
        return results

    committed = tmp_path / "committed"
    monkeypatch.setattr(bench_adam, "run", one_row)
    monkeypatch.setattr(harness, "RESULTS_DIR", committed)
    monkeypatch.chdir(tmp_path)
    assert bench_run.main(["--ops", "adam", "--device", "cpu", "--quick"]) == 0
    scratch = tmp_path / harness.SCRATCH_DIR
    stem = f"adam_cpu_{harness.cpu_tag()}"
    assert sorted(p.name for p in scratch.iterdir()) == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    assert not committed.exists()
    table = (scratch / f"{stem}.md").read_text()
    assert "machine: " in table and " cores, " in table and " threads" in table and "--quick run" in table
    assert "| tiny | torch.compile | n/a (not timed in a --quick run) |" in table
    with pytest.raises(SystemExit):
        bench_run.main(["--ops", "adam", "--device", "cpu", "--quick", "--update"])
    monkeypatch.setattr(bench_adam, "run", lambda device, quick: one_row(device, True))
    assert bench_run.main(["--ops", "adam", "--device", "cpu", "--update"]) == 0
    assert sorted(p.name for p in committed.iterdir()) == [f"{stem}.json", f"{stem}.md", f"{stem}.png"]
