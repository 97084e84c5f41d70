"""Reproduction: structured ensemble vs a single network vs a deep ensemble, and the continual
variant vs fine-tuning and one network per task (issue 15; methods.md §5).

Part 1 (Fashion-MNIST, every seed): the same plain MLP (784 -> W -> W -> 10, BatchNorm, ReLU)
as (a) a single network, (b) a deep ensemble of 3 (independent initialisations, trained jointly
by one optimiser), (c) a structured ensemble of 3 extracted from one untrained network (mask
stage with the Gaussian-kernel MMD diversity term, w = 0.01, global pruning q = 0.5, weights
copied from the initialisation), trained the same way. Reported: test accuracy, NLL, ECE (15 and
30 bins), OOD AUROC against digits (predictive entropy), parameters and forward FLOPs.

Part 2 (split Fashion-MNIST, 5 tasks of 2 classes, per-task heads): ``subnets`` (q = 0.5 of the
free channels left free per task, earlier channels frozen) vs ``finetune`` vs ``separate``:
average accuracy, backward transfer, parameters after the last task.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/repro_ensemble.py --seeds 3 --epochs 10 \\
        --mask-epochs 3 --cl-epochs 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import append_results, header, mean_std
from torch.utils.data import TensorDataset

from bayesdyn import recipes
from bayesdyn.data import load
from bayesdyn.ensemble_recipes import continual_run
from bayesdyn.evaluation import ece, evaluate
from bayesdyn.inference import fit, predict

METHODS = {"single": ("ensemble", 1), "deep ensemble (3)": ("ensemble", 3),
           "structured ensemble (3, q=0.5)": ("structured-ensemble", 3)}
# --ablation: the structured ensemble with one option changed at a time
ABLATIONS = {"structured ensemble (3, q=0.5)": {},
             "official MMD": {"divergence": "official"},
             "no diversity term (w = 0)": {"divergence_weight": 0.0},
             "local pruning": {"prune_scope": "local"},
             "logit average": {"combine": "logits"}}


def subset(data, n, seed):
    if n is None or n >= len(data.train):
        return data
    keep = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    data.train = TensorDataset(*(t[keep] for t in data.train.tensors))
    return data


def run_one(args, method, seed):
    data = subset(load("fashion-mnist", root=args.data_root), args.train_size, seed)
    name, members = METHODS.get(method, ("structured-ensemble", 3))
    recipe = recipes.Recipe(name, arch="mlp", depth=2, width=args.width, members=members,
                            prune=0.5, mask_epochs=args.mask_epochs,
                            **(ABLATIONS.get(method, {}) if args.ablation else {}))
    torch.manual_seed(seed)
    model, guide = recipes.build(recipe, data.input_shape, data.num_classes)
    started = time.perf_counter()
    if hasattr(model, "prepare_training"):
        model.prepare_training(data.train, "cpu", seed)
    fit(model, guide, data, epochs=args.epochs, batch_size=128, lr=1e-3, seed=seed,
        early_stopping=args.patience, device="cpu", progress=False)
    seconds = time.perf_counter() - started
    metrics = evaluate(model, guide, data, ood="default", num_samples=1, data_root=args.data_root)
    x, y = data.test.tensors
    ece30 = ece(predict(model, guide, x).mean, y, n_bins=30)
    m = metrics["marginal"]
    return {"method": method, "seed": seed, "accuracy": m["accuracy"], "nll": m["nll"],
            "ece": m["ece"], "ece30": ece30, "ood_auroc": m["ood_auroc"], "params": m["params"],
            "flops": m["flops"], "seconds": seconds,
            "member_params": getattr(model, "member_parameters", lambda: None)()}


def table(rows, methods=METHODS):
    lines = ["| method | accuracy | NLL | ECE (15) | ECE (30) | OOD AUROC (digits) | params | "
             "kFLOPs | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for key, fmt in (("accuracy", ".4f"), ("nll", ".4f"), ("ece", ".4f"), ("ece30", ".4f"),
                         ("ood_auroc", ".4f")):
            mean, std = mean_std([r[key] for r in mine])
            cells.append(f"{mean:{fmt}} ± {std:{fmt}}")
        params, _ = mean_std([r["params"] for r in mine])
        flops, _ = mean_std([r["flops"] for r in mine])
        secs, _ = mean_std([r["seconds"] for r in mine])
        lines.append(f"| {method} | {' | '.join(cells)} | {params:,.0f} | {flops / 1e3:.0f} | "
                     f"{secs:.0f} |")
    return lines


def continual_table(rows):
    lines = ["| method | average accuracy | backward transfer | parameters after task 1 .. 5 |",
             "|---|---|---|---|"]
    for method in ("subnets", "finetune", "separate"):
        mine = [r for r in rows if r["method"] == method]
        acc, acc_sd = mean_std([r["average_accuracy"] for r in mine])
        bwt, bwt_sd = mean_std([r["backward_transfer"] for r in mine])
        params = [round(sum(r["parameters"][t] for r in mine) / len(mine))
                  for t in range(len(mine[0]["parameters"]))]
        lines.append(f"| {method} | {acc:.4f} ± {acc_sd:.4f} | {bwt:+.4f} ± {bwt_sd:.4f} | "
                     f"{', '.join(f'{p:,}' for p in params)} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--mask-epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--cl-epochs", type=int, default=3)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-continual", action="store_true")
    parser.add_argument("--ablation", action="store_true",
                        help="the structured ensemble's options one at a time (no baselines, no "
                             "continual part)")
    parser.add_argument("--out", default="benchmarks/results/repro_ensemble.json")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, cl_rows = [], []
    methods = ABLATIONS if args.ablation else METHODS
    if args.ablation:
        args.skip_continual = True
    for seed in range(args.seeds):
        for method in methods:
            rows.append(run_one(args, method, seed))
            print(json.dumps(rows[-1]), flush=True)
        if not args.skip_continual:
            for method in ("subnets", "finetune", "separate"):
                out = Path("/tmp") / f"repro-cl-{method}-{seed}"
                result = continual_run("fashion-mnist", method, out, data_root=args.data_root,
                                       seed=seed, epochs=args.cl_epochs, width=args.width,
                                       mask_epochs=1)
                cl_rows.append(result)
                print(json.dumps({k: result[k] for k in ("method", "seed", "average_accuracy",
                                                         "backward_transfer", "parameters")}),
                      flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"ensembles": rows, "continual": cl_rows}, indent=1))
    size = f"{args.train_size or 'all'} training examples"
    title = ("ensemble ablation: the structured ensemble's options one at a time" if args.ablation
             else "ensemble reproduction: structured vs single vs deep ensemble")
    lines = [*header(f"{title}, fashion-mnist", torch.device("cpu")), "",
             f"MLP 784-{args.width}-{args.width}-10 (BatchNorm), {size}, Adam 1e-3, batch 128, "
             f"<= {args.epochs} epochs, early stopping patience {args.patience} on validation "
             f"NLL (best weights restored), mask stage {args.mask_epochs} epochs; "
             f"{args.seeds} seeds (mean ± std); per-run figures in {args.out}.", "",
             *table(rows, methods)]
    if cl_rows:
        lines += ["", f"Continual, split Fashion-MNIST (5 tasks of 2 classes), MLP "
                      f"784-{args.width}-{args.width} + per-task heads, {args.cl_epochs} epochs "
                      "per task, mask stage 1 epoch, q = 0.5 of the free channels:", "",
                  *continual_table(cl_rows)]
    if not args.no_record:
        append_results(lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
