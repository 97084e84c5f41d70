"""Plots a person opens: reliability diagram, metric vs FLOPs, OOD histograms, structure
posteriors. Each function returns the matplotlib ``Figure`` and, given ``path``, saves a PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .metrics import reliability


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return fig


def reliability_diagram(probs, labels, n_bins: int = 15, title: str = "", path=None):
    """Accuracy vs confidence per equal-width bin, with the bin counts underneath."""
    r = reliability(probs, labels, n_bins)
    edges = r["edges"].numpy()
    centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    count = r["count"].numpy()
    acc = np.where(count > 0, r["accuracy"].numpy(), np.nan)
    conf = np.where(count > 0, r["confidence"].numpy(), np.nan)
    fig, (ax, axc) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centers, np.nan_to_num(acc), width=width, edgecolor="black", label="accuracy")
    gap_low = np.fmin(acc, conf)
    ax.bar(centers, np.nan_to_num(np.abs(conf - acc)), bottom=np.nan_to_num(gap_low), width=width,
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//",
           label="gap |confidence - accuracy|")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "Reliability diagram")
    axc.bar(centers, count, width=width, color="gray", edgecolor="black")
    axc.set_xlabel("confidence (max predictive probability)")
    axc.set_ylabel("count")
    axc.set_xlim(0, 1)
    return _save(fig, path)


def metric_vs_flops(curves: dict, metric: str = "accuracy", title: str = "", path=None,
                    marginal: dict | None = None):
    """``curves = {label: [{"flops": f, metric: v}, ...]}``: one line per method/protocol.
    ``marginal = {label: {"flops": f, metric: v}}`` adds single points (e.g. marginalised model)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["flops"])
        ax.plot([r["flops"] / 1e6 for r in rows], [r[metric] for r in rows], "o-", ms=3,
                label=label)
    for label, row in (marginal or {}).items():
        ax.plot([row["flops"] / 1e6], [row[metric]], "*", ms=12, label=label)
    ax.set_xlabel("forward MFLOPs per example")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs FLOPs")
    return _save(fig, path)


def ood_histogram(score_in, score_out, score_name: str = "predictive entropy",
                  labels=("in-distribution", "OOD"), title: str = "", path=None):
    """Overlaid, density-normalised histograms of an uncertainty score."""
    s_in, s_out = np.asarray(score_in, dtype=float), np.asarray(score_out, dtype=float)
    bins = np.linspace(min(s_in.min(), s_out.min()), max(s_in.max(), s_out.max()) + 1e-9, 40)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(s_in, bins=bins, alpha=0.6, density=True, label=labels[0])
    ax.hist(s_out, bins=bins, alpha=0.6, density=True, label=labels[1])
    ax.set_xlabel(score_name)
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title or f"OOD detection: {score_name}")
    return _save(fig, path)


def structure_posterior(probs, prior=None, name: str = "depth", labels=None, title: str = "",
                        path=None):
    """Bar plot of a posterior over a structure (depth, width, exit), prior as outlined bars."""
    probs = np.asarray(probs, dtype=float)
    x = np.arange(len(probs))
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(probs) + 2), 3.5))
    ax.bar(x, probs, width=0.7, label="posterior q")
    if prior is not None:
        ax.bar(x, np.asarray(prior, dtype=float), width=0.7, fill=False, edgecolor="black",
               linestyle="--", label="prior p")
    ax.set_xticks(x, labels if labels is not None else [str(i) for i in x])
    ax.set_xlabel(name)
    ax.set_ylabel("probability")
    ax.legend()
    ax.set_title(title or f"Posterior over {name}")
    return _save(fig, path)
