"""Distributions over the ordering of units (BNNN, methods.md §1).

An ordering cut ``z ∈ {0..K}`` says how many of ``K`` ordered unit groups are on; its nested
mask is ``m_j = 1[j <= z]``, ``j = 1..K`` (non-increasing in ``j``).

- ``TruncatedGeometric(keep_prob, K)``: nested dropout's prior, ``p(k) = π^k (1-π)`` for
  ``k < K`` and ``p(K) = π^K``.
- ``CategoricalOrdering(probs)``: any pmf (e.g. a fixed ordering equal to a prior).
- ``StickBreakingOrdering(keep_probs)``: ``q(k) = β_1..β_k (1 - β_{k+1})``, ``q(K) = β_1..β_K``,
  with survival ``Q_k = q(z >= k) = β_1..β_k``.
- ``Downhill(probs|logits, temperature, hard)``: the relaxed ordering. A Concrete sample ``s``
  over ``{0..K}`` mapped by reverse cumulative sum to ``d_j = sum_{i >= j} s_i``: a monotone mask
  in ``[0, 1]^K`` that is exactly the nested mask when ``s`` is one-hot. The map is triangular
  with unit Jacobian, so ``log p(d)`` is the Concrete density at ``s_i = d_i - d_{i+1}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import Categorical, RelaxedOneHotCategorical, TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import kl_divergence, register_kl


class OrderingDistribution(TorchDistribution):
    """A categorical over ``z ∈ {0..K}`` built from ordering parameters; ``K = num_groups``."""

    support = constraints.nonnegative_integer
    has_enumerate_support = True

    @property
    def logits(self) -> torch.Tensor:
        """``log p(z = k)``, ``[..., K + 1]``, computed in log space (no underflow for large K)."""
        raise NotImplementedError

    @property
    def probs(self) -> torch.Tensor:  # [..., K + 1]
        return self.logits.exp()

    @property
    def num_groups(self) -> int:
        return self.logits.shape[-1] - 1

    def _categorical(self) -> Categorical:
        return Categorical(logits=self.logits, validate_args=False)

    def sample(self, sample_shape=torch.Size()):
        return self._categorical().sample(sample_shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self._categorical().log_prob(value)

    def enumerate_support(self, expand=True):
        return self._categorical().enumerate_support(expand)

    @property
    def mean(self):
        return (self.probs * torch.arange(self.num_groups + 1, device=self.probs.device)).sum(-1)

    @property
    def variance(self):
        k = torch.arange(self.num_groups + 1, device=self.probs.device, dtype=self.probs.dtype)
        return (self.probs * k**2).sum(-1) - self.mean**2

    def survival(self) -> torch.Tensor:
        """``Q_k = P(z >= k)`` for ``k = 0..K``, ``[..., K + 1]`` (``Q_0 = 1``)."""
        p = self.probs
        tail = p.flip(-1).cumsum(-1).flip(-1)
        return torch.cat([torch.ones_like(p[..., :1]), tail[..., 1:]], -1)

    def entropy(self):
        return self._categorical().entropy()


class TruncatedGeometric(OrderingDistribution):
    """Nested dropout's ordering prior over ``z ∈ {0..K}`` with keep probability ``π``."""

    arg_constraints = {"keep_prob": constraints.unit_interval}

    def __init__(self, keep_prob, num_groups: int, validate_args=None):
        if int(num_groups) < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        self.keep_prob = torch.as_tensor(keep_prob, dtype=torch.get_default_dtype()) \
            if not torch.is_tensor(keep_prob) else keep_prob
        if not (torch.isfinite(self.keep_prob).all() and ((self.keep_prob > 0)
                                                          & (self.keep_prob < 1)).all()):
            raise ValueError(f"keep_prob must be in (0, 1), got {keep_prob}")
        self._k = int(num_groups)
        super().__init__(self.keep_prob.shape, validate_args=validate_args)

    @property
    def logits(self):
        pi = self.keep_prob.unsqueeze(-1)
        k = torch.arange(self._k + 1, device=pi.device, dtype=pi.dtype)
        stop = torch.cat([torch.log1p(-pi).expand(*pi.shape[:-1], self._k), torch.zeros_like(pi)], -1)
        return k * pi.log() + stop

    def survival(self):
        pi = self.keep_prob.unsqueeze(-1)
        return pi ** torch.arange(self._k + 1, device=pi.device, dtype=pi.dtype)

    def expand(self, batch_shape, _instance=None):
        return TruncatedGeometric(self.keep_prob.expand(batch_shape), self._k,
                                  validate_args=False)


class StickBreakingOrdering(OrderingDistribution):
    """``q(z)`` from ``K`` keep probabilities ``β_j`` (``keep_probs [..., K]``), or from their
    logits ``ρ_j`` (``keep_logits``, ``β = sigmoid(ρ)``: exact in log space)."""

    arg_constraints = {"keep_logits": constraints.real_vector}

    def __init__(self, keep_probs=None, keep_logits=None, validate_args=None):
        if (keep_probs is None) == (keep_logits is None):
            raise ValueError("pass exactly one of keep_probs or keep_logits")
        if keep_logits is None:
            keep_probs = torch.as_tensor(keep_probs)
            if not (torch.isfinite(keep_probs).all() and ((keep_probs >= 0) & (keep_probs <= 1)).all()):
                raise ValueError("keep_probs must be probabilities in [0, 1]")
            keep_logits = torch.logit(keep_probs)
        keep_logits = torch.as_tensor(keep_logits)
        if keep_logits.dim() < 1 or keep_logits.shape[-1] < 1:
            raise ValueError("keep probabilities must have shape [..., K] with K >= 1")
        self.keep_logits = keep_logits
        super().__init__(keep_logits.shape[:-1], validate_args=validate_args)

    @property
    def keep_probs(self) -> torch.Tensor:
        return torch.sigmoid(self.keep_logits)

    def survival(self):
        return self._log_survival().exp()

    def _log_survival(self):
        log_q = torch.cumsum(F.logsigmoid(self.keep_logits), -1)
        return torch.cat([torch.zeros_like(log_q[..., :1]), log_q], -1)

    @property
    def logits(self):
        stop = F.logsigmoid(-self.keep_logits)
        return self._log_survival() + torch.cat([stop, torch.zeros_like(stop[..., :1])], -1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return StickBreakingOrdering(
            keep_logits=self.keep_logits.expand(batch_shape + self.keep_logits.shape[-1:]),
            validate_args=False)


class CategoricalOrdering(OrderingDistribution):
    """Any pmf over ``z ∈ {0..K}``: ``probs`` or ``logits`` ``[..., K + 1]`` (normalised here)."""

    arg_constraints = {}

    def __init__(self, probs=None, logits=None, validate_args=None):
        if (probs is None) == (logits is None):
            raise ValueError("pass exactly one of probs or logits")
        logits = torch.as_tensor(probs).log() if logits is None else torch.as_tensor(logits)
        if logits.dim() < 1 or logits.shape[-1] < 2:
            raise ValueError("an ordering pmf needs shape [..., K + 1] with K >= 1")
        self._logits = logits - logits.logsumexp(-1, keepdim=True)
        super().__init__(logits.shape[:-1], validate_args=validate_args)

    @property
    def logits(self):
        return self._logits

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return CategoricalOrdering(logits=self.logits.expand(batch_shape + self.logits.shape[-1:]),
                                   validate_args=False)


def ordering_from_probs(probs) -> torch.Tensor:
    """Nested masks ``[..., K]`` of the one-hot rows of a relaxed or hard sample over {0..K}."""
    return probs.flip(-1).cumsum(-1).flip(-1)[..., 1:]


class Downhill(TorchDistribution):
    """The Downhill distribution: a relaxed nested mask ``d ∈ [0, 1]^K`` (non-increasing).

    Args:
        probs / logits: the ordering pmf over ``{0..K}`` (``[..., K + 1]``), e.g.
            ``StickBreakingOrdering(...).probs``. Pass log-probabilities as ``logits``; the
            official BNNN code passes probabilities as logits (methods.md §1.4), which makes the
            sampled widths nearly uniform — to reproduce that, pass ``logits=probs``.
        temperature: Concrete temperature ``τ > 0``; ``τ -> 0`` recovers the categorical.
        hard: straight-through: the value is the exact binary nested mask of the argmax (whose
            index is distributed exactly as the categorical), gradients are those of the relaxed
            sample. ``log_prob`` of a hard mask is then the categorical log-pmf of its cut,
            written ``sum_k s_k log pi_k`` over the one-hot simplex vector ``s`` of the mask, so
            its value is exact and its gradient flows through the straight-through relaxation
            as the likelihood's does. ``KL(q || p)`` between two hard Downhills is the exact
            categorical KL (registered, so ``TraceMeanField_ELBO`` uses it with its exact
            gradient).
    """

    arg_constraints = {"logits": constraints.real_vector, "temperature": constraints.positive}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, probs=None, logits=None, temperature=1.0, hard: bool = False,
                 validate_args=None):
        if (probs is None) == (logits is None):
            raise ValueError("pass exactly one of probs or logits")
        if logits is None:
            probs = torch.as_tensor(probs)
            if not torch.isfinite(probs).all() or (probs < 0).any() or \
                    not torch.allclose(probs.sum(-1), torch.ones((), dtype=probs.dtype), atol=1e-4):
                raise ValueError("Downhill probs must be a probability vector over {0..K} "
                                 "(finite, >= 0, summing to 1); pass log-probabilities or "
                                 "unnormalised scores as logits instead")
            logits = probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
        elif torch.isnan(torch.as_tensor(logits)).any() or (torch.as_tensor(logits) == math.inf).any():
            raise ValueError("Downhill logits must be finite (or -inf for impossible cuts)")
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.temperature = torch.as_tensor(temperature, dtype=self.logits.dtype,
                                           device=self.logits.device)
        if not (torch.isfinite(self.temperature).all() and (self.temperature > 0).all()):
            raise ValueError(f"Downhill temperature must be finite and > 0, got {temperature}")
        self.hard = hard
        if self.logits.shape[-1] < 2:
            raise ValueError("an ordering needs at least 2 categories (K >= 1)")
        k = self.logits.shape[-1] - 1
        super().__init__(self.logits.shape[:-1], torch.Size([k]), validate_args=validate_args)

    @property
    def probs(self):
        return self.logits.exp()

    def _concrete(self):
        return RelaxedOneHotCategorical(self.temperature, logits=self.logits, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return Downhill(logits=self.logits.expand(batch_shape + self.logits.shape[-1:]),
                        temperature=self.temperature, hard=self.hard, validate_args=False)

    def rsample(self, sample_shape=torch.Size()):
        soft = self._concrete().rsample(sample_shape)
        if self.hard:
            index = soft.argmax(-1, keepdim=True)
            onehot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
            soft = onehot + (soft - soft.detach())  # straight-through: forward value exact
        return ordering_from_probs(soft)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    @staticmethod
    def mask_to_simplex(value):
        """``s = (1 - d_1, d_1 - d_2, ..., d_{K-1} - d_K, d_K)``, ``[..., K + 1]``."""
        ones = torch.ones_like(value[..., :1])
        upper = torch.cat([ones, value], -1)
        lower = torch.cat([value, torch.zeros_like(ones)], -1)
        return upper - lower

    def log_prob(self, value):
        if self.hard:  # s is one-hot in value (its cut), relaxed in gradient
            return (self.mask_to_simplex(value) * self.logits).sum(-1)
        s = self.mask_to_simplex(value).clamp_min(torch.finfo(value.dtype).tiny)
        return self._concrete().log_prob(s / s.sum(-1, keepdim=True))

    def cut(self, value) -> torch.Tensor:
        """The ordering cut of a mask: the largest entry of its simplex vector ``s`` (for a hard
        mask, ``z = sum(d)``)."""
        return self.mask_to_simplex(value).argmax(-1)


class ProbsAsLogitsDownhill(Downhill):
    """The official BNNN code's ordering unit (methods.md §1.4, for comparison only): the Gumbel
    noise is added to the *probabilities* ``q`` instead of ``log q``, so the cut is drawn from
    ``softmax(q)`` (nearly uniform over widths), while ``probs``, ``log_prob`` and the registered
    KL keep meaning the declared ``q``, as the code's KL does. The result is not an ELBO of the
    sampling distribution; the fast path and ``TraceMeanField_ELBO`` optimise the same objective
    with it (``Trace_ELBO``'s Monte Carlo estimate does not, as its draws do not follow ``q``)."""

    def __init__(self, probs, temperature=1.0, hard: bool = False, validate_args=None):
        super().__init__(probs=probs, temperature=temperature, hard=hard,
                         validate_args=validate_args)

    def _concrete(self):
        return RelaxedOneHotCategorical(self.temperature, logits=self.probs, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return ProbsAsLogitsDownhill(self.probs.expand(batch_shape + self.logits.shape[-1:]),
                                     self.temperature, self.hard, validate_args=False)


@register_kl(Downhill, Downhill)
def _kl_downhill(q, p):
    """Exact KL between the cut distributions of two hard (straight-through) Downhills; the
    relaxed densities have no closed form (Pyro then falls back to sampling)."""
    if not (q.hard and p.hard):
        raise NotImplementedError
    return (q.probs * (q.logits - p.logits)).sum(-1)


@register_kl(OrderingDistribution, OrderingDistribution)
def _kl_ordering(q, p):
    """Exact categorical KL between two orderings over the same ``{0..K}``."""
    return kl_divergence(Categorical(probs=q.probs), Categorical(probs=p.probs))
