"""A fitted last-layer Laplace as a Pyro distribution over one exit head's weights, so an
``ExitCalibration`` is a guide of ``BayesianExits`` (fixed Gaussian; matrix-normal factors for
``kron``)."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints


class LaplaceWeights(dist.TorchDistribution):
    """``N(mean, P^{-1})`` over a head's weights ``[C, D + 1]`` (bias as the last column) with
    ``P`` the precision of a ``bayesdyn.inference.lastlayer.HeadLaplace``."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, head, validate_args=None):
        self.head = head
        super().__init__(torch.Size(), head.mean.shape, validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        n = math.prod(sample_shape)
        draws = self.head.sample(n)
        return draws.reshape(*sample_shape, *self.event_shape).to(self.head.mean.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.head.log_density(value.to(self.head.mean.dtype))

    @property
    def mean(self) -> torch.Tensor:
        return self.head.mean

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)
