"""The toy 1-2-1 network with sigmoid activations, trained on one sample with MSELoss and SGD
lr 0.5 for 500 steps.

    python -m examples.toy_sigmoid                       # --impl torch: the same on plain PyTorch
"""
import time

import torch
from torch import nn

import kernels
from examples import common


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 2), nn.Sigmoid(), nn.Linear(2, 1), nn.Sigmoid())


def main(argv=None) -> dict:
    args = common.parser(__doc__, epochs=500, print_every=100).parse_args(argv)
    on = common.resolve_device(args.device)

    x = torch.tensor([[1.0]], device=on)
    y = torch.tensor([[0.0]], device=on)
    torch.manual_seed(args.seed)
    model = build_model().to(on)
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if args.impl == "fused":  # the one change: both Linear+Sigmoid pairs become one fused layer each
        model, optimizer = kernels.fuse(model), kernels.fuse_optimizer(optimizer)

    print(f"Output before training: {model(x).item():.4f} (target {y.item():.1f})")
    losses = []
    start = time.perf_counter()
    for step in range(args.epochs):  # one sample: an epoch is one step
        optimizer.zero_grad()
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if step % args.print_every == 0:
            losses.append(loss.item())
            print(f"Step {step}, Loss: {losses[-1]:.6f}")
    seconds = time.perf_counter() - start
    output = model(x).item()
    print(f"Output after training: {output:.4f} (target {y.item():.1f})")
    for name, p in model.named_parameters():
        print(f"{name}: {[round(v, 4) for v in p.detach().flatten().tolist()]}")
    print(f"Training time: {seconds:.2f} s")
    return {"losses": losses, "output": output, "parameters": [p.detach().clone() for p in model.parameters()],
            "seconds": seconds}


if __name__ == "__main__":
    main()
