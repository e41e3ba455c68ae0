"""The 784-512-128-10 ReLU MLP as an nn.Sequential stack: CrossEntropyLoss, SGD lr 0.01 with
momentum 0.9, batch 64, 10 epochs, in the quickstart tutorial's train/test loops.

    python -m examples.mnist_mlp_sgd --dataset fashion-mnist     # --impl torch: the same on plain PyTorch
"""
import time

import torch
from torch import nn

import kernels
from examples import common


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512),
            nn.ReLU(),
            nn.Linear(512, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x):
        x = self.flatten(x)
        logits = self.linear_relu_stack(x)
        return logits


def train(dataloader, model, loss_fn, optimizer, print_every, losses):
    size = len(dataloader.dataset)
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        pred = model(X)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if batch % print_every == 0:
            loss, current = loss.item(), (batch + 1) * len(X)
            losses.append(loss)
            print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]")


def test(dataloader, model, loss_fn):
    size = len(dataloader.dataset)
    num_batches = len(dataloader)
    model.eval()
    test_loss, correct = 0, 0
    with torch.no_grad():
        for X, y in dataloader:
            pred = model(X)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    test_loss /= num_batches
    print(f"Test Error: \n Accuracy: {(100 * correct / size):>0.1f}%, Avg loss: {test_loss:>8f} \n")
    return test_loss, int(correct)


def main(argv=None) -> dict:
    args = common.parser(__doc__, epochs=10, print_every=100, dataset="mnist").parse_args(argv)
    train_dataloader, test_dataloader, _ = common.mnist(args, batch_size=64, pixels="tutorial")

    torch.manual_seed(args.seed)
    model = NeuralNetwork().to(common.resolve_device(args.device))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    if args.impl == "fused":  # the one change: each Linear+ReLU pair becomes one fused layer
        model, loss_fn, optimizer = kernels.fuse(model), kernels.fuse(loss_fn), kernels.fuse_optimizer(optimizer)
    print(model)

    losses, seconds = [], 0.0
    for t in range(args.epochs):
        print(f"Epoch {t + 1}\n-------------------------------")
        start = time.perf_counter()
        train(train_dataloader, model, loss_fn, optimizer, args.print_every, losses)
        seconds += time.perf_counter() - start
        test_loss, correct = test(test_dataloader, model, loss_fn)
    print("Done!")
    print(f"Training time: {seconds:.2f} s")
    return {"losses": losses, "test_loss": test_loss, "correct": correct,
            "accuracy": correct / len(test_dataloader.dataset), "seconds": seconds}


if __name__ == "__main__":
    main()
