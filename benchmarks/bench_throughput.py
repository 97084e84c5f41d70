"""Training throughput (images/s) of DUN-ResNet-18 against the plain ResNet-18 it is built from,
in fp32 and in bf16 with the channels-last memory format (issue 16): the cost of getting every
depth from one pass, and what mixed precision buys.

Both train through ``fit``'s step (one Adam step on a fixed batch, the data on the device); the
plain net is the same stack at full depth with cross-entropy (``DeterministicNet``).

    python benchmarks/bench_throughput.py --device cuda               # GPU: batch 256, width 64
    python benchmarks/bench_throughput.py --device cpu --width 8 --batch 32 --size 16   # a toy
"""

from __future__ import annotations

import argparse

import torch
from common import append_results, header, synthetic_splits, time_variants

from bayesdyn.inference import FitConfig, resolve_device
from bayesdyn.inference.fit import Trainer
from bayesdyn.models import DepthNet, DeterministicNet
from bayesdyn.nn import resnet18_depth


def trainer(kind, args, device, precision, channels_last):
    torch.manual_seed(0)
    stack = resnet18_depth(1, 10, width=args.width)
    model = DepthNet(stack, num_classes=10) if kind == "DUN-ResNet-18" else \
        DeterministicNet(stack.truncated(stack.max_depth), 10)
    data, _, _ = synthetic_splits(args.batch * 2, (1, args.size, args.size))
    config = FitConfig(batch_size=args.batch, precision=precision, channels_last=channels_last)
    return Trainer(model, model.default_guide(), data, None, config, device, None, False)


def step_fn(t, x, y):
    memory = torch.channels_last if t.config.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=memory)

    def step():
        from bayesdyn.inference.parallel import autocast

        with autocast(t.config.precision, t.device):
            loss, _ = t.loss(x, y)
        t._step(loss / t.n)
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="auto")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=28, help="image side (Fashion-MNIST: 28)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    device = resolve_device(args.device)
    settings = [("fp32", False), ("bf16", True)]
    variants = {}
    for precision, channels_last in settings:
        for kind in ("ResNet-18", "DUN-ResNet-18"):
            t = trainer(kind, args, device, precision, channels_last)
            x, y = t.train_data.x[:args.batch], t.train_data.y[:args.batch]
            variants[(kind, precision)] = step_fn(t, x, y)
    seconds = time_variants({f"{k} {p}": fn for (k, p), fn in variants.items()}, device,
                            steps=args.steps, rounds=args.rounds, warmup=2)
    lines = [*header(f"throughput: DUN-ResNet-18 vs ResNet-18, batch {args.batch}, "
                     f"{args.size}x{args.size}, width {args.width}", device), "",
             "| precision | ResNet-18 img/s | DUN-ResNet-18 img/s | DUN / plain time |",
             "|---|---|---|---|"]
    for precision, channels_last in settings:
        plain, dun = seconds[f"ResNet-18 {precision}"], seconds[f"DUN-ResNet-18 {precision}"]
        label = precision + (" channels-last" if channels_last else "")
        lines.append(f"| {label} | {args.batch / plain:.0f} | {args.batch / dun:.0f} | "
                     f"{dun / plain:.3f} |")
    fp32 = seconds["DUN-ResNet-18 fp32"] / seconds["DUN-ResNet-18 bf16"]
    lines += ["", f"bf16 channels-last speed-up of the DUN step: {fp32:.2f}x. One training step "
              f"(forward, backward, Adam) on a fixed batch; median of {args.rounds} interleaved "
              f"rounds of {args.steps} steps."]
    append_results(lines)


if __name__ == "__main__":
    main()
