"""Every family through the one budget interface, on one dataset (issue 17).

Each family is trained with the same optimiser, epochs and seeds on backbones whose *full
network* (its largest budget, one forward pass) costs about the same FLOPs as the deterministic
reference MLP; widths are chosen by measuring, not by formula. Every budget of every family is
then evaluated with ``bayesdyn.evaluation.evaluate`` (accuracy, NLL, ECE, OOD AUROC, the FLOPs of
the predictive that produced them), plus each family's budgeted-batch curve, and one Pareto front
is drawn over all of them.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/compare_families.py --seeds 3 --epochs 5

Post-hoc variants (a fitted model re-used, not re-trained) are listed in ``POST_HOC``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
from common import append_results, header, mean_std, subset

from bayesdyn import recipes
from bayesdyn.data import default_ood, load
from bayesdyn.evaluation import evaluate, measure, pareto_front, plots
from bayesdyn.inference import fit, laplace, resolve_device
from bayesdyn.models import BayesianExits

FAMILIES = ("deterministic", "depth", "nested", "nested-dropout", "exits", "boosted-exits",
            "structured-ensemble", "ensemble")


def laplace_mie(model, guide, data):
    """Meronen et al.'s LA+MIE on a trained exit network: a K-FAC Laplace on every exit head
    (evidence-maximising prior, temperature on validation NLL), exits ensembled by FLOPs."""
    return BayesianExits(model), laplace(model, data, "kron", mie=True)


# name: (family it is fitted on, fn(model, guide, data) -> (model, guide))
POST_HOC = {"boosted-exits + LA+MIE": ("boosted-exits", laplace_mie)}
METRICS = ("accuracy", "nll", "ece", "ood_auroc")
RESULTS_DIR = Path(__file__).with_name("results")


def recipe(args, method: str, width: int) -> recipes.Recipe:
    extra = {"mask_epochs": args.epochs} if method == "structured-ensemble" else {}
    return recipes.Recipe(method, arch="mlp", depth=args.depth, width=width, exits=args.exits,
                          **extra)


def full_flops(args, method: str, width: int, data) -> int:
    """FLOPs of one forward pass of the family's largest budget."""
    model, guide = recipes.build(recipe(args, method, width), data.input_shape, data.num_classes)
    return max(b.flops for b in measure(model, data.input_shape, guide, num_samples=1))


def matched_width(args, method: str, data, target: int) -> int:
    """The width (nested: a multiple of 16) whose full network costs closest to ``target``. A
    structured ensemble is cut from the network its deep ensemble is made of (the paper's
    comparison), so it takes the deep ensemble's width and costs what its pruning leaves."""
    if method == "structured-ensemble":
        method = "ensemble"
    widths = range(16, 4 * args.width + 1, 16 if method.startswith("nested") else 8)
    return min(widths, key=lambda w: abs(math.log(full_flops(args, method, w, data) / target)))


def summarise(metrics: dict) -> dict:
    keep = lambda row: {k: row.get(k) for k in ("flops", "params", *METRICS)}  # noqa: E731
    return {"budgets": [{"budget": b["budget"], **keep(b)} for b in metrics["budgets"]],
            "marginal": keep(metrics["marginal"]),
            "budgeted": [{k: r[k] for k in ("flops", "accuracy", "nll", "ece")}
                         for r in metrics.get("budgeted_batch", [])]}


def train(args, method, width, data, seed, device):
    torch.manual_seed(seed)
    model, guide = recipes.build(recipe(args, method, width), data.input_shape, data.num_classes)
    started = time.perf_counter()
    prepare = getattr(model, "prepare_training", None)  # a structured ensemble's mask stage
    if prepare is not None:
        prepare(data.train, device, seed)
    fit(model, guide, data, device=device, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, schedule="cosine", seed=seed, progress=False)
    return model, guide, time.perf_counter() - started


def run_seed(args, widths, data, seed, device, done):
    """Train every family of ``args.families`` for ``seed`` (skipping runs already in ``done``)
    and evaluate it and its post-hoc variants; yields each run as soon as it is done, so an
    interrupted comparison resumes from the last finished run."""
    for method in args.families:
        variants = [v for v in (method, *(n for n, (base, _) in POST_HOC.items() if base == method))
                    if not any(r["family"] == v and r["seed"] == seed for r in done)]
        if not variants:
            continue
        model, guide, seconds = train(args, method, widths[method], data, seed, device)
        for variant in variants:
            m, g = (model, guide) if variant == method else POST_HOC[variant][1](model, guide, data)
            metrics = evaluate(m, g, data, num_samples=args.samples, seed=seed)
            run = {"family": variant, "seed": seed, "width": widths[method],
                   "train_seconds": seconds, **summarise(metrics)}
            acc = " ".join(f"{b['accuracy']:.3f}" for b in run["budgets"])
            print(f"seed {seed} {variant:<26} {seconds:5.0f} s  budgets {acc}", flush=True)
            yield run


def averaged(runs: list[dict]) -> dict:
    """family -> {"budgets": rows, "marginal": row, "budgeted": rows}, metrics averaged over
    seeds (budgeted-batch rows by level) with ``*_std`` beside each."""
    out = {}
    for family in dict.fromkeys(r["family"] for r in runs):
        group = [r for r in runs if r["family"] == family]

        def mean_rows(rows_per_seed):
            rows = []
            for same in zip(*rows_per_seed, strict=True):
                row = {k: v for k, v in same[0].items() if not isinstance(v, float)}
                for key in ("flops", *METRICS):
                    values = [r[key] for r in same if r.get(key) is not None]
                    if values:
                        row[key], row[f"{key}_std"] = mean_std(values)
                rows.append(row)
            return rows

        out[family] = {"budgets": mean_rows([r["budgets"] for r in group]),
                       "marginal": mean_rows([[r["marginal"]] for r in group])[0],
                       "budgeted": mean_rows([r["budgeted"] for r in group]),
                       "width": group[0]["width"], "seeds": len(group),
                       "train_seconds": float(np.mean([r["train_seconds"] for r in group]))}
    return out


def all_points(table: dict) -> list[dict]:
    """Every (family, predictor) point: each budget, the marginal, each budgeted-batch level."""
    points = []
    for family, t in table.items():
        points += [{**b, "label": f"{family} / {b['budget']}"} for b in t["budgets"]]
        points.append({**t["marginal"], "label": f"{family} / marginal"})
        points += [{**b, "label": f"{family} / budgeted batch"} for b in t["budgeted"]]
    return points


def figure(table: dict, path: Path, title: str):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    colours = dict(zip(table, plt.cm.tab10.colors, strict=False))
    points = all_points(table)
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        curves, styles = {}, {}
        for family, t in table.items():
            curves[family] = t["budgets"]
            styles[family] = {"color": colours[family]}
            if t["budgeted"] and metric != "ood_auroc":  # thresholds chosen for accuracy, no OOD
                curves[f"{family} (budgeted batch)"] = t["budgeted"]
                styles[f"{family} (budgeted batch)"] = {"color": colours[family], "ls": "--",
                                                        "marker": None}
        plots.metric_vs_flops(curves, metric, ax=ax, styles=styles,
                              front=pareto_front(points, metric))
        for family, t in table.items():  # the structure-marginalised predictor: a star
            m = t["marginal"]
            if m.get(metric) is not None and len(t["budgets"]) > 1:
                ax.plot(m["flops"] / 1e6, m[metric], "*", ms=11, color=colours[family], mec="k")
        ax.set_xscale("log")
        ax.get_legend().remove()
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"{title}\nsolid: every budget; dashed: budgeted batch; star: marginal")
    fig.tight_layout(rect=(0, 0.12, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell(row, key, scale=1.0, digits=4):
    if row.get(key) is None:
        return "-"
    return f"{scale * row[key]:.{digits}f} ± {scale * row.get(f'{key}_std', 0.0):.{digits}f}"


def record(args, device, data, widths, table, figure_path):
    lines = [*header(f"all families through one budget interface, {args.dataset}", device),
             f"- backbones: MLPs ({args.depth} residual blocks for deterministic/depth, 2 hidden "
             f"layers for nested, {args.exits} exits for the exit families, {args.depth} hidden "
             f"layers per member of the 3-member ensembles; the structured ensemble is cut (q = 0.5)"
             f" from the deep ensemble's member network after a mask stage of as many epochs), widths "
             f"chosen so the "
             f"full network costs about the deterministic width-{args.width} net's FLOPs: "
             + ", ".join(f"{m} {w}" for m, w in widths.items()),
             f"- training: {len(data.train)} images, {args.epochs} epochs, Adam lr {args.lr} "
             f"cosine, batch {args.batch_size}, seeds 0..{args.seeds - 1}; evaluation: "
             f"{len(data.test)} test images, OOD = {default_ood(args.dataset)}, {args.samples} "
             f"Monte Carlo draws where the predictive samples (their cost is in the FLOPs); "
             f"budgeted batch thresholds on {len(data.val)} validation images", "",
             "| family | budget | MFLOPs | params | accuracy (%) | NLL | ECE (%) | OOD AUROC |",
             "|---|---|---|---|---|---|---|---|"]
    for family, t in table.items():
        for b in [*t["budgets"], {**t["marginal"], "budget": "marginal"}]:
            lines.append(f"| {family} | {b['budget']} | {b['flops'] / 1e6:.3f} | "
                         f"{b.get('params') or '-'} | {cell(b, 'accuracy', 100, 2)} | "
                         f"{cell(b, 'nll')} | {cell(b, 'ece', 100, 2)} | {cell(b, 'ood_auroc')} |")
    for metric in ("accuracy", "nll"):
        front = pareto_front(all_points(table), metric)
        lines += ["", f"Pareto front on {metric} (every budget, marginal and budgeted-batch level "
                  "of every family; mean over seeds):", "",
                  "| MFLOPs | predictor | " + metric + " |", "|---|---|---|"]
        lines += [f"| {p['flops'] / 1e6:.3f} | {p['label']} | {p[metric]:.4f} |" for p in front]
    lines += ["", f"Figure: `benchmarks/results/{figure_path.name}`; raw per-run numbers: "
              f"`benchmarks/results/compare_families_{args.dataset}.json`."]
    append_results(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--families", default=",".join((*FAMILIES, *POST_HOC)))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--width", type=int, default=128, help="the deterministic reference's width")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--exits", type=int, default=4)
    p.add_argument("--train-size", type=int, default=0, help="0: the whole training split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-record", action="store_true", help="print only, write nothing")
    args = p.parse_args()
    names = args.families.split(",")
    unknown = set(names) - set(FAMILIES) - set(POST_HOC)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {', '.join((*FAMILIES, *POST_HOC))}")
    args.families = list(dict.fromkeys(POST_HOC[n][0] if n in POST_HOC else n for n in names))
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = subset(load(args.dataset), args.train_size)
    target = full_flops(args, "deterministic", args.width, data)
    widths = {m: matched_width(args, m, data, target) for m in args.families}
    out = RESULTS_DIR / f"compare_families_{args.dataset}.json"
    settings = {k: v for k, v in vars(args).items() if k not in ("no_record", "families")}
    done = []
    if out.is_file() and not args.no_record:  # resume the same experiment
        done = [r for r in json.loads(out.read_text())["runs"] if r.get("settings") == settings]
    for seed in range(args.seeds):
        for run in run_seed(args, widths, data, seed, device, done):
            done.append({**run, "settings": settings})
            if not args.no_record:
                RESULTS_DIR.mkdir(exist_ok=True)
                out.write_text(json.dumps({"runs": done}, indent=1))
    wanted = [r for r in done if r["family"] in names and r["seed"] < args.seeds]
    table = averaged(wanted)
    figure_path = RESULTS_DIR / f"compare_families_{args.dataset}.png"
    if not args.no_record:
        figure(table, figure_path, f"{args.dataset}: every family, every budget "
                                   f"({args.seeds} seeds)")
        record(args, device, data, widths, table, figure_path)


if __name__ == "__main__":
    main()
