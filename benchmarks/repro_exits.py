"""Reproduction: BoostNet vs the sum-of-cross-entropy MSDNet, with the GE and stop-gradient
ablations (issue 13; methods.md §3.6-3.8, §7.3).

Every variant trains the same MSDNet (same initial weights per seed) with the same optimiser
and epochs; only the training objective and the gradient-equilibrium switch differ:

- ``MSDNet``: sum over exits of CE(f_k), plain backbone (the baseline the papers plot);
- ``MSDNet + GE``: the same loss on the gradient-equilibrium backbone (GE without boosting);
- ``BoostNet``: CE(f_k + sg(0.5 F_{k-1})) summed over exits, GE backbone (the paper's);
- ``BoostNet - GE``: boosting on the plain backbone;
- ``BoostNet - stop-grad``: boosting without the stop-gradient on the history.

Reported on the test split: accuracy, NLL and ECE (15 bins) at every exit (anytime), and the
budgeted-batch curve (MSDNet's 39 levels, thresholds on the validation split) read at common
FLOPs, raw and, separately, after BoostNet's ``flat_curve`` post-processing. The paper's pattern
(CIFAR-100, 10 exits, 300 epochs): +1.5 to +3 points at the middle exits, small gain at the last.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/repro_exits.py --seeds 3 --epochs 6 \\
        --train-size 12000
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from common import add_msdnet_arguments, append_results, cell, curve_at, header, subset
from torch.utils.data import TensorDataset

from bayesdyn.data import load
from bayesdyn.evaluation import evaluate, flat_curve
from bayesdyn.inference import fit, resolve_device
from bayesdyn.models import BoostedExits, MultiExitNet
from bayesdyn.nn import msdnet

# name: (family, gradient equilibrium, stop-gradient)
VARIANTS = {"MSDNet": (MultiExitNet, False, None), "MSDNet + GE": (MultiExitNet, True, None),
            "BoostNet": (BoostedExits, True, True), "BoostNet - GE": (BoostedExits, False, True),
            "BoostNet - stop-grad": (BoostedExits, True, False)}
BASELINE = "MSDNet"
GRID_POINTS = 6


def build(args, data, variant):
    family, ge, stop_gradient = VARIANTS[variant]
    net = msdnet(data.input_shape[0], data.num_classes, num_blocks=args.blocks, step=args.step,
                 base=args.base, step_mode="even", channels=args.channels,
                 growth_rate=args.growth_rate, head_channels=args.head_channels,
                 gradient_equilibrium=ge)
    if family is MultiExitNet:
        return MultiExitNet(net, data.num_classes, input_shape=data.input_shape)
    return BoostedExits(net, data.num_classes, gamma=args.gamma, stop_gradient=stop_gradient,
                        input_shape=data.input_shape)


def run_one(args, data, variant, seed, device) -> dict:
    torch.manual_seed(seed)  # the same initial weights for every variant of a seed
    model = build(args, data, variant)
    guide = model.default_guide()
    started = time.perf_counter()
    monitor = replace(data, val=TensorDataset(*(t[: args.monitor_size] for t in data.val.tensors)))
    fit(model, guide, monitor, device=device, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, optimizer="sgd", momentum=0.9, weight_decay=args.weight_decay,
        schedule="multistep", milestones=(0.5, 0.75), seed=seed, progress=False)
    seconds = time.perf_counter() - started
    metrics = evaluate(model, guide, data, ood=None, num_samples=1)
    keep = ("flops", "accuracy", "nll", "ece")
    return {"variant": variant, "seed": seed, "train_seconds": seconds,
            "exits": [{k: b[k] for k in keep} for b in metrics["budgets"]],
            "budgeted": [{k: r[k] for k in (*keep, "val_accuracy", "exit_fractions")}
                         for r in metrics["budgeted_batch"]],
            "flat": [{k: r[k] for k in keep} for r in flat_curve(metrics["budgeted_batch"])]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-size", type=int, default=12000, help="0: the whole training split")
    p.add_argument("--monitor-size", type=int, default=1000,
                   help="validation images fit reports each epoch (thresholds use all of them)")
    add_msdnet_arguments(p)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = subset(load(args.dataset), args.train_size).to(device)
    out = Path(__file__).with_name("results") / f"repro_exits_{args.dataset}.json"
    out.parent.mkdir(exist_ok=True)
    done = json.loads(out.read_text())["runs"] if out.is_file() and not args.no_record else []
    done = [r for r in done if r.get("args") == vars(args)]  # resume only the same experiment
    for seed in range(args.seeds):
        for variant in args.variants.split(","):
            if any(r["variant"] == variant and r["seed"] == seed for r in done):
                continue
            result = {**run_one(args, data, variant, seed, device), "args": vars(args)}
            done.append(result)
            acc = " ".join(f"{e['accuracy']:.4f}" for e in result["exits"])
            print(f"seed {seed} {variant:<22} {result['train_seconds']:.0f} s  exits {acc}",
                  flush=True)
            if not args.no_record:
                out.write_text(json.dumps({"runs": done}, indent=1))
    record(args, device, data, done)


def by_variant(runs):
    out = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        out.setdefault(r["variant"], []).append(r)
    return out


def record(args, device, data, runs):
    groups = by_variant(runs)
    names = [v for v in VARIANTS if v in groups]
    base = groups.get(BASELINE)
    exit_flops = [e["flops"] for e in runs[0]["exits"]]
    n_exits = len(exit_flops)
    cols = " | ".join(f"exit {k + 1} ({f / 1e6:.2f}M)" for k, f in enumerate(exit_flops))
    sep = "|---" * (n_exits + 1) + "|"
    lines = [*header(f"exits reproduction: BoostNet vs sum-of-CE MSDNet, {args.dataset}", device),
             f"- backbone: MSDNet, {args.blocks} blocks (even, step {args.step}, base {args.base}), "
             f"nChannels {args.channels}, growthRate {args.growth_rate}, grFactor/bnFactor 1-2-4, "
             f"bottleneck, prune max, reduction 0.5, exit heads of {args.head_channels} channels; "
             f"{sum(p.numel() for p in build(args, data, 'MSDNet').parameters())} parameters",
             f"- training: {len(data.train)} training images, {args.epochs} epochs, SGD lr "
             f"{args.lr} momentum 0.9, weight decay {args.weight_decay}, x0.1 at 50 % and 75 %, "
             f"batch {args.batch_size}, gamma {args.gamma}; seeds 0..{args.seeds - 1} (the same "
             f"initial weights for every variant of a seed); {args.threads} thread(s); mean train "
             f"time per run {np.mean([r['train_seconds'] for r in runs]):.0f} s",
             f"- test split ({len(data.test)} images); budgeted batch thresholds on the "
             f"validation split ({len(data.val)} images); mean ± std over seeds", ""]
    for key, title, scale in (("accuracy", "top-1 accuracy (%)", 100), ("nll", "NLL (nats)", 1),
                              ("ece", "ECE (%, 15 bins)", 100)):
        lines += [f"Anytime {title} per exit (cumulative FLOPs per example):", "",
                  f"| variant | {cols} |", sep]
        for v in names:
            cells = [cell([r["exits"][k][key] for r in groups[v]], scale, 2 if scale > 1 else 4)
                     for k in range(n_exits)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if base:
        lines += [f"Accuracy difference to {BASELINE} (points, paired by seed):", "",
                  f"| variant | {cols} |", sep]
        for v in names:
            if v == BASELINE:
                continue
            pairs = list(zip(groups[v], base, strict=False))
            cells = [cell([a["exits"][k]["accuracy"] - b["exits"][k]["accuracy"] for a, b in pairs],
                          100) for k in range(n_exits)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lo = max(min(r["flops"] for r in run["budgeted"]) for run in runs)
    hi = min(max(r["flops"] for r in run["budgeted"]) for run in runs)
    grid = np.linspace(lo, hi, GRID_POINTS)
    gcols = " | ".join(f"{g / 1e6:.2f}M" for g in grid)
    gsep = "|---" * (GRID_POINTS + 1) + "|"
    for curve, key, title, scale in (("budgeted", "accuracy", "accuracy (%)", 100),
                                      ("budgeted", "nll", "NLL", 1),
                                      ("budgeted", "ece", "ECE (%)", 100),
                                      ("flat", "accuracy", "accuracy (%) after flat_curve", 100)):
        lines += [f"Budgeted batch {title}, interpolated at mean FLOPs per example:", "",
                  f"| variant | {gcols} |", gsep]
        for v in names:
            values = np.stack([curve_at(r[curve], grid, key) for r in groups[v]])
            cells = [cell(values[:, j], scale, 2 if scale > 1 else 4) for j in range(GRID_POINTS)]
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"Raw per-run numbers: `benchmarks/results/repro_exits_{args.dataset}.json`.")
    append_results(lines)


if __name__ == "__main__":
    main()
