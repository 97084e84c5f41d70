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
from bayesdyn.nn import resnet18_depth, resnet50_depth, resnet_depth, vds_convnet

KEYS = ("error", "nll", "brier", "ece", "ood_auroc")


def backbone(args, shape, classes):
    if args.arch in ("resnet18", "resnet50"):  # --width: channels of the first stage
        resnet = resnet18_depth if args.arch == "resnet18" else resnet50_depth
        return resnet(shape[0], classes, width=args.width)
    if args.arch == "dun-mini":  # DUN's ResNet-50 layout, one bottleneck per stage: CPU-sized
        w = args.width
        return resnet_depth(shape[0], classes, (1, 1, 1, 1), (w, 2 * w, 4 * w, 8 * w),
                            "bottleneck", shared_stages=1)
    return vds_convnet(shape[0], classes, depth=args.depth, channels=args.width,
                       hidden=args.width // 2)


def train_pair(args, data, seed, device):
    train = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 schedule=args.schedule, optimizer=args.optimizer, momentum=args.momentum,
                 weight_decay=args.weight_decay, crop_padding=args.crop_padding,
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
    p.add_argument("--arch", default="conv", choices=("conv", "resnet18", "resnet50", "dun-mini"),
                   help="resnet50: DUN's ResNet-50 (use --width 64 for the paper's widths); "
                        "dun-mini: its layout with one bottleneck per stage")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "multistep"))
    p.add_argument("--crop-padding", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None,
                   help="train on a seeded subset of this many images (CPU time)")
    p.add_argument("--dun-recipe", action="store_true",
                   help="DUN's image recipe: SGD lr 0.1, momentum 0.9, weight decay 1e-4, "
                        "x0.1 at 50%% and 75%% of the epochs, random crop with padding 2")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    if args.dun_recipe:
        args.optimizer, args.lr, args.momentum, args.weight_decay = "sgd", 0.1, 0.9, 1e-4
        args.schedule, args.crop_padding = "multistep", 2
    device = resolve_device(args.device)
    data = load(args.dataset)
    if args.train_size:
        keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
        data.train = torch.utils.data.TensorDataset(*(t[keep[:args.train_size]]
                                                      for t in data.train.tensors))
    data = data.to(device)
    rows = {"DUN": [], "deterministic": []}
    prunes, seconds = [], {"DUN": [], "deterministic": []}
    for seed in range(args.seeds):
        for name, (model, guide, secs) in train_pair(args, data, seed, device).items():
            rows[name].append(summarise(evaluate(model, guide, data, method=name)))
            seconds[name].append(secs)
            if name == "DUN":
                prunes.append(pruning(model, guide, data))
        print(f"seed {seed}: " + json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    record(args, device, rows, prunes, seconds, data)


def record(args, device, rows, prunes, seconds, data):
    if not args.no_record:  # raw numbers beside RESULTS.md
        out = Path(__file__).with_name("results")
        out.mkdir(exist_ok=True)
        payload = {"args": vars(args), "rows": rows, "pruning": prunes, "seconds": seconds}
        suffix = f"_{args.arch}_dun-recipe" if args.dun_recipe else ""
        (out / f"repro_depth_{args.dataset}{suffix}.json").write_text(json.dumps(payload, indent=1))
    lines = [*header(f"depth reproduction: DUN vs deterministic, {args.dataset}", device),
             f"- backbone: {args.arch} ("
             f"{f'depth {args.depth}, ' if args.arch == 'conv' else ''}width {args.width}), "
             f"{args.optimizer} lr {args.lr} {args.schedule} (momentum {args.momentum}, weight "
             f"decay {args.weight_decay} on point weights), random crop padding "
             f"{args.crop_padding}, batch {args.batch_size}, {args.epochs} epochs, q warm-up "
             f"{args.warmup} epoch(s), {args.seeds} seeds, "
             f"{args.train_size or len(data.train)} training images; OOD = "
             f"{default_ood(args.dataset)}",
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
