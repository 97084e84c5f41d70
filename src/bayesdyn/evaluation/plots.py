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
                    marginal: dict | None = None, front: list | None = None, ax=None,
                    styles: dict | None = None):
    """``curves = {label: [{"flops": f, metric: v}, ...]}``: one line per method/protocol.
    ``marginal = {label: {"flops": f, metric: v}}`` adds single points (e.g. marginalised model);
    ``front`` (rows of ``pareto_front``) is drawn as a black staircase. With ``ax`` the plot goes
    into that axes (a panel of a larger figure) and nothing is saved; ``styles`` maps a label
    to matplotlib keyword arguments (colour, line style) for its curve."""
    own = ax is None
    fig, ax = plt.subplots(figsize=(5.5, 4)) if own else (ax.figure, ax)
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["flops"])
        style = {"marker": "o", "ms": 3, **(styles or {}).get(label, {})}
        ax.plot([r["flops"] / 1e6 for r in rows], [r[metric] for r in rows], label=label, **style)
    for label, row in (marginal or {}).items():
        ax.plot([row["flops"] / 1e6], [row[metric]], "*", ms=12, label=label)
    if front:
        ax.step([r["flops"] / 1e6 for r in front], [r[metric] for r in front], "k-", where="post",
                lw=2, alpha=0.6, label="Pareto front", zorder=0)
    ax.set_xlabel("forward MFLOPs per example")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{metric} vs FLOPs")
    return _save(fig, path) if own else fig


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


def regression_bands(model, guide, data, points: int = 300, title: str = "", path=None):
    """1-D regression: the training data, the marginal predictive mean with a ±2 sd band, and
    the mean of every budget (e.g. every depth), in the data's original units."""
    import torch

    from ..inference.predict import predict_normal

    x_train, y_train = (t.cpu() for t in data.train.tensors)
    lo, hi = float(x_train.min()), float(x_train.max())
    pad = 0.25 * (hi - lo)
    grid = torch.linspace(lo - pad, hi + pad, points)[:, None]
    unscale_x = lambda x: (x * data.std[0] + data.mean[0]).numpy().ravel()  # noqa: E731
    unscale_y = lambda y: (y * data.target_std + data.target_mean).numpy()  # noqa: E731
    device = next(model.parameters()).device
    marginal = predict_normal(model, guide, grid.to(device))
    mean, sd = marginal.mean, marginal.variance.sqrt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(unscale_x(x_train), unscale_y(y_train), s=6, c="gray", alpha=0.6, label="training data")
    gx = unscale_x(grid)
    budgets = model.budgets(guide)
    for i, b in enumerate(budgets):
        m = predict_normal(model, guide, grid.to(device), b).means[0]
        ax.plot(gx, unscale_y(m), lw=0.8, alpha=0.6, color=plt.cm.viridis(i / max(len(budgets) - 1, 1)),
                label=b.name if i in (0, len(budgets) - 1) else None)
    ax.plot(gx, unscale_y(mean), "k", lw=2, label="marginal mean")
    ax.fill_between(gx, unscale_y(mean - 2 * sd), unscale_y(mean + 2 * sd), color="tab:blue",
                    alpha=0.2, label="marginal ±2 sd")
    y_lo, y_hi = float(unscale_y(y_train).min()), float(unscale_y(y_train).max())
    ax.set_ylim(y_lo - 0.75 * (y_hi - y_lo), y_hi + 0.75 * (y_hi - y_lo))  # extrapolation may explode
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(fontsize=8)
    ax.set_title(title or "Predictive distribution")
    return _save(fig, path)
