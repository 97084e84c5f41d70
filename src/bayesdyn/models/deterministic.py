"""Deterministic baseline: a plain network trained by maximum likelihood (cross-entropy, or a
Gaussian likelihood with a learned noise scale for regression)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..guides.empty import EmptyGuide
from ..validation import check_real
from .base import (
    Budget,
    DynamicModel,
    PredictiveSamples,
    check_output_size,
    classes_of,
    data_plate,
    full_precision,
)


class DeterministicNet(DynamicModel):
    """``y ~ Categorical(logits = net(x))`` (or ``Normal(net(x), sigma)``) with point weights;
    one budget, the full network.

    Args:
        net: maps ``[B, *input_shape]`` to ``[B, C]`` (classification) or ``[B, 1]``.
        num_classes: classes (``None`` for regression).
        likelihood: ``"classification"`` or ``"regression"`` (``sigma`` learned unless
            ``noise_scale`` is given).
    """

    def __init__(self, net: nn.Module, num_classes: int | None = None, input_shape=None,
                 likelihood: str = "classification", noise_scale: float | None = None):
        super().__init__()
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"likelihood must be 'classification' or 'regression', got {likelihood!r}")
        if likelihood == "classification":
            num_classes = classes_of(net, num_classes)
        else:
            check_output_size(net, 1)
        if noise_scale is not None:
            check_real("noise_scale", noise_scale, 0, open_low=True)
        self.net, self.likelihood = net, likelihood
        self.num_classes = num_classes if likelihood == "classification" else None
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        if likelihood == "regression":
            init = 1.0 if noise_scale is None else float(noise_scale)
            self.log_noise = nn.Parameter(torch.tensor(init).log(),
                                          requires_grad=noise_scale is None)

    def default_guide(self) -> EmptyGuide:
        return EmptyGuide(self)

    def model(self, x, y=None, dataset_size=None):
        out = self.net(x)
        with data_plate(x, dataset_size):
            if self.likelihood == "regression":
                return pyro.sample("y", dist.Normal(out.squeeze(-1), self.log_noise.exp()), obs=y)
            pyro.deterministic("probs", torch.softmax(out, -1), event_dim=1)
            return pyro.sample("y", dist.Categorical(logits=out), obs=y)

    def _log_likelihood(self, x, y) -> torch.Tensor:
        """``log p(y_n | x_n)``, ``[B]``."""
        out = full_precision(self.net(x))
        if self.likelihood == "regression":
            return dist.Normal(out.squeeze(-1), self.log_noise.exp()).log_prob(y)
        return -F.cross_entropy(out, y, reduction="none")

    def fast_loss(self, guide, x, y, dataset_size):
        if type(guide) is not EmptyGuide:
            return NotImplemented
        nll = -self._log_likelihood(x, y).sum() * (dataset_size / x.shape[0])
        return nll, {"nll": nll}

    def budgets(self, guide=None) -> list[Budget]:
        return [Budget("full", None)]

    def budget_module(self, budget, guide=None) -> nn.Module:
        return self.net

    @torch.no_grad()
    def component_log_likelihood(self, guide, x, y):
        """One component (the point estimate): ``log p(y_n | x_n)`` ``[1, N]``."""
        loglik = self._log_likelihood(x, y)
        return loglik.new_zeros(1), loglik[None]

    def predict_probs(self, guide, x, budget=None, num_samples=1) -> PredictiveSamples:
        if self.likelihood == "regression":
            raise TypeError("a regression network has no class probabilities: use "
                            "regression_mixture (or bayesdyn.inference.predict_normal)")
        return PredictiveSamples.equal(torch.softmax(self.net(x), -1)[None])

    def regression_mixture(self, guide, x, budget=None):
        """``(log_weights [1], means [1, B], scale)``: one Gaussian."""
        means = self.net(x).squeeze(-1)[None]
        return means.new_zeros(1), means, self.log_noise.exp()
