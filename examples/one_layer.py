"""A one-layer network, 784 -> 10 (softmax regression): CrossEntropyLoss, Adam lr 1e-3, batch 100,
5 epochs, pixels in [0, 1] (ToTensor() without Normalize).

    python -m examples.one_layer --dataset fashion-mnist     # --impl torch: the same on plain PyTorch
"""
import time

import torch
from torch import nn

import kernels
from examples import common

input_size, num_classes = 28 * 28, 10
batch_size, learning_rate = 100, 1e-3


def main(argv=None) -> dict:
    args = common.parser(__doc__, epochs=5, print_every=100, dataset="mnist").parse_args(argv)
    train_loader, test_loader, _ = common.mnist(args, batch_size, pixels="unit")

    torch.manual_seed(args.seed)
    model = nn.Linear(input_size, num_classes).to(common.resolve_device(args.device))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    if args.impl == "fused":  # the one change: this library's kernels, same parameters and settings
        model, criterion, optimizer = kernels.fuse(model), kernels.fuse(criterion), kernels.fuse_optimizer(optimizer)

    losses = []
    start = time.perf_counter()
    total_step = len(train_loader)
    for epoch in range(args.epochs):
        for i, (images, labels) in enumerate(train_loader):
            images = images.reshape(-1, input_size)
            outputs = model(images)
            loss = criterion(outputs, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if (i + 1) % args.print_every == 0:
                losses.append(loss.item())
                print(f"Epoch [{epoch + 1}/{args.epochs}], Step [{i + 1}/{total_step}], Loss: {losses[-1]:.4f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        correct = total = 0
        for images, labels in test_loader:
            outputs = model(images.reshape(-1, input_size))
            _, predicted = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
        print(f"Accuracy of the model on the {total} test images: {100 * correct / total} %")
    print(f"Training time: {seconds:.2f} s")
    return {"losses": losses, "correct": correct, "seconds": seconds, "accuracy": correct / total}


if __name__ == "__main__":
    main()
