"""Evaluation protocols written once against the budget interface.

- anytime: every metric at every budget, plus the structure-marginalised model;
- budgeted batch (MSDNet, methods.md §2.5): budgets are tried cheapest first and an input stops
  at the first budget whose confidence passes that budget's threshold; thresholds are chosen on
  the validation split for a range of target exit distributions and applied to the test split.
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
    """Thresholds ``[K]`` such that, on these (validation) confidences ``[K, N]``, exactly
    ``floor(N * proportions[k])`` of the inputs still running exit at budget ``k`` (the most
    confident ones). The last threshold is ``-inf``: every remaining input exits there."""
    k_budgets, n = confidence.shape
    thresholds = torch.full((k_budgets,), -math.inf, dtype=torch.float64)
    running = torch.ones(n, dtype=torch.bool)
    for k in range(k_budgets - 1):
        target = int(math.floor(n * float(proportions[k])))
        conf_k = confidence[k].double()
        if target == 0:
            thresholds[k] = math.inf
            continue
        candidates = conf_k[running].sort(descending=True).values
        target = min(target, len(candidates))
        if target == 0:
            thresholds[k] = math.inf
            continue
        thresholds[k] = candidates[target - 1]
        running &= ~(conf_k >= thresholds[k])
    return thresholds


def apply_thresholds(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Index of the budget each input exits at: the first ``k`` with ``conf_k >= t_k``."""
    passed = confidence.double() >= thresholds[:, None]
    passed[-1] = True
    return passed.int().argmax(0)


def budgeted_batch(val_preds, val_labels, test_preds, test_labels, costs, levels: int = 39,
                   n_bins: int = 15) -> list[dict]:
    """The budgeted-batch curve. ``*_preds`` are per-budget ``Prediction`` objects, cheapest first;
    ``costs[k]`` the FLOPs per example of stopping at budget ``k`` (everything computed on the
    way included). Returns one row per level with accuracy, nll, ece and mean ``flops``."""
    val_conf = torch.stack([p.mean.max(-1).values for p in val_preds])
    test_conf = torch.stack([p.mean.max(-1).values for p in test_preds])
    test_means = torch.stack([p.mean for p in test_preds])  # [K, N, C]
    costs_t = torch.tensor([float(c) for c in costs], dtype=torch.float64)
    rows = []
    for level in range(1, levels + 1):
        thresholds = select_thresholds(val_conf, exit_proportions(level, len(val_preds)))
        exit_at = apply_thresholds(test_conf, thresholds)
        probs = test_means[exit_at, torch.arange(len(exit_at))]
        labels = test_labels.cpu()
        rows.append({"level": level,
                     "flops": float(costs_t[exit_at].mean()),
                     "accuracy": float((probs.argmax(-1) == labels).double().mean()),
                     "nll": nll(probs, labels), "ece": ece(probs, labels, n_bins),
                     "exit_fractions": torch.bincount(exit_at, minlength=len(val_preds))
                     .div(len(exit_at)).tolist()})
    return rows
