"""The 784-128-64-10 ReLU MLP ending in LogSoftmax, trained with NLLLoss: Adam lr 3e-3, batch 64,
15 epochs. On this library the LogSoftmax + NLLLoss pair becomes the fused cross-entropy on logits.

    python -m examples.mnist_nll --dataset fashion-mnist     # --impl torch: LogSoftmax + NLLLoss as written
"""
import time

import torch
from torch import nn, optim

import kernels
from examples import common


def build_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 10), nn.LogSoftmax(dim=1))


def main(argv=None) -> dict:
    args = common.parser(__doc__, epochs=15, dataset="fashion-mnist").parse_args(argv)
    trainloader, testloader, _ = common.mnist(args, batch_size=64, pixels="tutorial")

    torch.manual_seed(args.seed)
    model = build_model().to(common.resolve_device(args.device))
    criterion = nn.NLLLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.003)
    if args.impl == "fused":
        # NLLLoss(LogSoftmax(z)) is CrossEntropyLoss(z): cross-entropy of logits z is by definition
        # -log_softmax(z)[target], and its gradient softmax(z) - onehot(target). The fused kernel
        # computes both in one pass over z, so the model stops at the logits (an Identity keeps
        # the indices and state_dict keys) and the loss takes them: the same loss, the same training.
        model[5] = nn.Identity()
        criterion = nn.CrossEntropyLoss()
        model, criterion, optimizer = kernels.fuse(model), kernels.fuse(criterion), kernels.fuse_optimizer(optimizer)

    train_losses, test_losses, seconds = [], [], 0.0
    for e in range(args.epochs):
        running_loss, steps = 0, 0
        start = time.perf_counter()
        for images, labels in trainloader:
            images = images.view(images.shape[0], -1)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
        seconds += time.perf_counter() - start
        test_loss = accuracy = 0
        with torch.no_grad():
            model.eval()
            for images, labels in testloader:
                output = model(images.view(images.shape[0], -1))  # log-probabilities, or logits when fused
                test_loss += criterion(output, labels).item()
                top_class = output.argmax(dim=1)  # the largest log-probability is the largest logit
                accuracy += (top_class == labels).float().mean().item()
        model.train()
        train_losses.append(running_loss / steps)
        test_losses.append(test_loss / len(testloader))
        print(f"Epoch: {e + 1}/{args.epochs}.. ",
              f"Training Loss: {train_losses[-1]:.3f}.. ",
              f"Test Loss: {test_losses[-1]:.3f}.. ",
              f"Test Accuracy: {accuracy / len(testloader):.3f}")
    print(f"Training time: {seconds:.2f} s")
    return {"train_losses": train_losses, "test_losses": test_losses, "accuracy": accuracy / len(testloader),
            "seconds": seconds}


if __name__ == "__main__":
    main()
