"""Reproduction: BNNN vs fixed-rate nested dropout at every width (issue 6).

For each seed, trains (a) NestedNet with the learned Downhill ordering and Bayesian weights
under `--weight-prior` (`nested`) and (b) the same ordered network with point weights and masks from the fixed
truncated-geometric prior (`nested-dropout`), then evaluates both at the 16 widths 1 - i/15
(weights sliced, BatchNorm re-estimated per width, 8 Monte Carlo samples) on the test split:
accuracy, NLL, ECE (15 bins), OOD AUROC (predictive entropy; OOD = digits resized to 28x28).
The paper's claim (methods.md §7.1): BNNN better calibrated and better at OOD detection at every
width, accuracy at least as good, a learned decay of accuracy with width.

    python benchmarks/repro_nested.py --dataset fashion-mnist --seeds 3 --epochs 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import append_results, header, mean_std

from bayesdyn.data import default_ood, load
from bayesdyn.distributions import weight_prior
from bayesdyn.evaluation import evaluate
from bayesdyn.inference import fit, resolve_device
from bayesdyn.recipes import Recipe, build

KEYS = ("accuracy", "nll", "ece", "ood_auroc")
METHODS = ("nested", "nested-dropout")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--arch", default="mlp", choices=("mlp", "conv"))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    p.add_argument("--kl-weight", type=float, default=1.0,
                   help="BNNN's KL weight (1: the ELBO; the official code's is ~1e-5 N / fan_in)")
    p.add_argument("--prior-scale", type=float, default=1.0, help="BNNN's Gaussian weight prior")
    p.add_argument("--weight-prior", default="gaussian", choices=("gaussian", "log-uniform", "ard"))
    p.add_argument("--gumbel-logits", default="log_probs", choices=("log_probs", "probs"),
                   help="probs: the official code's bug of feeding q as Gumbel-softmax logits")
    args = p.parse_args()
    device = resolve_device(args.device)
    data = load(args.dataset).to(device)
    results = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:
            torch.manual_seed(seed)
            recipe = Recipe(method, arch=args.arch, width=args.width, kl_weight=args.kl_weight,
                            weight_prior=args.weight_prior, prior_scale=args.prior_scale,
                            gumbel_logits=args.gumbel_logits)
            model, guide = build(recipe, data.input_shape, data.num_classes)
            fit(model, guide, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                schedule="cosine", device=device, seed=seed, progress=False)
            metrics = evaluate(model, guide, data, method=method, seed=seed)
            metrics["q"] = {k: [round(v, 4) for v in probs.tolist()] for k, probs in
                            model.structure_posterior(guide).items() if not k.endswith("prior")}
            results[method].append(metrics)
            print(f"seed {seed} {method}: marginal " + json.dumps(metrics["marginal"]), flush=True)
    record(args, device, results)


def record(args, device, results):
    if not args.no_record:  # raw numbers beside RESULTS.md
        out = Path(__file__).with_name("results")
        out.mkdir(exist_ok=True)
        payload = {"args": vars(args), "results": results}
        name = f"repro_nested_{args.dataset}_{args.arch}_kl{args.kl_weight:g}_{args.weight_prior}"
        name += "_probs-as-logits.json" if args.gumbel_logits == "probs" else ".json"
        (out / name).write_text(json.dumps(payload, indent=1))
    widths = [b["budget"] for b in results[METHODS[0]][0]["budgets"]]
    lines = [*header(f"nested reproduction: BNNN vs nested dropout, {args.dataset}", device),
             f"- ordered {args.arch}, width {args.width}, 16 groups (1 frozen), keep_prob 0.95, "
             f"Downhill temperature 2; Adam lr {args.lr} cosine, batch {args.batch_size}, "
             f"{args.epochs} epochs, {args.seeds} seeds; BNNN KL weight {args.kl_weight}, weight "
             f"prior {weight_prior(args.weight_prior, args.prior_scale)}, Gumbel logits = "
             f"{args.gumbel_logits}; 8 MC samples; OOD = "
             f"{default_ood(args.dataset)}", "",
             "| width | MFLOPs (BNNN / ND) | " + " | ".join(
                 f"{k} BNNN | {k} ND" for k in KEYS) + " |", "|---" * (2 + 2 * len(KEYS)) + "|"]
    for i, width in enumerate([*widths, "marginal"]):
        def row(m, i=i, width=width):
            return [r["marginal"] if width == "marginal" else r["budgets"][i] for r in results[m]]
        cells = []
        for k in KEYS:
            for m in METHODS:
                mu, sd = mean_std([r[k] for r in row(m)])
                cells.append(f"{mu:.4f} ± {sd:.4f}")
        flops = " / ".join(f"{row(m)[0]['flops'] / 1e6:.2f}" for m in METHODS)
        lines.append(f"| {width} | {flops} | " + " | ".join(cells) + " |")
    append_results(lines)


if __name__ == "__main__":
    main()
