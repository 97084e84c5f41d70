"""``evaluate``: every budget, the marginalised model, budgeted batch, OOD; metrics.json + plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data import default_ood, load_ood
from . import plots
from .cost import marginal_cost, measure
from .ood import get_score
from .protocols import budget_metrics, budgeted_batch


def evaluate(model, guide, data, *, ood: str | None = "default", out=None, method: str = "",
             seed: int | None = None, train_seconds: float | None = None, num_samples: int = 8,
             n_bins: int = 15, ood_score: str = "entropy", data_root=None,
             batch_size: int = 2048) -> dict:
    """Evaluate ``model``/``guide`` on ``data.test`` at every budget and marginalised.

    Returns (and, with ``out``, writes to ``out/metrics.json`` with plots in ``out/plots``) the
    metrics.json structure of design.md, plus ``budgeted_batch`` rows when there are several
    budgets and ``structure`` (posteriors over depth/width/exit) when the model has one.
    ``ood="default"`` uses ``bayesdyn.data.default_ood(data.name)``; ``None`` skips OOD.
    """
    from ..inference.predict import predict  # here: inference imports evaluation.metrics

    get_score(ood_score)  # fail on a bad score name before any work
    ood_name = default_ood(data.name, data_root) if ood == "default" else ood
    x_ood = load_ood(data, ood_name, root=data_root).tensors[0] if ood_name else None
    x_test, y_test = data.test.tensors
    run = lambda x, b: predict(model, guide, x, b, num_samples, batch_size)  # noqa: E731
    model.prepare_evaluation(data.train, guide)
    budgets = measure(model, data.input_shape, guide, num_samples=num_samples)
    rows, test_preds = [], []
    for b in budgets:
        test_preds.append(run(x_test, b))
        ood_pred = run(x_ood, b) if x_ood is not None else None
        rows.append({"budget": b.name, "flops": b.flops, "params": b.params,
                     **budget_metrics(test_preds[-1], y_test, ood_pred, n_bins, ood_score)})
    marginal_pred = run(x_test, None)
    marginal_ood = run(x_ood, None) if x_ood is not None else None
    flops, params = marginal_cost(model, data.input_shape, guide, num_samples)
    metrics = {"method": method, "dataset": data.name, "seed": seed,
               "train_seconds": train_seconds, "ood": ood_name, "ood_score": ood_score,
               "ece_bins": n_bins, "num_samples": num_samples,
               "marginal": {"flops": flops, "params": params,
                            **budget_metrics(marginal_pred, y_test, marginal_ood, n_bins,
                                             ood_score)},
               "budgets": rows}
    if len(budgets) > 1:
        x_val, y_val = data.val.tensors
        val_preds = [run(x_val, b) for b in budgets]
        costs = [b.info["cumulative_flops"] for b in budgets]
        metrics["budgeted_batch"] = budgeted_batch(val_preds, y_val, test_preds, y_test, costs,
                                                   n_bins=n_bins)
    structure = {k: v.detach().cpu().tolist() for k, v in model.structure_posterior(guide).items()}
    if structure:
        metrics["structure"] = structure
    if out is not None:
        write_json(Path(out) / "metrics.json", metrics)
        write_plots(Path(out) / "plots", metrics, marginal_pred, marginal_ood, y_test, n_bins,
                    ood_score)
    return metrics


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_plots(folder: Path, metrics, pred, pred_ood, labels, n_bins, ood_score) -> None:
    label = metrics["method"] or "model"
    plots.reliability_diagram(pred.mean, labels.cpu(), n_bins,
                              title=f"{label}, {metrics['dataset']} (marginal)",
                              path=folder / "reliability.png")
    for metric in ("accuracy", "nll", "ece"):
        curves = {f"{label} anytime": metrics["budgets"]}
        if "budgeted_batch" in metrics:
            curves[f"{label} budgeted batch"] = metrics["budgeted_batch"]
        plots.metric_vs_flops(curves, metric, path=folder / f"{metric}_vs_flops.png",
                              marginal={f"{label} marginal": metrics["marginal"]})
    if pred_ood is not None:
        score = get_score(ood_score)
        plots.ood_histogram(score(pred.probs, pred.weights), score(pred_ood.probs, pred_ood.weights),
                            ood_score, labels=(metrics["dataset"], metrics["ood"]),
                            path=folder / "ood_histogram.png")
    for name, probs in metrics.get("structure", {}).items():
        if name.endswith(" prior"):
            continue
        plots.structure_posterior(probs, metrics["structure"].get(f"{name} prior"), name=name,
                                  path=folder / f"posterior_{name.replace(' ', '_')}.png")
