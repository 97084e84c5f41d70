"""Reproduction: DUN vs the deterministic network with the same backbone and epochs (issue 5).

For each seed, trains (a) DepthNet with a uniform prior and q(d) warm-up and (b) the same
backbone at full depth with cross-entropy, then reports test error, NLL, Brier, ECE (15 bins) and
OOD AUROC (predictive entropy; OOD = digits resized to 28x28) as mean ± std over seeds, and VDS
pruning of each DUN (params, FLOPs, accuracy change). The paper's claim (methods.md §4.7, DUN
ResNet-50 on Fashion-MNIST): equal error, better NLL and calibration.

    python benchmarks/repro_depth.py --dataset fashion-mnist --seeds 3 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from common import append_results, header, mean_std

from bayesdyn.data import default_ood, load
from bayesdyn.evaluation import evaluate, measure
from bayesdyn.inference import fit, predict, resolve_device
from bayesdyn.models import DepthNet, DeterministicNet
from bayesdyn.nn import resnet18_depth, resnet50_depth, vds_convnet

KEYS = ("error", "nll", "brier", "ece", "ood_auroc")


def backbone(args, shape, classes):
    if args.arch in ("resnet18", "resnet50"):  # --width: channels of the first stage
        resnet = resnet18_depth if args.arch == "resnet18" else resnet50_depth
        return resnet(shape[0], classes, width=args.width)
    return vds_convnet(shape[0], classes, depth=args.depth, channels=args.width,
                       hidden=args.width // 2)


def train_pair(args, data, seed, device):
    train = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine",
                 device=device, seed=seed, progress=False)
    out = {}
    torch.manual_seed(seed)
    dun = DepthNet(backbone(args, data.input_shape, data.num_classes),
                   num_classes=data.num_classes, input_shape=data.input_shape)
    guide = dun.default_guide()
    started = time.perf_counter()
    fit(dun, guide, data, warmup_epochs=args.warmup, **train)
    out["DUN"] = (dun, guide, time.perf_counter() - started)
    torch.manual_seed(seed)
    stack = backbone(args, data.input_shape, data.num_classes)
    det = DeterministicNet(stack.truncated(stack.max_depth), data.num_classes, data.input_shape)
    det_guide = det.default_guide()
    started = time.perf_counter()
    fit(det, det_guide, data, **train)
    out["deterministic"] = (det, det_guide, time.perf_counter() - started)
    return out


def summarise(metrics: dict) -> dict:
    m = metrics["marginal"]
    return {"error": 1 - m["accuracy"], "nll": m["nll"], "brier": m["brier"], "ece": m["ece"],
            "ood_auroc": m["ood_auroc"]}


def pruning(model, guide, data) -> dict:
    small, small_guide = model.prune(guide)
    full_cost, cut_cost = measure(model, data.input_shape)[-1], measure(small, data.input_shape)[-1]
    x, y = data.test.tensors
    acc = lambda m, g: float((predict(m, g, x).mean.argmax(-1) == y.cpu()).float().mean())  # noqa: E731
    return {"depth": model.backbone.max_depth, "pruned_depth": small.backbone.max_depth,
            "q": [round(v, 4) for v in guide.probs().tolist()],
            "params": full_cost.params, "pruned_params": cut_cost.params,
            "flops": full_cost.flops, "pruned_flops": cut_cost.flops,
            "accuracy": acc(model, guide), "pruned_accuracy": acc(small, small_guide)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=1, help="epochs with q(d) frozen (DUN: 3 of 90)")
    p.add_argument("--arch", default="conv", choices=("conv", "resnet18", "resnet50"),
                   help="resnet50: DUN's ResNet-50 (use --width 64 for the paper's widths)")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    device = resolve_device(args.device)
    data = load(args.dataset).to(device)
    rows = {"DUN": [], "deterministic": []}
    prunes, seconds = [], {"DUN": [], "deterministic": []}
    for seed in range(args.seeds):
        for name, (model, guide, secs) in train_pair(args, data, seed, device).items():
            rows[name].append(summarise(evaluate(model, guide, data, method=name)))
            seconds[name].append(secs)
            if name == "DUN":
                prunes.append(pruning(model, guide, data))
        print(f"seed {seed}: " + json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    record(args, device, rows, prunes, seconds)


def record(args, device, rows, prunes, seconds):
    if not args.no_record:  # raw numbers beside RESULTS.md
        out = Path(__file__).with_name("results")
        out.mkdir(exist_ok=True)
        payload = {"args": vars(args), "rows": rows, "pruning": prunes, "seconds": seconds}
        (out / f"repro_depth_{args.dataset}.json").write_text(json.dumps(payload, indent=1))
    lines = [*header(f"depth reproduction: DUN vs deterministic, {args.dataset}", device),
             f"- backbone: {args.arch} (depth {args.depth}, width {args.width}), Adam lr "
             f"{args.lr} cosine, batch {args.batch_size}, {args.epochs} epochs, q warm-up "
             f"{args.warmup} epoch(s), {args.seeds} seeds; OOD = {default_ood(args.dataset)}",
             "", "| method | " + " | ".join(KEYS) + " | train s |", "|---" * (len(KEYS) + 2) + "|"]
    for name, runs in rows.items():
        cells = [("{:.4f} ± {:.4f}".format(*mean_std([r[k] for r in runs]))) for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(seconds[name]):.0f} |")
    lines += ["", "VDS pruning (d* = min{d : q(d) > 0.95 max q}):", "",
              "| seed | depth -> pruned | params | FLOPs | test accuracy |", "|---|---|---|---|---|"]
    for seed, pr in enumerate(prunes):
        lines.append(f"| {seed} | {pr['depth']} -> {pr['pruned_depth']} | {pr['params']} -> "
                     f"{pr['pruned_params']} | {pr['flops']} -> {pr['pruned_flops']} | "
                     f"{pr['accuracy']:.4f} -> {pr['pruned_accuracy']:.4f} |")
    append_results(lines)


if __name__ == "__main__":
    main()
