"""Out-of-distribution detection from predictive uncertainty.

OOD inputs are the positive class and the score is an *uncertainty* (higher = more likely OOD).
AUROC and AUPR come from scikit-learn; FPR@95 is the share of OOD inputs still accepted as
in-distribution when the threshold keeps 95 % of the in-distribution inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from .metrics import uncertainty


def score_max_prob(probs, weights=None) -> torch.Tensor:
    """1 - max_c p(c | x) of the predictive."""
    mean = probs.mean(0) if weights is None else torch.einsum("s,snc->nc", weights, probs)
    return 1.0 - mean.max(-1).values.double()


def score_entropy(probs, weights=None) -> torch.Tensor:
    """Predictive entropy H[E p]."""
    return uncertainty(probs, weights)["total"]


def score_mutual_information(probs, weights=None) -> torch.Tensor:
    """Mutual information (epistemic part of the predictive entropy)."""
    return uncertainty(probs, weights)["epistemic"]


SCORES = {"max_prob": score_max_prob, "entropy": score_entropy,
          "mutual_information": score_mutual_information}


def get_score(name: str):
    if callable(name):
        return name
    if name not in SCORES:
        raise ValueError(f"unknown OOD score {name!r}; choose one of {', '.join(SCORES)}")
    return SCORES[name]


def ood_metrics(score_in: torch.Tensor, score_out: torch.Tensor) -> dict[str, float]:
    """``auroc``, ``aupr`` (OOD positive) and ``fpr95`` from uncertainty scores."""
    s_in = np.asarray(score_in.detach().cpu(), dtype=np.float64)
    s_out = np.asarray(score_out.detach().cpu(), dtype=np.float64)
    if len(s_in) == 0 or len(s_out) == 0:
        raise ValueError("need at least one in-distribution and one OOD score")
    labels = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    scores = np.r_[s_in, s_out]
    # Accept as in-distribution when score <= t; t keeps at least 95 % of in-distribution inputs.
    t = np.quantile(s_in, 0.95, method="inverted_cdf")
    return {"auroc": float(roc_auc_score(labels, scores)),
            "aupr": float(average_precision_score(labels, scores)),
            "fpr95": float(np.mean(s_out <= t))}
