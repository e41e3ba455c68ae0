"""The 784-128-64-10 ReLU MLP: CrossEntropyLoss, Adam lr 1e-3, batch 64, 5 epochs; shows sample
images, counts the parameters, plots the loss curves, saves and reloads the model, predicts one image.

    python -m examples.mnist_mlp --dataset fashion-mnist     # --impl torch: the same on plain PyTorch
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from examples import common
from ffnn import plots


class NeuralNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def on_library(model: nn.Module, impl: str) -> nn.Module:
    """The one change: this library's kernels under the tutorial's model (same parameters)."""
    return kernels.fuse(model) if impl == "fused" else model


def main(argv=None) -> dict:
    p = common.parser(__doc__, epochs=5, print_every=100, dataset="mnist")
    p.add_argument("--out", default="runs/examples/mnist_mlp", help="where the pictures and model.pth go")
    args = p.parse_args(argv)
    on = common.resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, test_loader, classes = common.mnist(args, batch_size=64, pixels="tutorial")

    images, labels = next(iter(train_loader))
    print(f"A batch of images: {tuple(images.shape)}, of labels: {tuple(labels.shape)}")

    torch.manual_seed(args.seed)
    model = on_library(NeuralNetwork().to(on), args.impl)
    print(model)
    print(f"Number of parameters: {sum(p.numel() for p in model.parameters())}")
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if args.impl == "fused":
        criterion, optimizer = kernels.fuse(criterion), kernels.fuse_optimizer(optimizer)

    history, seconds = [], 0.0
    for epoch in range(args.epochs):
        model.train()
        running_loss, steps = 0.0, 0
        start = time.perf_counter()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            steps += 1
        seconds += time.perf_counter() - start
        model.eval()
        test_loss, correct = 0.0, 0
        with torch.no_grad():
            for images, labels in test_loader:
                output = model(images)
                test_loss += criterion(output, labels).item()
                correct += (output.argmax(1) == labels).sum().item()
        history.append({"epoch": epoch + 1, "train_loss": running_loss / steps, "test_loss": test_loss / len(test_loader)})
        print(f"Epoch {epoch + 1}/{args.epochs} - Training loss: {history[-1]['train_loss']:.4f} - "
              f"Validation loss: {history[-1]['test_loss']:.4f} - "
              f"Accuracy: {100 * correct / len(test_loader.dataset):.2f}%")
    plots.loss_curves(history, out / "loss.png")
    print(f"Loss curves: {out / 'loss.png'}")

    torch.save(model.state_dict(), out / "model.pth")
    model = on_library(NeuralNetwork(), args.impl).to(on)
    model.load_state_dict(torch.load(out / "model.pth", weights_only=True))
    model.eval()
    print(f"Saved and reloaded: {out / 'model.pth'}")

    images, labels = next(iter(test_loader))
    with torch.no_grad():
        predictions = model(images).argmax(1)
        probabilities = F.softmax(model(images[0]), dim=1)[0]
    plots.sample_grid(images[:16, 0], labels[:16], predictions[:16], classes, out / "samples.png")
    print(f"Sample images with predictions: {out / 'samples.png'}")
    predicted, label = int(probabilities.argmax()), int(labels[0])
    print(f'Predicted: "{classes[predicted]}" ({100 * probabilities[predicted]:.1f}%), Actual: "{classes[label]}"')
    print(f"Training time: {seconds:.2f} s")
    return {"history": history, "correct": correct, "accuracy": correct / len(test_loader.dataset),
            "probabilities": probabilities.cpu(), "seconds": seconds}


if __name__ == "__main__":
    main()
