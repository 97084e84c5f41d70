"""Evaluation protocols written once against the budget interface.

- anytime: every metric at every budget, plus the structure-marginalised model;
- budgeted batch (MSDNet, methods.md §2.5): budgets are tried cheapest first and an input stops
  at the first budget whose confidence passes that budget's threshold; thresholds are chosen on
  the validation split for a range of target exit distributions and applied to the test split
  (``bayesdyn.inference.predict_early_exit`` applies the same thresholds while computing only
  what each input needs); BoostNet's ``flat_curve`` post-processing is a separate step.
"""

from __future__ import annotations

import math

import torch

from .metrics import classification_metrics, ece, nll
from .ood import get_score, ood_metrics


def budget_metrics(pred, labels, pred_ood=None, n_bins: int = 15, ood_score="entropy") -> dict:
    """Classification metrics of one ``Prediction`` (+ OOD metrics against ``pred_ood``)."""
    out = classification_metrics(pred.mean, labels.cpu(), n_bins)
    if pred_ood is not None:
        score = get_score(ood_score)
        ood = ood_metrics(score(pred.probs, pred.weights), score(pred_ood.probs, pred_ood.weights))
        out.update({f"ood_{k}": v for k, v in ood.items()})
    else:
        out.update({"ood_auroc": None, "ood_aupr": None, "ood_fpr95": None})
    return out


def exit_proportions(level: int, num_budgets: int, levels_per_unit: int = 20) -> torch.Tensor:
    """MSDNet's target share of inputs exiting at budget ``k``: ``∝ q^k``, ``q = level / 20``."""
    q = level / levels_per_unit
    p = torch.tensor([q ** (k + 1) for k in range(num_budgets)], dtype=torch.float64)
    return p / p.sum()


def select_thresholds(confidence: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """MSDNet's thresholds ``[K]`` from validation confidences ``[K, N]``: for ``k < K``, with
    ``n_k = floor(N * proportions[k])``, ``t_k`` is the ``n_k``-th largest confidence among the
    inputs still running, and every running input with ``conf_k >= t_k`` exits at ``k``. The last
    threshold is ``-inf``: every remaining input exits there.

    Ties follow MSDNet-PyTorch (``adaptive_inference.py``, ``dynamic_eval_find_threshold``): all
    inputs tied at ``t_k`` exit, so more than ``n_k`` may leave; and when ``n_k`` is 0, or fewer
    than ``n_k`` inputs are still running (earlier ties let more leave), ``t_k`` stays ``+inf``
    (the code's ``1e8``) and no input exits at ``k``. The thresholds depend only on the
    confidences, not on the order of the inputs."""
    k_budgets, n = confidence.shape
    conf = confidence.double()
    thresholds = torch.full((k_budgets,), -math.inf, dtype=torch.float64)
    running = torch.ones(n, dtype=torch.bool, device=conf.device)
    for k in range(k_budgets - 1):
        target = int(math.floor(n * float(proportions[k])))
        remaining = conf[k][running]
        if 1 <= target <= len(remaining):
            thresholds[k] = remaining.topk(target).values[-1]
        else:
            thresholds[k] = math.inf
        running &= conf[k] < thresholds[k]
    return thresholds


def apply_thresholds(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the budget each input exits at: the first ``k`` with ``conf_k >= t_k``."""
    passed = confidence.double() >= thresholds[:, None]
    passed[-1] = True
    return passed.int().argmax(0)


def thresholds_per_level(val_confidence: torch.Tensor, levels: int = 39) -> torch.Tensor:
    """MSDNet's thresholds ``[levels, K]`` for budget levels ``1..levels`` (target exit shares
    ``∝ (level / 20)^k``) from validation confidences ``[K, N]``."""
    k_budgets = val_confidence.shape[0]
    return torch.stack([select_thresholds(val_confidence, exit_proportions(level, k_budgets))
                        for level in range(1, levels + 1)])


def confidence(preds) -> torch.Tensor:
    """Top-1 confidences ``[K, N]`` of per-budget ``Prediction``s (max predictive probability)."""
    return torch.stack([p.mean.max(-1).values for p in preds])


def budgeted_batch(val_preds, val_labels, test_preds, test_labels, costs, levels: int = 39,
                   n_bins: int = 15) -> list[dict]:
    """The budgeted-batch curve. ``*_preds`` are per-budget ``Prediction`` objects, cheapest first;
    ``costs[k]`` the FLOPs per example of stopping at budget ``k`` (everything computed on the
    way included). Returns one row per level with test accuracy, nll, ece, mean ``flops``, the
    share of inputs exiting at each budget and ``val_accuracy`` (what ``flat_curve`` reads)."""
    thresholds = thresholds_per_level(confidence(val_preds), levels)
    test_conf, val_conf = confidence(test_preds), confidence(val_preds)
    test_means = torch.stack([p.mean for p in test_preds])  # [K, N, C]
    val_means = torch.stack([p.mean for p in val_preds])
    costs_t = torch.tensor([float(c) for c in costs], dtype=torch.float64)
    labels, val_labels = test_labels.cpu(), val_labels.cpu()
    rows = []
    for level in range(1, levels + 1):
        exit_at = apply_thresholds(test_conf, thresholds[level - 1])
        probs = test_means[exit_at, torch.arange(len(exit_at))]
        val_exit = apply_thresholds(val_conf, thresholds[level - 1])
        val_probs = val_means[val_exit, torch.arange(len(val_exit))]
        rows.append({"level": level,
                     "flops": float(costs_t[exit_at].mean()),
                     "accuracy": float((probs.argmax(-1) == labels).double().mean()),
                     "nll": nll(probs, labels), "ece": ece(probs, labels, n_bins),
                     "val_accuracy": float((val_probs.argmax(-1) == val_labels).double().mean()),
                     "exit_fractions": torch.bincount(exit_at, minlength=len(test_preds))
                     .div(len(exit_at)).tolist()})
    return rows


def flat_curve(rows: list[dict]) -> list[dict]:
    """BoostNet's ``--flat_curve`` post-processing of a budgeted-batch curve (methods.md §3.4):
    a level whose validation accuracy does not beat the best so far reports the metrics of that
    best level, at its own FLOPs. It makes the curve monotone in validation accuracy and selects
    on it, so report it beside the raw curve, never instead of it. Rows get ``"flat": True``."""
    out, best = [], None
    for row in sorted(rows, key=lambda r: r["level"]):
        if best is None or row["val_accuracy"] > best["val_accuracy"]:
            best = row
        carried = {k: v for k, v in best.items() if k not in ("level", "flops", "exit_fractions")}
        out.append({**row, **carried, "flat": True})
    return out


def pareto_front(rows: list[dict], metric: str = "accuracy", higher_is_better: bool | None = None):
    """The rows no other row beats on both cost and ``metric``, sorted by FLOPs.

    A row is kept when every cheaper-or-equal row is strictly worse on ``metric``: the answer to
    "which predictor is best for at most X FLOPs" is the last kept row with ``flops <= X``.
    ``higher_is_better`` defaults to True for accuracy and OOD AUROC, False otherwise (NLL, ECE,
    Brier, RMSE). Rows whose metric is missing or not finite are ignored.
    """
    if higher_is_better is None:
        higher_is_better = metric in ("accuracy", "ood_auroc", "ood_aupr")
    sign = 1.0 if higher_is_better else -1.0
    usable = [r for r in rows if r.get(metric) is not None and math.isfinite(r[metric])]
    # cheapest first; among equal cost the best first, so it shadows the others
    usable.sort(key=lambda r: (r["flops"], -sign * r[metric]))
    front, best = [], -math.inf
    for row in usable:
        if sign * row[metric] > best:
            front.append(row)
            best = sign * row[metric]
    return front
