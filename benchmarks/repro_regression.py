"""Regression reproduction: DUN vs the deterministic network on scikit-learn's diabetes data.

Both use DUN's fully connected net (a linear input layer, residual linear-ReLU-BatchNorm blocks,
a linear output layer) with a Gaussian likelihood and a learned noise scale; DUN puts a uniform
prior over its depths. Each split (seed) draws its own 20 % test set; the tables report RMSE and
the NLL of the exact predictive mixture and of its moment-matched Gaussian (DUN's tables), in the
data's original units, mean ± std over splits (methods.md §4.7 for DUN's UCI numbers).

    python benchmarks/repro_regression.py --splits 5
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import append_results, header, mean_std

from bayesdyn.data import load
from bayesdyn.evaluation import evaluate
from bayesdyn.inference import fit
from bayesdyn.recipes import Recipe, build

KEYS = ("rmse", "nll", "nll_gaussian")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="diabetes")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--patience", type=int, default=30, help="early stopping on validation NLL")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = p.parse_args()
    rows = {"DUN": [], "deterministic": []}
    for split in range(args.splits):
        data = load(args.dataset, seed=split)
        for name, method in (("DUN", "depth"), ("deterministic", "deterministic")):
            torch.manual_seed(split)
            model, guide = build(Recipe(method, depth=args.depth, width=args.width),
                                 data.input_shape, None)
            fit(model, guide, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                early_stopping=args.patience, device="cpu", seed=split, progress=False)
            m = evaluate(model, guide, data, method=name)
            row = {k: m["marginal"][k] for k in KEYS}
            if name == "DUN":
                row["q"] = [round(v, 3) for v in m["structure"]["depth"]]
            rows[name].append(row)
        print(f"split {split}: " + json.dumps({k: v[-1] for k, v in rows.items()}), flush=True)
    record(args, rows)


def record(args, rows):
    if not args.no_record:
        out = Path(__file__).with_name("results")
        out.mkdir(exist_ok=True)
        (out / f"repro_regression_{args.dataset}.json").write_text(
            json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [*header(f"regression: DUN vs deterministic, {args.dataset}", torch.device("cpu")),
             f"- DUN's fully connected net, width {args.width}, {args.depth} blocks (depths "
             f"0..{args.depth}, uniform prior), Gaussian likelihood with a learned scale; Adam lr "
             f"{args.lr}, batch {args.batch_size}, up to {args.epochs} epochs with early stopping "
             f"(patience {args.patience}, validation NLL, best weights kept); {args.splits} random "
             "80/20 splits (seed = split), 10 % of the training part for validation",
             "- metrics in the targets' original units: RMSE, NLL of the exact predictive "
             "mixture, NLL of the moment-matched Gaussian", "",
             "| method | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]
    for name, runs in rows.items():
        cells = ["{:.3f} ± {:.3f}".format(*mean_std([r[k] for r in runs])) for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    q = [statistics.mean(r["q"][d] for r in rows["DUN"]) for d in range(args.depth + 1)]
    lines += ["", f"DUN's mean q(d) over splits: {[round(v, 3) for v in q]}"]
    append_results(lines)


if __name__ == "__main__":
    main()
