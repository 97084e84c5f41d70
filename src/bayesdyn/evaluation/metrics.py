"""Dataset-level metrics on predictive probabilities ``[N, C]`` and labels ``[N]``.

Everything is computed once over the whole dataset (never averaged over batches). ECE bins are
equal-width over the top-1 confidence, ``(i/B, (i+1)/B]`` with 0 in the first bin, so a
confidence of exactly 1.0 is counted (the MSDNet/WACV code drops it, methods.md §2.9).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12


def _check(probs: torch.Tensor, labels: torch.Tensor):
    if probs.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must be [{probs.shape[0]}], got shape {tuple(labels.shape)}")


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    _check(probs, labels)
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log predictive probability of the true class (nats)."""
    _check(probs, labels)
    p = probs.double().gather(-1, labels[:, None]).squeeze(-1)
    return -p.clamp_min(EPS).log().mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over examples of ``sum_c (p_c - 1[y = c])^2``."""
    _check(probs, labels)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).double()
    return ((probs.double() - onehot) ** 2).sum(-1).mean().item()


def reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
                adaptive: bool = False) -> dict[str, torch.Tensor]:
    """Per-bin ``count``, mean ``confidence`` and ``accuracy`` of the top-1 prediction, with bin
    ``edges`` ``[n_bins + 1]``. ``adaptive=True`` uses equal-mass bins (adaptive ECE), whose
    edges are the confidences at ranks ``i N / n_bins``; an input belongs to a bin by its value,
    so tied confidences share a bin whatever their order (bins may then hold unequal counts)."""
    _check(probs, labels)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    if adaptive:  # equal-mass edges from the sorted confidences; ties always share a bin
        sorted_conf = conf.sort().values
        cut_at = torch.arange(1, n_bins, device=conf.device) * len(conf) // n_bins
        cuts = sorted_conf[cut_at] if len(conf) else sorted_conf.new_zeros(0)
        bin_of = torch.searchsorted(cuts, conf, right=True)
        edges = torch.cat([cuts.new_zeros(1), cuts, cuts.new_ones(1)]).cpu()
    else:
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
        bin_of = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    count.index_add_(0, bin_of, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, bin_of, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, bin_of, correct)
    safe = count.clamp_min(1)
    return {"edges": edges, "count": count.cpu(), "confidence": (conf_sum / safe).cpu(),
            "accuracy": (acc_sum / safe).cpu()}


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15,
        adaptive: bool = False) -> float:
    """Expected calibration error: ``sum_b |B_b|/N * |acc_b - conf_b|``."""
    r = reliability(probs, labels, n_bins, adaptive)
    n = r["count"].sum().clamp_min(1)
    return ((r["count"] / n) * (r["accuracy"] - r["confidence"]).abs()).sum().item()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) over the last dim."""
    p = probs.double()
    return -(p * p.clamp_min(EPS).log()).sum(-1)


def uncertainty(probs: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Decomposition of sampled predictives ``probs [S, N, C]`` (weights ``[S]``, default equal):
    ``total`` = H[E p], ``aleatoric`` = E H[p], ``epistemic`` = their difference (mutual
    information between the label and the sampled structure/weights). Each ``[N]``."""
    if probs.ndim != 3:
        raise ValueError(f"probs must be [S, N, C], got shape {tuple(probs.shape)}")
    if weights is None:
        weights = torch.full(probs.shape[:1], 1.0 / probs.shape[0], device=probs.device)
    w = weights.double()
    mean = torch.einsum("s,snc->nc", w, probs.double())
    total = entropy(mean)
    aleatoric = torch.einsum("s,sn->n", w, entropy(probs))
    return {"total": total, "aleatoric": aleatoric, "epistemic": (total - aleatoric).clamp_min(0)}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor,
                           n_bins: int = 15) -> dict[str, float]:
    """accuracy, nll, brier, ece (equal-width) and adaptive ece, all dataset-level."""
    return {"accuracy": accuracy(probs, labels), "nll": nll(probs, labels),
            "brier": brier(probs, labels), "ece": ece(probs, labels, n_bins),
            "adaptive_ece": ece(probs, labels, n_bins, adaptive=True)}


def mixture_moments(log_weights: torch.Tensor, means: torch.Tensor, scale) -> tuple:
    """Mean and variance ``[N]`` of the Gaussian mixture ``sum_k w_k N(means[k], scale^2)``
    (``log_weights [K]``, ``means [K, N]``, ``scale`` a number or ``[K, N]``)."""
    w = log_weights.double().exp()[:, None]
    means = means.double()
    mean = (w * means).sum(0)
    second = (w * (torch.as_tensor(scale, dtype=torch.float64) ** 2 + means**2)).sum(0)
    return mean, (second - mean**2).clamp_min(0)


def regression_metrics(log_weights: torch.Tensor, means: torch.Tensor, scale, y: torch.Tensor,
                       target_std: float = 1.0) -> dict[str, float]:
    """Dataset-level metrics of a Gaussian-mixture predictive on standardised targets ``y [N]``,
    in the original units (``target_std`` undoes the scaling): ``rmse`` of the predictive mean,
    ``nll`` under the exact mixture, ``nll_gaussian`` under the moment-matched Gaussian (the one
    DUN's tables use)."""
    y = y.double()
    scale = torch.as_tensor(scale, dtype=torch.float64)
    mean, var = mixture_moments(log_weights, means, scale)
    log_units = math.log(target_std)
    component = torch.distributions.Normal(means.double(), scale).log_prob(y)  # [K, N]
    log_p = torch.logsumexp(log_weights.double()[:, None] + component, 0)
    gauss = torch.distributions.Normal(mean, var.sqrt()).log_prob(y)
    return {"rmse": float(((mean - y) ** 2).mean().sqrt()) * target_std,
            "nll": float(-log_p.mean()) + log_units,
            "nll_gaussian": float(-gauss.mean()) + log_units}
