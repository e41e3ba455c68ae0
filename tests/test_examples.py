"""Each tutorial example (examples/), run for a few steps on synthetic data on this library and on
plain PyTorch (--impl torch): both print the same lines, with the same numbers up to rounding."""
import importlib
import re

import pytest
import torch

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")

# example: its arguments for a quick run
QUICK_RUNS = {
    "one_layer": ["--synthetic", "--epochs", "2", "--steps", "4", "--print-every", "2"],
    "toy_sigmoid": ["--epochs", "20", "--print-every", "5"],
    "regression": ["--epochs", "30", "--print-every", "10"],
    "mnist_mlp": ["--synthetic", "--epochs", "2", "--steps", "3"],
    "mnist_mlp_sgd": ["--synthetic", "--epochs", "2", "--steps", "4", "--print-every", "2"],
    "mnist_nll": ["--synthetic", "--epochs", "2", "--steps", "3"],
}


def _shape(text: str) -> list[str]:
    """The printed lines with every number replaced by #, less the model's repr (which names
    the fused modules on one side and nn.Linear on the other)."""
    lines, in_repr = [], False
    for line in text.splitlines():
        if re.fullmatch(r"\w+\(", line):
            in_repr = True
        if not in_repr:
            lines.append(NUMBER.sub("#", line))
        if line == ")":
            in_repr = False
    return lines


def _assert_same(fused, plain, where: str) -> None:
    if isinstance(fused, dict):
        assert fused.keys() == plain.keys(), where
        for key in fused:
            if key != "seconds":
                _assert_same(fused[key], plain[key], f"{where}[{key!r}]")
    elif isinstance(fused, (list, tuple)):
        assert len(fused) == len(plain), where
        for i, (a, b) in enumerate(zip(fused, plain)):
            _assert_same(a, b, f"{where}[{i}]")
    elif where.endswith("['correct']"):  # a test image right on one side, wrong on the other, may happen
        assert abs(fused - plain) <= 1, f"{where}: {fused} vs {plain}"
    elif where.endswith("['accuracy']"):  # the same, as a fraction of the 320 test images
        assert abs(fused - plain) <= 1 / 320 + 1e-9, f"{where}: {fused} vs {plain}"
    else:
        torch.testing.assert_close(torch.as_tensor(fused), torch.as_tensor(plain), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("name", QUICK_RUNS)
def test_example_prints_what_plain_pytorch_prints(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mnist_mlp writes its pictures and model under ./runs
    main = importlib.import_module(f"examples.{name}").main
    results, printed = {}, {}
    for impl in ("fused", "torch"):
        results[impl] = main([*QUICK_RUNS[name], "--device", "cpu", "--impl", impl])
        printed[impl] = capsys.readouterr().out
    assert _shape(printed["fused"]) == _shape(printed["torch"])
    assert len(_shape(printed["fused"])) >= 3
    _assert_same(results["fused"], results["torch"], name)
    fused_numbers = [float(n) for n in NUMBER.findall("\n".join(printed["fused"].splitlines()[:-1]))]
    torch_numbers = [float(n) for n in NUMBER.findall("\n".join(printed["torch"].splitlines()[:-1]))]
    # The last line is the training time. A printed figure may differ in its last digit, and an
    # accuracy by one test image of the 320 (0.31 %); the figures themselves are compared above.
    torch.testing.assert_close(torch.tensor(fused_numbers), torch.tensor(torch_numbers), rtol=1e-3, atol=0.32)


def test_measure_takes_turns_and_reports_the_median_ratio(capsys, monkeypatch):
    """examples.measure runs each example --repeat times each way, alternating which goes first,
    and prints the median times and the median of the per-turn ratios (not the ratio of medians)."""
    from examples import measure

    calls = []
    seconds = {"fused": iter([1.0, 4.0, 2.0]), "torch": iter([2.0, 2.0, 8.0])}  # ratios 2, 0.5, 4

    def fake_main(argv):
        impl = argv[argv.index("--impl") + 1]
        calls.append(impl)
        return {"seconds": next(seconds[impl]), "output": 0.0255}

    monkeypatch.setattr(importlib.import_module("examples.toy_sigmoid"), "main", fake_main)
    measure.main(["--only", "toy_sigmoid", "--repeat", "3"])
    assert calls == ["fused", "torch", "torch", "fused", "fused", "torch"]
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == ("| 1-2-1 sigmoid, one sample, MSE, SGD lr 0.5, 500 steps | `python -m examples.toy_sigmoid` | "
                   "2.00 s | 2.00 s | 2.00x | output 0.0255 (target 0) | output 0.0255 (target 0) |")


def test_measure_takes_more_turns_for_short_examples(capsys, monkeypatch):
    """An example whose runs are short takes turns past --repeat until each way has trained for
    --min-seconds in all."""
    from examples import measure

    calls = []

    def fake_main(argv):
        impl = argv[argv.index("--impl") + 1]
        calls.append(impl)
        return {"seconds": 0.25 if impl == "fused" else 0.5, "output": 0.0255}

    monkeypatch.setattr(importlib.import_module("examples.toy_sigmoid"), "main", fake_main)
    measure.main(["--only", "toy_sigmoid", "--repeat", "3", "--min-seconds", "2"])
    assert calls.count("fused") == calls.count("torch") == 8  # 8 x 0.25 s reaches 2 s
    assert capsys.readouterr().out.splitlines()[-1].split(" | ")[4] == "2.00x"
