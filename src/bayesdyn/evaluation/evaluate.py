"""``evaluate``: every budget, the marginalised model, budgeted batch, OOD; metrics.json + plots."""

from __future__ import annotations

from pathlib import Path

from ..data import default_ood, load_ood
from ..validation import check_inputs
from . import plots
from .cost import marginal_cost, measure
from .metrics import regression_metrics
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
    ``num_samples``: Monte Carlo draws per input of sampling predictives; the FLOPs reported
    beside each budget are those of its predictive with that many draws.
    Regression models (``model.likelihood == "regression"``) report ``rmse``, ``nll`` (exact
    mixture) and ``nll_gaussian`` (moment-matched, as DUN's tables) in the targets' units.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    regression = getattr(model, "likelihood", "classification") == "regression"
    check_inputs(*data.test.tensors, getattr(model, "num_classes", None),
                 getattr(model, "input_shape", None), what="test inputs", regression=regression)
    if len(data.test) == 0:
        raise ValueError(f"the test split of {data.name} is empty: nothing to evaluate")
    if not regression:
        get_score(ood_score)  # fail on a bad score name before any work
    ood_name = None if regression else (default_ood(data.name, data_root) if ood == "default"
                                        else ood)
    x_ood = load_ood(data, ood_name, root=data_root).tensors[0] if ood_name else None
    model.prepare_evaluation(data.train, guide)
    budgets = measure(model, data.input_shape, guide, num_samples=num_samples)
    flops, params = marginal_cost(model, data.input_shape, guide, num_samples)
    metrics = {"method": method, "dataset": data.name, "seed": seed,
               "train_seconds": train_seconds, "num_samples": num_samples}
    marginal_preds = None
    if regression:
        metrics.update(_regression(model, guide, data, budgets, batch_size))
    else:
        metrics.update({"ood": ood_name, "ood_score": ood_score, "ece_bins": n_bins})
        run = lambda x, b: _predict(model, guide, x, b, num_samples, batch_size)  # noqa: E731
        found, marginal_preds = _classification(run, data, budgets, x_ood, n_bins, ood_score)
        metrics.update(found)
    metrics["marginal"] = {"flops": flops, "params": params, **metrics["marginal"]}
    structure = {k: v.detach().cpu().tolist() for k, v in model.structure_posterior(guide).items()}
    if structure:
        metrics["structure"] = structure
    if out is not None:
        from ..inference.checkpoint import write_json  # inference imports evaluation

        write_json(Path(out) / "metrics.json", metrics)
        write_plots(Path(out) / "plots", metrics, model, guide, data, marginal_preds, n_bins,
                    ood_score)
    return metrics


def _predict(model, guide, x, budget, num_samples, batch_size):
    from ..inference.predict import predict  # here: inference imports evaluation.metrics

    return predict(model, guide, x, budget, num_samples, batch_size)


def _classification(run, data, budgets, x_ood, n_bins, ood_score):
    """The metrics, and the marginal predictions ``(test, ood or None)`` for the plots."""
    x_test, y_test = data.test.tensors
    rows, test_preds = [], []
    for b in budgets:
        test_preds.append(run(x_test, b))
        ood_pred = run(x_ood, b) if x_ood is not None else None
        rows.append({"budget": b.name, "flops": b.flops, "params": b.params,
                     **budget_metrics(test_preds[-1], y_test, ood_pred, n_bins, ood_score)})
    marginal, marginal_ood = run(x_test, None), run(x_ood, None) if x_ood is not None else None
    out = {"marginal": budget_metrics(marginal, y_test, marginal_ood, n_bins, ood_score),
           "budgets": rows}
    if len(budgets) > 1:
        x_val, y_val = data.val.tensors
        val_preds = [run(x_val, b) for b in budgets]
        costs = [b.info["cumulative_flops"] for b in budgets]
        out["budgeted_batch"] = budgeted_batch(val_preds, y_val, test_preds, y_test, costs,
                                               n_bins=n_bins)
    return out, (marginal, marginal_ood)


def _regression(model, guide, data, budgets, batch_size) -> dict:
    from ..inference.predict import predict_normal

    x_test, y_test = data.test.tensors

    def score(budget):
        pred = predict_normal(model, guide, x_test, budget, batch_size)
        return regression_metrics(pred.log_weights, pred.means, pred.scale, y_test.cpu(),
                                  data.target_std)

    rows = [{"budget": b.name, "flops": b.flops, "params": b.params, **score(b)} for b in budgets]
    return {"task": "regression", "marginal": score(None), "budgets": rows}


def write_plots(folder: Path, metrics, model, guide, data, marginal_preds, n_bins,
                ood_score) -> None:
    label = metrics["method"] or "model"
    regression = metrics.get("task") == "regression"
    for metric in ("rmse", "nll", "nll_gaussian") if regression else ("accuracy", "nll", "ece"):
        curves = {f"{label} anytime": metrics["budgets"]}
        if "budgeted_batch" in metrics:
            curves[f"{label} budgeted batch"] = metrics["budgeted_batch"]
        plots.metric_vs_flops(curves, metric, path=folder / f"{metric}_vs_flops.png",
                              marginal={f"{label} marginal": metrics["marginal"]})
    if regression:
        if data.input_shape == (1,):
            plots.regression_bands(model, guide, data, path=folder / "predictive.png")
    else:
        pred, pred_ood = marginal_preds
        plots.reliability_diagram(pred.mean, data.test.tensors[1].cpu(), n_bins,
                                  title=f"{label}, {metrics['dataset']} (marginal)",
                                  path=folder / "reliability.png")
        if pred_ood is not None:
            score = get_score(ood_score)
            plots.ood_histogram(score(pred.probs, pred.weights),
                                score(pred_ood.probs, pred_ood.weights), ood_score,
                                labels=(metrics["dataset"], metrics["ood"]),
                                path=folder / "ood_histogram.png")
    for name, probs in metrics.get("structure", {}).items():
        if name.endswith(" prior"):
            continue
        plots.structure_posterior(probs, metrics["structure"].get(f"{name} prior"), name=name,
                                  path=folder / f"posterior_{name.replace(' ', '_')}.png")
