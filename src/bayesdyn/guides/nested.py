"""The BNNN guide: a stick-breaking Downhill ordering per ordered layer and Gaussian weights."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from torch import nn

from ..distributions import Downhill, StickBreakingOrdering
from ..params import give_unique_name

RHO_CLIP = 5.0  # keep-probabilities stay in [sigmoid(-5), sigmoid(5)] (BNNN code)


class NestedGuide(AutoGuide):
    """``q(W, z) = prod_l q(z_l) prod_g q(W_{l,g})``.

    ``q(z_l)`` is a ``StickBreakingOrdering`` with keep-probabilities ``sigmoid(rho_l)``,
    sampled as a straight-through ``Downhill`` mask. The Gaussian weight posteriors are the mean
    and log-scale parameters held by the model's ``BayesLayer``s (layers own their variational
    parameters, so the fast path and this guide share them).

    Args:
        model: a ``NestedNet``.
        init_rho: initial ``rho`` (BNNN: 3.0, keep-probability 0.95).
        learn_ordering: False fixes ``q(z) = p(z)`` (nested dropout: masks from the prior).
        weights: False leaves the weight sites to another guide (compose with
            ``AutoGuideList``).
        gumbel_logits: ``"log_probs"`` (correct) or ``"probs"``, the official code's behaviour of
            passing probabilities as Gumbel-softmax logits (methods.md §1.4), for comparison.
        nested: the ``NestedNet`` when ``model`` is a ``poutine.block``-ed view of it (as in an
            ``AutoGuideList``).
    """

    def __init__(self, model, init_rho: float = 3.0, learn_ordering: bool = True,
                 weights: bool = True, gumbel_logits: str = "log_probs", nested=None):
        super().__init__(model)
        give_unique_name(self)  # its own prefix in Pyro's param store
        nested = model if nested is None else nested
        if not hasattr(nested, "net") or not hasattr(nested, "kl_weight"):
            raise TypeError("NestedGuide needs a NestedNet (pass nested=... for a blocked model)")
        self._nested = (nested,)  # not a submodule: the model owns the layers
        net = nested.net
        if gumbel_logits not in ("log_probs", "probs"):
            raise ValueError(f"gumbel_logits must be 'log_probs' or 'probs', got {gumbel_logits!r}")
        self.gumbel_logits, self.learn_ordering, self.with_weights = gumbel_logits, learn_ordering, weights
        sizes = [b.num_orderable for b in net.blocks]
        if learn_ordering:
            self.rho = nn.ParameterList([nn.Parameter(torch.full((k,), float(init_rho))) for k in sizes])
        else:
            prior = nested.prior_keep_logit
            for i, k in enumerate(sizes):
                self.register_buffer(f"rho_fixed_{i}", torch.full((k,), float(prior)))
        self._sizes = sizes
        self.temperature = nested.temperature

    @property
    def net(self):
        return self.nested.net

    @property
    def nested(self):
        return self._nested[0]

    def rhos(self) -> list[torch.Tensor]:
        if self.learn_ordering:
            return list(self.rho)
        return [getattr(self, f"rho_fixed_{i}") for i in range(len(self._sizes))]

    def orderings(self) -> list[StickBreakingOrdering]:
        """``q(z_l)`` for every ordered layer."""
        return [StickBreakingOrdering(torch.sigmoid(r.clamp(-RHO_CLIP, RHO_CLIP))) for r in self.rhos()]

    def downhill(self, q: StickBreakingOrdering, hard: bool = True) -> Downhill:
        if self.gumbel_logits == "probs":
            return Downhill(logits=q.probs, temperature=self.temperature, hard=hard)
        return Downhill(probs=q.probs, temperature=self.temperature, hard=hard)

    def forward(self, x, y=None, dataset_size=None):
        model = self.nested
        out = {}
        with poutine.scale(scale=model.kl_weight):
            for i, q in enumerate(self.orderings()):
                out[f"order_{i}"] = pyro.sample(f"order_{i}", self.downhill(q))
            if self.with_weights and self.net.bayesian:
                masks = [model.squeeze_mask(out[f"order_{i}"]) for i in range(len(self._sizes))]
                for name, layer, groups, active in model.weight_groups(masks):
                    q_w = dist.Normal(model.grouped(layer.weight_mu, groups),
                                      model.grouped(layer.weight_sigma(), groups))
                    with model.group_plate(name, groups), poutine.mask(mask=active):
                        out[name] = pyro.sample(name, q_w.to_event(layer.weight_mu.dim()))
        return out

    @torch.no_grad()
    def median(self, *args, **kwargs):
        """Mode of each ``q(z_l)`` as a nested mask, and the weight means."""
        out = {}
        for i, q in enumerate(self.orderings()):
            k = int(q.probs.argmax())
            out[f"order_{i}"] = (torch.arange(q.num_groups, device=q.probs.device) < k).float()
        for name, layer in self.net.bayes_layers().items():
            out[name] = layer.weight_mu
        return out
