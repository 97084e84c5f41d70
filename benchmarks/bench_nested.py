"""BNNN training step vs the deterministic network of the same architecture, and inference at
width 0.25 vs full width (issue 6).

(a) a BNNN step through fit's path (Downhill masks, local reparameterisation, exact KLs);
(b) a plain PyTorch conv net with the same layers (conv-BN-ReLU-pool, global pool, linear),
    cross-entropy, one Adam;
(c) prediction (one Monte Carlo sample) at width 0.25 and at full width: sliced weights.

    python benchmarks/bench_nested.py [--device cpu|cuda] [--batch 256]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import peak_memory, report, synthetic_splits, time_variants
from torch import nn

from bayesdyn.inference import FitConfig, resolve_device
from bayesdyn.inference.fit import Trainer
from bayesdyn.models import NestedNet
from bayesdyn.nn import nested_convnet

N, CHANNELS = 60_000, (32, 64, 64)


def plain_convnet():
    layers, c_in = [], 1
    for i, c in enumerate(CHANNELS):
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i < 2 else []
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    data, x, y = synthetic_splits(args.batch * 2, (1, 28, 28))
    xb, yb = x[: args.batch].to(device), y[: args.batch].to(device)

    model = NestedNet(nested_convnet(1, 10, CHANNELS), 10, input_shape=(1, 28, 28))
    trainer = Trainer(model, model.default_guide(), data, None, FitConfig(batch_size=args.batch),
                      device, None, False)
    bnnn_step = lambda: trainer._step(trainer.loss(xb, yb)[0] / N)  # noqa: E731

    plain = plain_convnet().to(device)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_step():
        loss = F.cross_entropy(plain(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    full = model.groups_for_width(1.0)
    quarter = model.groups_for_width(0.25)

    def predict_full():
        with torch.no_grad():
            model.net(xb, n_groups=full, sample=True)

    def predict_quarter():
        with torch.no_grad():
            model.net(xb, n_groups=quarter, sample=True)

    train = time_variants({"deterministic conv net step": plain_step, "BNNN step via fit": bnnn_step},
                          device)
    infer_t = time_variants({"predict, full width": predict_full,
                             "predict, width 0.25": predict_quarter}, device)
    rows = [(n, t, peak_memory(f, device)) for (n, t), f in zip(
        [*train.items(), *infer_t.items()], [plain_step, bnnn_step, predict_full, predict_quarter],
        strict=True)]
    report(f"nested: BNNN step and sliced inference, conv {CHANNELS}, batch {args.batch}", rows,
           baseline="deterministic conv net step", device=device,
           checks=[("BNNN step / deterministic step",
                    train["BNNN step via fit"] / train["deterministic conv net step"], 2.5),
                   ("predict width 0.25 / full width",
                    infer_t["predict, width 0.25"] / infer_t["predict, full width"], 0.4)],
           notes="Ratios in the first table are to the deterministic step; the inference target "
                 "is the ratio of the two prediction rows (one MC sample, local "
                 "reparameterisation: two convolutions per layer). Median of 7 interleaved rounds.")


if __name__ == "__main__":
    main()
