"""fit's training loop vs a hand-written PyTorch loop over the same loss (issue 4).

Both train the same small MLP (784-256-256-10, cross-entropy scaled as fit scales it) on the
same MNIST-shaped data with the same batches and one Adam. Whole epochs are timed: fit's
per-epoch training seconds (its history, validation excluded) against the hand-written loop.

    python benchmarks/bench_fit_overhead.py [--device cpu|cuda] [--epochs-per-round 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import device_name, report, sync, synthetic_splits
from torch import nn

from bayesdyn.inference import fit, resolve_device
from bayesdyn.models import DeterministicNet

N, BATCH = 12_800, 128


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data, x, y = synthetic_splits(N, (1, 28, 28), n_val=256)
    xd, yd = x.to(device), y.to(device)

    def fit_epoch():
        model = DeterministicNet(make_net(), 10)
        history = fit(model, model.default_guide(), data, epochs=1, batch_size=BATCH, lr=1e-3,
                      device=device, progress=False)
        return history.epochs[0]["seconds"]

    def hand_epoch():
        net = make_net().to(device)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        order = torch.randperm(N, generator=torch.Generator().manual_seed(0)).to(device)
        sync(device)
        start = time.perf_counter()
        for idx in order.split(BATCH):
            loss = F.cross_entropy(net(xd[idx]), yd[idx], reduction="sum") * (N / len(idx)) / N
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return time.perf_counter() - start

    fit_epoch(), hand_epoch()  # warm-up
    fit_s, hand_s = [], []
    for _ in range(args.rounds):
        fit_s.append(fit_epoch())
        hand_s.append(hand_epoch())
    steps = N // BATCH
    t_fit, t_hand = statistics.median(fit_s) / steps, statistics.median(hand_s) / steps
    report("fit overhead: small MLP, fit vs hand-written loop",
           [("hand-written PyTorch loop", t_hand, None), ("bayesdyn.fit", t_fit, None)],
           baseline="hand-written PyTorch loop", device=device,
           checks=[("fit / hand-written", t_fit / t_hand, 1.1)],
           notes=f"MLP 784-256-256-10, batch {BATCH}, {steps} steps per epoch, median of "
                 f"{args.rounds} interleaved epochs ({device_name(device)}).")


if __name__ == "__main__":
    main()
