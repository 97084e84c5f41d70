"""Deterministic baseline: a plain network trained by maximum likelihood (cross-entropy)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..guides.empty import EmptyGuide
from .base import Budget, DynamicModel, PredictiveSamples, data_plate


class DeterministicNet(DynamicModel):
    """``y ~ Categorical(logits = net(x))`` with point weights; one budget, the full network."""

    def __init__(self, net: nn.Module, num_classes: int, input_shape=None):
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def default_guide(self) -> EmptyGuide:
        return EmptyGuide(self)

    def model(self, x, y=None, dataset_size=None):
        logits = self.net(x)
        with data_plate(x, dataset_size):
            pyro.deterministic("probs", torch.softmax(logits, -1), event_dim=1)
            return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    def fast_loss(self, guide, x, y, dataset_size):
        if type(guide) is not EmptyGuide:
            return NotImplemented
        nll = F.cross_entropy(self.net(x), y, reduction="sum") * (dataset_size / x.shape[0])
        return nll, {"nll": nll}

    def budgets(self, guide=None) -> list[Budget]:
        return [Budget("full", None)]

    def budget_module(self, budget, guide=None) -> nn.Module:
        return self.net

    @torch.no_grad()
    def component_log_likelihood(self, guide, x, y):
        """One component (the point estimate): ``log p(y_n | x_n)`` ``[1, N]``."""
        logits = self.net(x)
        return logits.new_zeros(1), torch.log_softmax(logits, -1).gather(-1, y[:, None]).T

    def predict_probs(self, guide, x, budget=None, num_samples=1) -> PredictiveSamples:
        return PredictiveSamples.equal(torch.softmax(self.net(x), -1)[None])
