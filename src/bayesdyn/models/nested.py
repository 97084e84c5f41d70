"""NestedNet: Bayesian nested networks (BNNN, methods.md §1) and the nested-dropout baseline.

Per ordered layer ``l`` an ordering mask ``z_l`` (a Downhill sample) switches unit groups off
from the back; weights are Gaussian. The model:

    z_l ~ Downhill(TruncatedGeometric(keep_prob, K))        (hard, straight-through)
    W_{l,g} ~ weight prior (Gaussian, log-uniform or ARD)
    y_n ~ Categorical(logits = f(x_n; W, z))

With the guide's weights equal to the prior on switched-off groups, the expected KL of the
weights is ``sum_g Q_g KL_g`` with ``Q_g = q(z >= g)`` (methods.md §1.5); the guide states it
per group (``SurvivalWeighted``). The family's reference ELBO is Pyro's ``TraceMeanField_ELBO``:
with the registered KLs it computes ``KL(q(z) || p(z))`` and ``sum_g Q_g KL_g`` exactly, and the
likelihood from one straight-through draw, as the fast path does, in value and gradient.
``Trace_ELBO`` also works: it estimates the same ELBO by sampling, with the ordering KL's gradient
taken through the straight-through relaxation.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from torch import nn

from ..distributions import Downhill, OrderingDistribution, TruncatedGeometric
from ..distributions import weight_prior as _weight_prior
from ..distributions.weight_priors import log_alpha
from ..guides.nested import NestedGuide
from ..nn.ordered import OrderedNet
from ..validation import check_real
from .base import (
    Budget,
    DynamicModel,
    PredictiveSamples,
    classes_of,
    data_plate,
    full_precision,
    vectorized_trace,
)

NUM_WIDTHS = 16  # widths 1 - i/15, i = 0..15 (BNNN's evaluation grid)


class NestedNet(DynamicModel):
    """Pyro model of an ``OrderedNet`` with a latent ordering per ordered layer.

    Args:
        net: an ``OrderedNet`` (``bayesdyn.nn.nested_mlp`` / ``nested_convnet``); with point
            weights (``bayesian=False``) and a guide with ``learn_ordering=False`` this is
            nested dropout.
        keep_prob: ``π`` of the truncated-geometric ordering prior (BNNN: 0.95).
        ordering_prior: any ``OrderingDistribution`` over ``{0..K}`` instead (one for all layers
            or a list, one per layer).
        weight_prior: ``"gaussian"`` (``N(0, prior_scale^2)``), ``"log-uniform"`` (the
            improper sparsity prior of variational dropout, as in BNNN), ``"ard"`` (Gaussian with
            per-weight variance at its empirical-Bayes optimum) or any
            ``bayesdyn.distributions.WeightPrior``.
        prior_scale: standard deviation of the Gaussian weight prior.
        temperature: Downhill temperature (BNNN: 2.0, fixed).
        kl_weight: multiplies every KL term (1.0: the ELBO; the BNNN code's effective weight is
            about ``1e-5 * N / fan_in`` per weight, methods.md §1.5).

    Whether a group's weight KL counts only while it is on (BNNN) is the guide's choice
    (``NestedGuide(kl_weighting=...)``); a weight guide that does not know the orderings, e.g.
    ``AutoNormal``, counts every group's KL always.
    """

    MARGINAL_ORDERINGS = 8  # orderings drawn from q(z) and calibrated for the marginal
    reference_elbo = pyro.infer.TraceMeanField_ELBO

    def __init__(self, net: OrderedNet, num_classes: int | None = None, keep_prob: float = 0.95,
                 ordering_prior=None, prior_scale: float = 1.0, temperature: float = 2.0,
                 kl_weight: float = 1.0, input_shape=None, weight_prior: str = "gaussian"):
        super().__init__()
        if not isinstance(net, OrderedNet):
            raise TypeError("net must be a bayesdyn.nn.OrderedNet (nested_mlp / nested_convnet)")
        check_real("keep_prob", keep_prob, 0, 1, open_low=True, open_high=True)
        check_real("prior_scale", prior_scale, 0, open_low=True)
        check_real("temperature", temperature, 0, open_low=True)
        check_real("kl_weight", kl_weight, 0)
        num_classes = classes_of(net, num_classes, "ordered network")
        self.net, self.num_classes = net, num_classes
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.temperature = temperature
        self.weight_prior = _weight_prior(weight_prior, prior_scale)  # holds the scale
        self.kl_weight = kl_weight
        self.prior_keep_logit = float(torch.logit(torch.tensor(keep_prob)))
        sizes = [b.num_orderable for b in net.blocks]
        priors = ordering_prior if isinstance(ordering_prior, (list, tuple)) \
            else [ordering_prior] * len(sizes)
        for i, (k, prior) in enumerate(zip(sizes, priors, strict=True)):
            prior = TruncatedGeometric(keep_prob, k) if prior is None else prior
            if not isinstance(prior, OrderingDistribution) or prior.num_groups != k:
                raise ValueError(f"ordering prior of layer {i} must be an OrderingDistribution "
                                 f"over 0..{k}")
            self.register_buffer(f"prior_logits_{i}", prior.logits.detach().clone())

    # --- helpers shared with the guide --------------------------------------------------------
    def prior_logits(self) -> list[torch.Tensor]:
        """``log p(z_l = k)`` per ordered layer, ``[K_l + 1]`` each."""
        return [getattr(self, f"prior_logits_{i}") for i in range(len(self.net.blocks))]

    def prior_probs(self) -> list[torch.Tensor]:
        """``p(z_l = k)`` per ordered layer, ``[K_l + 1]`` each."""
        return [logits.exp() for logits in self.prior_logits()]

    @staticmethod
    def squeeze_mask(mask: torch.Tensor) -> torch.Tensor:
        """Drop the singleton plate dim vectorised draws give a global site: ``[S, 1, K] -> [S, K]``."""
        return mask.squeeze(-2) if mask.dim() >= 3 else mask

    @staticmethod
    def grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
        """``[out, ...] -> [G, out / G, ...]``: one batch entry per unit group."""
        return t.reshape(groups, t.shape[0] // groups, *t.shape[1:])

    def weight_groups(self):
        """``(site name, layer, groups)`` for every Bayesian layer (the head is one group)."""
        for i, block in enumerate(self.net.blocks):
            yield f"blocks.{i}.layer.weight", block.layer, block.groups
        yield "head.weight", self.net.head, 1

    def variational_parameters(self) -> list[nn.Parameter]:
        """The Gaussian weights' means and log-scales (they live on the layers, not the guide)."""
        return [p for layer in self.net.bayes_layers().values() if layer.bayesian
                for p in (layer.weight_mu, layer.weight_log_sigma)]

    def structure_parameters(self, guide) -> list[nn.Parameter]:
        try:
            ordering = self.ordering_guide(guide)
        except TypeError:  # a guide of the user's own: no known q(z)
            return []
        return list(ordering.rho) if ordering.learn_ordering else []

    def network_values(self) -> dict[str, torch.Tensor]:
        return {name: self.grouped(layer.weight_mu, groups)
                for name, layer, groups in self.weight_groups()} if self.net.bayesian else {}

    def weight_prior_site(self, layer, groups: int) -> dist.TorchDistribution:
        """The prior of a layer's weights by group: batch ``[G]``, event ``[out / G, ...]``."""
        mu = self.grouped(layer.weight_mu, groups)
        return self.weight_prior.site(mu, self.grouped(layer.weight_sigma(), groups)) \
            .to_event(mu.dim() - 1)

    @staticmethod
    def group_plate(name: str, groups: int):
        return pyro.plate(f"{name}_groups", groups, dim=-1)

    def structure_sites(self) -> list[str]:
        return [f"order_{i}" for i in range(len(self.net.blocks))]

    def structure_guide(self, blocked_model) -> NestedGuide:
        return NestedGuide(blocked_model, weights=False, nested=self)

    def default_guide(self) -> NestedGuide:
        return NestedGuide(self, learn_ordering=self.net.bayesian)

    # --- Pyro model ---------------------------------------------------------------------------
    def model(self, x, y=None, dataset_size=None):
        masks, weights = [], {}
        with poutine.scale(scale=self.kl_weight):
            for i, logits in enumerate(self.prior_logits()):
                m = pyro.sample(f"order_{i}", Downhill(logits=logits, temperature=self.temperature,
                                                       hard=True))
                masks.append(self.squeeze_mask(m))
            if self.net.bayesian:
                for name, layer, groups in self.weight_groups():
                    with self.group_plate(name, groups), self._no_improper_draws():
                        w = pyro.sample(name, self.weight_prior_site(layer, groups))
                    shape = layer.weight_mu.shape
                    w = w.reshape(*w.shape[:w.dim() - len(shape) - 1], *shape)  # [(S,) out, ...]
                    weights[name.removesuffix(".weight")] = w if w.dim() > len(shape) else w[None]
        logits = self.net(x, masks=masks, sample=False, weights=weights or None,
                          num_samples=max(m.reshape(-1, m.shape[-1]).shape[0] for m in masks))
        logits = logits[0] if logits.shape[0] == 1 else logits  # [(S,) B, C]
        with data_plate(x, dataset_size):
            pyro.deterministic("probs", torch.softmax(logits, -1), event_dim=1)
            return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    def _no_improper_draws(self):
        """An improper weight prior has no draws: a weight site that gets no value from a guide
        (a prior run, e.g. an autoguide setting itself up) takes the network's current weights."""
        if self.weight_prior.proper:
            return nullcontext()
        return InitMessenger(init_to_value(values=self.network_values()))

    # --- fast path ----------------------------------------------------------------------------
    def kl_terms(self, guide: NestedGuide) -> dict[str, torch.Tensor]:
        """Exact ``KL(q(z) || p(z))`` over layers and the survival-weighted weight KL."""
        zero = torch.zeros((), device=self.net.head.weight_mu.device)
        kl_z, kl_w = zero, zero
        if guide.learn_ordering:
            for q, log_p in zip(guide.orderings(), self.prior_logits(), strict=True):
                log_q = q.logits  # in log space: q(z) may underflow
                kl_z = kl_z + (log_q.exp() * (log_q - log_p)).sum()
        if self.net.bayesian:
            for (_, layer, groups), survival in zip(self.weight_groups(), guide.group_survival(),
                                                    strict=True):
                per_group = layer.kl_per_unit(self.weight_prior).reshape(groups, -1).sum(-1)
                kl_w = kl_w + (survival * per_group).sum()
        return {"kl_order": kl_z, "kl_weights": kl_w}

    def fast_loss(self, guide, x, y, dataset_size):
        if type(guide) is not NestedGuide or not guide.with_weights:
            return NotImplemented
        masks = [guide.downhill(q).rsample() for q in guide.orderings()]  # one per batch (BNNN)
        logits = self.net(x, masks=masks, sample=True)[0]
        nll = F.cross_entropy(full_precision(logits), y, reduction="sum") * (dataset_size / x.shape[0])
        terms = {"nll": nll, **self.kl_terms(guide)}
        return nll + self.kl_weight * (terms["kl_order"] + terms["kl_weights"]), terms

    # --- budgets and prediction ---------------------------------------------------------------
    def widths(self) -> list[float]:
        """BNNN's evaluation grid of uniform widths ``1 - i/15``, widest first."""
        return [1 - i / (NUM_WIDTHS - 1) for i in range(NUM_WIDTHS)]

    def groups_for_width(self, width: float) -> tuple[int, ...]:
        """Unit groups kept per ordered layer at a uniform ``width`` in [0, 1] (frozen ones
        always)."""
        return tuple(b.frozen + round(b.num_orderable * width) for b in self.net.blocks)

    def budgets(self, guide=None) -> list[Budget]:
        """Uniform widths ``1 - i/15`` (smallest first); per-layer widths are any
        ``Budget(name, setting=(groups kept per layer))``."""
        return [Budget(f"width {w:.3f}", self.groups_for_width(w)) for w in reversed(self.widths())]

    def budget_module(self, budget, guide=None) -> nn.Module:
        groups = tuple(b.groups for b in self.net.blocks) if budget is None else budget.setting
        return _WidthForward(self.net.sliced(groups))

    def predict_probs(self, guide, x, budget=None, num_samples=1,
                      deterministic: bool = False) -> PredictiveSamples:
        """Bayesian prediction: ``num_samples`` draws of weights (local reparameterisation)
        and, for the marginal (``budget=None``), of the orderings from ``q(z)``: after
        ``prepare_evaluation`` the calibrated orderings (BatchNorm statistics that fit each),
        else fresh masks with training's statistics, in one vectorised pass.
        ``deterministic``: mean weights, one pass per width (per calibrated ordering). A fixed
        width of a network without weight uncertainty (nested dropout) has nothing to sample:
        one pass, whatever ``num_samples`` (and its cost is counted once)."""
        fixed = budget is not None and not self.net.bayesian
        samples = 1 if deterministic or fixed else num_samples
        if not (isinstance(guide, NestedGuide) and guide.with_weights):
            return self._pyro_predict(guide, x, budget, samples)
        settings = getattr(self, "_marginal_settings", None)
        if budget is None and settings:
            return self._calibrated_marginal(x, settings, samples, deterministic)
        if budget is None:
            masks = [guide.downhill(q).sample((samples,)) for q in guide.orderings()]
            logits = self.net(x, masks=masks, sample=not deterministic, num_samples=samples)
        else:
            with self.width_statistics(budget.setting):
                logits = self.net(x, n_groups=budget.setting, sample=not deterministic,
                                  num_samples=samples)
        return PredictiveSamples.equal(torch.softmax(logits, -1))

    def _calibrated_marginal(self, x, settings, samples, deterministic) -> PredictiveSamples:
        """The calibrated orderings in turn (each a sliced pass with its own BatchNorm
        statistics, vectorised over its weight draws); draw ``s`` uses ordering ``s mod n``."""
        count = len(settings) if deterministic else samples
        uses = Counter(settings[s % len(settings)] for s in range(count))
        probs, weights = [], []
        for setting, n in uses.items():
            draws = 1 if deterministic else n  # mean weights: one pass stands for all n
            with self.width_statistics(setting):
                logits = self.net(x, n_groups=setting, sample=not deterministic, num_samples=draws)
            probs.append(torch.softmax(logits, -1))
            weights.append(torch.full((draws,), n / (draws * count), device=x.device))
        return PredictiveSamples(torch.cat(probs), torch.cat(weights).to(probs[0].dtype))

    def _pyro_predict(self, guide, x, budget, samples) -> PredictiveSamples:
        """Any other guide (e.g. an ``AutoGuideList`` with ``AutoNormal`` weights): draws through
        Pyro, the ordering masks fixed to the width for a budget."""
        condition = None
        if budget is not None:
            condition = {f"order_{i}": (torch.arange(b.num_orderable, device=x.device) < k - b.frozen)
                         .to(x.dtype) for i, (b, k) in enumerate(zip(self.net.blocks, budget.setting,
                                                                    strict=True))}
        with self.width_statistics(budget.setting if budget is not None else ()):
            trace, _ = vectorized_trace(self, guide, x, None, samples, condition)
        probs = trace.nodes["probs"]["value"]
        return PredictiveSamples.equal(probs.reshape(-1, *probs.shape[-2:]))

    @staticmethod
    def ordering_guide(guide) -> NestedGuide:
        """The ``NestedGuide`` in ``guide`` (itself, or a part of an ``AutoGuideList``)."""
        parts = list(guide) if isinstance(guide, torch.nn.ModuleList) else [guide]
        for part in parts:
            if isinstance(part, NestedGuide):
                return part
        raise TypeError(f"{type(guide).__name__} holds no NestedGuide for the ordering")

    def structure_posterior(self, guide) -> dict[str, torch.Tensor]:
        out = {}
        guide = self.ordering_guide(guide)
        for i, (q, p) in enumerate(zip(guide.orderings(), self.prior_probs(), strict=True)):
            out[f"order_{i}"] = q.probs.detach()  # q(z_i = k): k ordered groups of layer i on
            out[f"order_{i} prior"] = p
        return out

    @torch.no_grad()
    def weight_sparsity(self, threshold: float = 3.0) -> dict[str, float]:
        """Per Bayesian layer, the fraction of weights with ``log alpha = log(sigma^2 / mu^2)``
        above ``threshold``: weights that carry mostly noise (a sparsity prior's doing; BNNN's
        code zeroes them at ``log alpha >= 3``)."""
        return {name: float((log_alpha(layer.weight_mu, layer.weight_sigma()) > threshold)
                            .float().mean()) for name, layer in self.net.bayes_layers().items()
                if layer.bayesian}

    # --- BatchNorm statistics per width -------------------------------------------------------
    def _bn_stats(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(b.bn.running_mean.clone(), b.bn.running_var.clone()) for b in self.net.blocks]

    def _load_bn_stats(self, stats) -> None:
        for block, (mean, var) in zip(self.net.blocks, stats, strict=True):
            block.bn.running_mean.copy_(mean)
            block.bn.running_var.copy_(var)

    @torch.no_grad()
    def prepare_evaluation(self, train, guide=None, batch_size: int = 500,
                           max_examples: int = 2000) -> None:
        """Re-estimate BatchNorm statistics, as slimmable networks do, on (up to
        ``max_examples``) training inputs: the running statistics from training average over all
        mask states and fit none of them. Done for every width, and for ``MARGINAL_ORDERINGS``
        orderings drawn once from ``q(z)`` (a hard ordering is a per-layer width), which the
        marginal prediction then averages over."""
        x_train = train.tensors[0][:max_examples]
        was_training, trained = self.training, self._bn_stats()
        momenta = [b.bn.momentum for b in self.net.blocks]
        settings = [b.setting for b in self.budgets()]
        self._marginal_settings = []
        if guide is not None:
            orderings = self.ordering_guide(guide).orderings()
            for _ in range(self.MARGINAL_ORDERINGS):
                cuts = [int(q.sample()) for q in orderings]
                self._marginal_settings.append(tuple(b.frozen + z for b, z in
                                                     zip(self.net.blocks, cuts, strict=True)))
        self._width_stats = {}
        self.train()
        for setting in dict.fromkeys(settings + self._marginal_settings):
            for block in self.net.blocks:
                block.bn.reset_running_stats()
                block.bn.momentum = None  # cumulative average over the calibration batches
            for xb in x_train.split(batch_size):
                self.net(xb, n_groups=setting, sample=self.net.bayesian)
            self._width_stats[setting] = self._bn_stats()
        self._load_bn_stats(trained)
        for block, momentum in zip(self.net.blocks, momenta, strict=True):
            block.bn.momentum = momentum
        self.train(was_training)

    @contextmanager
    def width_statistics(self, setting):
        """BatchNorm statistics of width ``setting`` in place while inside (if calibrated)."""
        stats = getattr(self, "_width_stats", {}).get(tuple(setting))
        if stats is None:
            yield
            return
        saved = self._bn_stats()
        self._load_bn_stats(stats)
        try:
            yield
        finally:
            self._load_bn_stats(saved)


class _WidthForward(nn.Module):
    """A sliced network's forward pass for cost measurement: one Monte Carlo sample."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x, sample=self.net.bayesian)[0]
