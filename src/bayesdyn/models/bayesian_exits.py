"""Bayesian last layers on every exit of a trained multi-exit network (Meronen et al., WACV 2024).

The backbone (and every exit head's feature layers) is frozen at its trained values; the final
linear layer of exit ``k`` is latent:

    W~_k = [W_k, b_k] ~ N(0, 1/delta_k I)        site ``exit{k}.head.weight``  [C, D_k + 1]
    f_k = phi_k(x) W_k^T + b_k,   F_k = f_k (+ gamma_k F_{k-1} for BoostNet)
    y ~ Categorical(logits = F_k)                 observed once per exit (``y_exit{k}``, ``y``)

Guides: a fitted Laplace (``bayesdyn.inference.laplace`` returns an ``ExitCalibration``, whose
draws come from each head's Laplace posterior), the mean-field ``ExitHeadsGuide`` trained by SVI
(fast path: analytic KL, equal in value and gradient to ``TraceMeanField_ELBO`` under the same
draw), or any Pyro autoguide on these sites.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from ..guides.empty import EmptyGuide
from .base import DynamicModel, PredictiveSamples, vectorized_trace
from .exits import MultiExitNet, exit_site, observe_exits


def head_site(k: int) -> str:
    """Site name of exit ``k``'s (0-based) head weights, ``[C, D + 1]`` with the bias last."""
    return f"exit{k + 1}.head.weight"


class BayesianExits(DynamicModel):
    """Pyro model of ``net`` (a trained ``MultiExitNet`` / ``BoostedExits``) with Gaussian priors
    of precision ``prior_precision`` (a float or one per exit) on every exit head's weights.

    ``mie_weights`` (``[K]``, optional): predict with model-internal ensembling when the guide
    is not an ``ExitCalibration`` (which carries its own)."""

    reference_elbo = pyro.infer.TraceMeanField_ELBO

    def __init__(self, net: MultiExitNet, prior_precision=1.0, mie_weights=None):
        super().__init__()
        if not isinstance(net, MultiExitNet):
            raise TypeError(f"net must be a trained MultiExitNet or BoostedExits, got "
                            f"{type(net).__name__}")
        self.net = net.requires_grad_(False)  # frozen: only the head weights are latent
        self.num_classes, self.input_shape = net.num_classes, net.input_shape
        k = net.num_exits
        prec = torch.as_tensor(prior_precision, dtype=torch.float64).expand(k).clone()
        if not bool(torch.isfinite(prec).all()) or bool((prec <= 0).any()):
            raise ValueError(f"prior_precision must be positive and finite, got {prec.tolist()}")
        self.register_buffer("prior_precision", prec)
        self.register_buffer("mie_weights", None if mie_weights is None else
                             torch.as_tensor(mie_weights, dtype=torch.float64))

    @property
    def num_exits(self) -> int:
        return self.net.num_exits

    def default_guide(self):
        from ..guides.exit_heads import ExitHeadsGuide

        return ExitHeadsGuide(self)

    def head_shapes(self) -> list[tuple[int, int]]:
        """``(C, D_k + 1)`` of every exit's head weights."""
        return [(h.linear.out_features, h.linear.in_features + 1) for h in self.net.backbone.heads]

    def network_values(self) -> dict[str, torch.Tensor]:
        return {head_site(k): torch.cat([h.linear.weight, h.linear.bias[:, None]], 1).detach()
                for k, h in enumerate(self.net.backbone.heads)}

    def prior(self, k: int, like: torch.Tensor) -> dist.Distribution:
        """The prior of exit ``k``'s head weights."""
        scale = self.prior_precision[k].rsqrt().to(like)
        return dist.Normal(like.new_zeros(()), scale).expand(self.head_shapes()[k]).to_event(2)

    def head_logits(self, features, weights) -> torch.Tensor:
        """Exit logits ``F [K, *S, B, C]`` from features (``K`` x ``[B, D_k]``) and head weights
        (``K`` x ``[*S, C, D_k + 1]``; a trailing plate dim of size 1 is dropped)."""
        fs = []
        for phi, w in zip(features, weights, strict=True):
            if w.ndim > 2 and w.shape[-3] == 1:
                w = w.squeeze(-3)
            fs.append(phi @ w[..., :-1].transpose(-1, -2) + w[..., None, :, -1])
        shape = torch.broadcast_shapes(*(f.shape for f in fs))
        return self.net.combine(torch.stack([f.expand(shape) for f in fs]))

    def model(self, x, y=None, dataset_size=None):
        with torch.no_grad():
            features = self.net.backbone(x).features
        weights = [pyro.sample(head_site(k), self.prior(k, features[k]))
                   for k in range(self.num_exits)]
        return observe_exits(self.head_logits(features, weights), x, y, dataset_size)

    def fast_loss(self, guide, x, y, dataset_size):
        """Negative ELBO with analytic KL for ``ExitHeadsGuide``: one reparameterised draw of
        every head (the same draws, in the same order, as the guide under Pyro), ``N / B`` times
        the batch's summed cross-entropy over exits, plus ``sum_k KL(q_k || p_k)``."""
        from ..guides.exit_heads import ExitHeadsGuide

        if not isinstance(guide, ExitHeadsGuide):
            return NotImplemented
        with torch.no_grad():
            features = self.net.backbone(x).features
        q = guide.distributions()
        weights = [qk.rsample() for qk in q]
        logits = self.head_logits(features, weights)
        nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_exits), reduction="sum")
        nll = nll * (dataset_size / x.shape[0])
        kl = sum(torch.distributions.kl_divergence(qk, self.prior(k, features[k])) for k, qk in enumerate(q))
        return nll + kl, {"nll": nll.detach(), "kl": kl.detach()}

    # --- budgets and prediction: the network's exits -------------------------------------------
    def budgets(self, guide=None):
        return self.net.budgets()

    def budget_module(self, budget, guide=None):
        return self.net.budget_module(budget)

    def head_module(self, budget, guide=None):
        return self.net.head_module(budget)

    def predict_probs(self, guide, x, budget=None, num_samples=1) -> PredictiveSamples:
        """Exit ``k``'s predictive ``[S, B, C]`` (``budget=None``: the last exit). An
        ``ExitCalibration`` gives its link's predictive (MIE and temperatures included); any
        other guide is sampled ``num_samples`` times (MIE when ``mie_weights`` is set)."""
        from ..inference.exit_laplace import ExitCalibration, ensemble, exit_features

        k = self.net._exit_index(budget)
        if isinstance(guide, ExitCalibration):
            feats = exit_features(self.net, x, batch_size=len(x), until=k)
            return PredictiveSamples.equal(guide.probs(feats, until=k)[k].float())
        if isinstance(guide, EmptyGuide):  # the MAP network
            return self.net.predict_probs(guide, x, budget)
        trace, _ = vectorized_trace(self, guide, x, None, num_samples)
        probs = torch.stack([trace.nodes[exit_site(i, self.num_exits, "probs")]["value"]
                             for i in range(k + 1)])
        probs = probs.reshape(k + 1, num_samples, *probs.shape[-2:])
        if self.mie_weights is not None:
            probs = ensemble(probs, self.mie_weights[: k + 1])
        return PredictiveSamples.equal(probs[k])
