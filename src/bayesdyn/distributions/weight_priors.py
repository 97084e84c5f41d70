"""Priors over the weights of Bayesian layers, for a mean-field Gaussian guide
``q(w) = N(mu, sigma^2)``. Each prior gives the Pyro model its sample-site distribution and the
fast path its closed-form ``KL(q || p)`` per weight; a test checks one against the other.

- ``GaussianPrior(scale)``: ``N(0, scale^2)``, exact KL.
- ``LogUniformPrior()``: the improper scale-invariant ``p(w) ∝ 1/|w|`` of variational dropout
  (the family BNNN uses, methods.md §1.3). KL depends only on ``alpha = sigma^2 / mu^2``; it has no
  closed form and uses Molchanov et al. (2017)'s approximation, within 0.01 nats of the exact value
  for every ``alpha`` (tested by numerical integration).
- ``ARDPrior()``: ``N(0, s^2)`` with each weight's prior variance at its empirical-Bayes optimum
  ``s^2 = mu^2 + sigma^2``, which makes the KL exactly ``0.5 log(1 + 1/alpha)`` (Kharitonov et al.,
  2018). The model reads ``s`` from the layer's own variational parameters, so use it with the
  layer-held Gaussian weights (``NestedGuide``), not with a separate weight guide.

Both sparsity priors push ``alpha`` up: a weight with ``log alpha > 3`` carries mostly noise.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.kl import kl_divergence, register_kl

# Molchanov et al. (2017), "Variational Dropout Sparsifies Deep Neural Networks", eq. (14)
_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695
# Normalising constant of the improper log-uniform density, chosen so that KL(q || p) -> 0 as
# alpha -> infinity (the convention of the approximation): -0.5 log(2 pi e) - (gamma + log 2) / 2
_LOG_UNIFORM_CONST = -0.5 * math.log(2 * math.pi * math.e) - (0.5772156649015329 + math.log(2)) / 2


def log_alpha(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``log(sigma^2 / mu^2)``: the noise-to-signal ratio of each weight."""
    return 2 * sigma.log() - torch.log(mu * mu + 1e-16)


class SymmetricLogUniform(dist.TorchDistribution):
    """The improper density ``p(w) ∝ 1/|w|`` on the real line (with a fixed normalising constant,
    see the module docstring). It has no samples: use it as a prior, with a guide."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, batch_shape=torch.Size(), validate_args=None):
        super().__init__(torch.Size(batch_shape), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return SymmetricLogUniform(batch_shape, validate_args=False)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return _LOG_UNIFORM_CONST - value.abs().log()

    def sample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "the log-uniform weight prior is improper and has no samples. Pyro's autoguides draw "
            "their initial values from the prior unless told otherwise: pass "
            "init_loc_fn=bayesdyn.guides.init_to_network(model) (start at the network's "
            "weights), or use NestedGuide, whose Gaussian weights are built for this prior")


class WeightPrior:
    """A prior over every weight of a layer. ``proper = False`` marks a prior without draws."""

    name = "prior"
    proper = True

    def site(self, mu: torch.Tensor, sigma: torch.Tensor) -> dist.TorchDistribution:
        """The model's distribution for weights shaped like ``mu`` (batch shape ``mu.shape``)."""
        raise NotImplementedError

    def kl(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``KL(N(mu, sigma^2) || p)`` per weight."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class GaussianPrior(WeightPrior):
    name = "gaussian"

    def __init__(self, scale: float = 1.0):
        if not scale > 0:
            raise ValueError(f"prior scale must be positive, got {scale}")
        self.scale = float(scale)

    def site(self, mu, sigma):
        return dist.Normal(torch.zeros_like(mu), self.scale)

    def kl(self, mu, sigma):
        return (math.log(self.scale) - sigma.log() + (sigma**2 + mu**2) / (2 * self.scale**2)
                - 0.5)

    def __repr__(self):
        return f"GaussianPrior(scale={self.scale})"


class LogUniformPrior(WeightPrior):
    name = "log-uniform"
    proper = False

    def site(self, mu, sigma):
        return SymmetricLogUniform(mu.shape)

    def kl(self, mu, sigma):
        la = log_alpha(mu, sigma)
        return _K1 - _K1 * torch.sigmoid(_K2 + _K3 * la) + 0.5 * torch.nn.functional.softplus(-la)


class ARDPrior(WeightPrior):
    name = "ard"

    def site(self, mu, sigma):
        return dist.Normal(torch.zeros_like(mu), (mu * mu + sigma * sigma).sqrt())

    def kl(self, mu, sigma):
        return 0.5 * torch.nn.functional.softplus(-log_alpha(mu, sigma))


@register_kl(dist.Normal, SymmetricLogUniform)
def _kl_normal_log_uniform(q, p):
    """Molchanov et al.'s approximation, per weight (as ``LogUniformPrior.kl``)."""
    return LogUniformPrior().kl(q.loc, q.scale)


class SurvivalWeighted(dist.TorchDistribution):
    """The guide of a unit group's weights when the group is on with probability ``survival``
    (``Q_g = q(z >= g)``) and its weights keep the prior while it is off (BNNN, methods.md §1.5).

    Draws come from ``posterior`` (when the group is off its weights reach no output, so the
    value does not matter). ``log_prob(w) = Q log q(w) + (1 - Q) log p(w)`` is ``log q(w | z)``
    averaged over the ordering, so ``log p(w) - log_prob(w) = Q (log p(w) - log q(w))``, whose
    expectation is ``-Q KL(q || p)``: the survival-weighted KL term of the ELBO, an unbiased
    estimate under ``Trace_ELBO`` with its gradient in ``Q``, and exactly ``Q KL`` under
    ``TraceMeanField_ELBO`` (registered).

    Args:
        posterior: the group's weight guide, batch shape ``[..., G]``.
        prior: the model's prior of the same weights.
        survival: ``Q`` per group, ``[..., G]``.
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, posterior, prior, survival, validate_args=None):
        self.posterior, self.prior, self.survival = posterior, prior, survival
        batch_shape = torch.broadcast_shapes(posterior.batch_shape, survival.shape)
        super().__init__(batch_shape, posterior.event_shape, validate_args=validate_args)

    @property
    def support(self):
        return self.posterior.support

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return SurvivalWeighted(self.posterior.expand(batch_shape), self.prior.expand(batch_shape),
                                self.survival.expand(batch_shape), validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        return self.posterior.rsample(sample_shape)

    def log_prob(self, value):
        q = self.survival
        return q * self.posterior.log_prob(value) + (1 - q) * self.prior.log_prob(value)


@register_kl(SurvivalWeighted, dist.Distribution)
def _kl_survival_weighted(q, p):
    return q.survival * kl_divergence(q.posterior, p)


WEIGHT_PRIORS = {"gaussian": GaussianPrior, "log-uniform": LogUniformPrior, "ard": ARDPrior}


def weight_prior(spec, scale: float = 1.0) -> WeightPrior:
    """A ``WeightPrior`` from a name (``gaussian`` uses ``scale``) or an instance."""
    if isinstance(spec, WeightPrior):
        return spec
    if spec == "gaussian":
        return GaussianPrior(scale)
    if spec not in WEIGHT_PRIORS:
        raise ValueError(f"unknown weight prior {spec!r}; choose one of "
                         f"{', '.join(WEIGHT_PRIORS)} or pass a WeightPrior")
    return WEIGHT_PRIORS[spec]()
