"""A 3-5-1 ReLU network for regression: MSELoss, SGD lr 0.01, full batch, on 100 samples of a
known function of three inputs.

    python -m examples.regression                        # --impl torch: the same on plain PyTorch
"""
import time

import torch
from torch import nn

import kernels
from examples import common


def target_function(X):
    return 2 * X[:, :1] - 3 * X[:, 1:2] + X[:, 2:]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 5)
        self.relu = nn.ReLU()
        self.output = nn.Linear(5, 1)

    def forward(self, x):
        return self.output(self.relu(self.hidden(x)))


def main(argv=None) -> dict:
    args = common.parser(__doc__, epochs=1000, print_every=100).parse_args(argv)
    on = common.resolve_device(args.device)

    torch.manual_seed(args.seed)
    X = torch.randn(100, 3)
    y = target_function(X) + 0.1 * torch.randn(100, 1)
    X, y = X.to(on), y.to(on)
    model = Net().to(on)
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if args.impl == "fused":  # the one change: the Linear layers run on this library's kernels
        model, optimizer = kernels.fuse(model), kernels.fuse_optimizer(optimizer)

    losses = []
    start = time.perf_counter()
    for epoch in range(args.epochs):  # full batch: an epoch is one step
        optimizer.zero_grad()
        loss = criterion(model(X), y)
        loss.backward()
        optimizer.step()
        if (epoch + 1) % args.print_every == 0:
            losses.append(loss.item())
            print(f"Epoch [{epoch + 1}/{args.epochs}], Loss: {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        sample = torch.tensor([[1.0, 0.5, -1.0]], device=on)
        prediction = model(sample).item()
    print(f"Prediction for {sample.tolist()[0]}: {prediction:.4f} (the function gives "
          f"{target_function(sample).item():.4f})")
    print(f"Training time: {seconds:.2f} s")
    return {"losses": losses, "prediction": prediction, "seconds": seconds}


if __name__ == "__main__":
    main()
