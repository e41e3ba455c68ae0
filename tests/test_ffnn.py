"""ffnn end to end on a tiny synthetic MNIST-format dataset written by the tests.

Every class c draws a bright 6x6 square at its own place on a noisy background, so a 784-32-10
MLP learns it in a couple of epochs. Runs call the commands' main(argv) in-process, except the
Ctrl-C test (a real `python -m ffnn.train` subprocess) and the torchrun test.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ffnn
from ffnn import checkpoint, data as datasets, evaluate, predict, train
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
        optimizer = train.make_optimizer(args, model.parameters(), capturable=False)
        loss_sum = torch.zeros((), device=device)
        step = train.make_step(model, optimizer, ffnn.model.loss_function(impl), x, y, loss_sum, train.World(), 1.0)
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
    assert err.startswith("ffnn-train: error: no mnist data in") and str(missing) in err
    assert "train-images-idx3-ubyte" in err and "--data-dir" in err and "--dataset fashion-mnist" in err


def test_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def offline(dataset, directory):
        raise OSError("Name or service not known")

    monkeypatch.setattr(datasets, "_torchvision_download", offline)
    with pytest.raises(FFNNError, match=r"download failed \(OSError: Name or service not known\).*dataset-fashion-mnist"):
        datasets.load("fashion-mnist", tmp_path)


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
    """What Ctrl-C does, deterministically: the stop request arrives before step 6 of epoch 2."""

    class StopAtSixthStepOfEpochTwo(train.StopRequest):
        checks = 0  # one check per step, and one after each epoch

        @property
        def requested(self):
            type(self).checks += 1
            return self.checks > 16 + 1 + 5

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(train, "StopRequest", StopAtSixthStepOfEpochTwo)
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
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 processes" in result.stdout and result.stdout.count("epoch 2/2") == 1  # rank 0 logs alone
    a, b = _weights(out), _weights(runs["fused"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    one, two = (json.loads((o / "metrics.json").read_text())["epochs"] for o in (runs["fused"], out))
    assert two[-1]["train_loss"] == pytest.approx(one[-1]["train_loss"], rel=1e-5)


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
    assert "84x84 grayscale, resized to 28x28, inverted to light-on-dark" in out and "predicted:" in out


def test_predict_rejects_a_file_that_is_not_an_image(runs, tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert predict.main(["--checkpoint", str(runs["fused"] / "checkpoint.pt"), str(notes)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffnn-predict: error:") and "is not an image file" in err and str(notes) in err


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "ckpt.pt"
    bogus.write_text("hello")
    assert predict.main(["--checkpoint", str(bogus), "--index", "0"]) == 2
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err


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
