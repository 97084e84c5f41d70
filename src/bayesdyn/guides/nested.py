"""The BNNN guide: a stick-breaking Downhill ordering per ordered layer and Gaussian weights."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from torch import nn

from ..distributions import (
                             CategoricalOrdering,
                             Downhill,
                             OrderingDistribution,
                             ProbsAsLogitsDownhill,
                             StickBreakingOrdering,
                             SurvivalWeighted,
)
from ..params import RenamedOnCopy, give_unique_name

RHO_CLIP = 5.0  # learned keep-probabilities stay in [sigmoid(-5), sigmoid(5)] (BNNN code)


class NestedGuide(RenamedOnCopy, AutoGuide):
    """``q(W, z) = prod_l q(z_l) prod_g q(W_{l,g} | z_l)``.

    ``q(z_l)`` is a ``StickBreakingOrdering`` with keep-probabilities ``sigmoid(rho_l)``,
    sampled as a straight-through ``Downhill`` mask. The Gaussian weight posteriors are the mean
    and log-scale parameters held by the model's ``BayesLayer``s (layers own their variational
    parameters, so the fast path and this guide share them); a switched-off group's weights keep
    their prior, so each group's KL counts with its survival probability ``Q_g = q(z >= g)``
    (``SurvivalWeighted``).

    Args:
        model: a ``NestedNet``.
        init_rho: initial ``rho`` (BNNN: 3.0, keep-probability 0.95).
        learn_ordering: False fixes ``q(z) = p(z)`` exactly (nested dropout: masks from the
            prior, whatever it is).
        weights: False leaves the weight sites to another guide (compose with
            ``AutoGuideList``).
        gumbel_logits: ``"log_probs"`` (correct) or ``"probs"``: the official code's Gumbel
            noise on probabilities (``ProbsAsLogitsDownhill``): masks are drawn from
            ``softmax(q)`` (nearly uniform over widths) while the ordering KL and the survival
            weights use ``q``, as the code does. For comparison with the code only: it is not an
            ELBO. The fast path and ``TraceMeanField_ELBO`` optimise the same objective with it.
        kl_weighting: ``"survival"`` (BNNN: a group's weight KL counts while it is on) or
            ``"full"`` (every group's KL always counts).
        nested: the ``NestedNet`` when ``model`` is a ``poutine.block``-ed view of it (as in an
            ``AutoGuideList``).
    """

    def __init__(self, model, init_rho: float = 3.0, learn_ordering: bool = True,
                 weights: bool = True, gumbel_logits: str = "log_probs",
                 kl_weighting: str = "survival", nested=None):
        super().__init__(model)
        give_unique_name(self)  # its own prefix in Pyro's param store
        nested = model if nested is None else nested
        if not hasattr(nested, "net") or not hasattr(nested, "kl_weight"):
            raise TypeError("NestedGuide needs a NestedNet (pass nested=... for a blocked model)")
        if gumbel_logits not in ("log_probs", "probs"):
            raise ValueError(f"gumbel_logits must be 'log_probs' or 'probs', got {gumbel_logits!r}")
        if kl_weighting not in ("survival", "full"):
            raise ValueError(f"kl_weighting must be 'survival' or 'full', got {kl_weighting!r}")
        self._nested = (nested,)  # not a submodule: the model owns the layers
        self.gumbel_logits, self.learn_ordering, self.with_weights = gumbel_logits, learn_ordering, weights
        self.kl_weighting = kl_weighting
        self._sizes = [b.num_orderable for b in nested.net.blocks]
        if learn_ordering:
            self.rho = nn.ParameterList([nn.Parameter(torch.full((k,), float(init_rho)))
                                         for k in self._sizes])
        self.temperature = nested.temperature

    @property
    def net(self):
        return self.nested.net

    @property
    def nested(self):
        return self._nested[0]

    def orderings(self) -> list[OrderingDistribution]:
        """``q(z_l)`` for every ordered layer (the prior itself when the ordering is fixed)."""
        if not self.learn_ordering:
            return [CategoricalOrdering(logits=p) for p in self.nested.prior_logits()]
        return [StickBreakingOrdering(keep_logits=r.clamp(-RHO_CLIP, RHO_CLIP)) for r in self.rho]

    def downhill(self, q: OrderingDistribution, hard: bool = True) -> Downhill:
        if self.gumbel_logits == "probs":
            return ProbsAsLogitsDownhill(q.probs, temperature=self.temperature, hard=hard)
        return Downhill(logits=q.logits, temperature=self.temperature, hard=hard)

    def group_survival(self) -> list[torch.Tensor]:
        """Per Bayesian layer (ordered blocks, then the head), the probability ``[G]`` that each
        unit group is on: 1 for frozen groups and the head, ``Q_g`` for ordered ones (all ones
        with ``kl_weighting="full"``)."""
        out = []
        for q, block in zip(self.orderings(), self.net.blocks, strict=True):
            survival = q.survival()
            if self.kl_weighting == "full":
                survival = torch.ones_like(survival)
            # survival[0] = q(z >= 0) = 1 stands for the frozen groups
            out.append(torch.cat([survival[:1].expand(block.frozen), survival[1:]]))
        out.append(torch.ones(1, device=self.net.head.weight_mu.device))
        return out

    def forward(self, x, y=None, dataset_size=None):
        model = self.nested
        out = {}
        with poutine.scale(scale=model.kl_weight):
            for i, q in enumerate(self.orderings()):
                out[f"order_{i}"] = pyro.sample(f"order_{i}", self.downhill(q))
            if not (self.with_weights and self.net.bayesian):
                return out
            for (name, layer, groups), survival in zip(model.weight_groups(), self.group_survival(),
                                                       strict=True):
                mu = model.grouped(layer.weight_mu, groups)
                q_w = dist.Normal(mu, model.grouped(layer.weight_sigma(), groups)).to_event(mu.dim() - 1)
                q_w = SurvivalWeighted(q_w, model.weight_prior_site(layer, groups), survival)
                with model.group_plate(name, groups):
                    out[name] = pyro.sample(name, q_w)
        return out

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Mode of each ``q(z_l)`` as a nested mask, and the weight means."""
        out = {}
        for i, q in enumerate(self.orderings()):
            k = int(q.logits.argmax())
            out[f"order_{i}"] = (torch.arange(q.num_groups, device=q.logits.device) < k).float()
        for name, layer in self.net.bayes_layers().items():
            out[name] = layer.weight_mu
        return out
