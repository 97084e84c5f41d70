"""DepthNet: a categorical latent over the depth of a residual network (VDS / DUN).

    d ~ Categorical(prior)                      prior: uniform, VDS's decaying, or any
    y_n ~ Categorical(logits = f_d(x_n))        (classification) or Normal(f_d(x_n), sigma)

Weights are point estimates (type-II maximum likelihood, as in both papers). Every depth's
output comes out of one forward pass, so the expectation over ``q(d)`` is exact.
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoDiscreteParallel, AutoGuideList, AutoNormal
from pyro.ops.indexing import Vindex
from torch import nn

from ..guides.depth import DepthGuide
from ..guides.empty import EmptyGuide
from ..guides.init import weight_autoguide
from ..nn.residual import DepthStack
from ..validation import check_real
from .base import (
    Budget,
    DynamicModel,
    PredictiveSamples,
    check_output_size,
    classes_of,
    data_plate,
    full_precision,
    vectorized_trace,
)

VDS_DECAY = 0.85


PRIOR_KINDS = ("'uniform', 'decaying', a probability vector over the depths, a Categorical, or a "
               "discrete distribution over 0, 1, 2, ... (e.g. Geometric, Poisson, Binomial), which "
               "is truncated to the network's depths")


def depth_prior(prior, num_depths: int) -> torch.Tensor:
    """Prior probabilities ``[D + 1]`` from ``"uniform"``, ``"decaying"`` (VDS:
    ``beta_d ∝ 0.85^(d+1)``), a probability vector, a ``Categorical`` over the ``D + 1`` depths,
    or any discrete distribution over the non-negative integers (``Geometric``, ``Poisson``, ...)
    truncated to ``0..D`` and renormalised."""
    if isinstance(prior, str):
        if prior == "uniform":
            return torch.full((num_depths,), 1.0 / num_depths)
        if prior == "decaying":
            w = VDS_DECAY ** torch.arange(1, num_depths + 1, dtype=torch.get_default_dtype())
            return w / w.sum()
        raise ValueError(f"unknown depth prior {prior!r}; use {PRIOR_KINDS}")
    if isinstance(prior, torch.distributions.Categorical):
        probs = prior.probs
    elif isinstance(prior, torch.distributions.Distribution):
        probs = _truncated_pmf(prior, num_depths)
    elif isinstance(prior, (torch.Tensor, list, tuple)):
        probs = prior
    else:
        raise TypeError(f"unsupported depth prior {type(prior).__name__}; use {PRIOR_KINDS}")
    probs = torch.as_tensor(probs, dtype=torch.get_default_dtype()).detach()
    if probs.shape != (num_depths,):
        raise ValueError(f"depth prior has shape {tuple(probs.shape)}, expected [{num_depths}] "
                         f"(one probability per depth 0..{num_depths - 1})")
    if not torch.isfinite(probs).all() or (probs <= 0).any():
        raise ValueError("depth prior probabilities must be finite and positive (a depth with "
                         "zero prior mass can be removed from the network instead)")
    if isinstance(prior, (torch.Tensor, list, tuple)) and abs(float(probs.sum()) - 1) > 1e-4:
        raise ValueError(f"depth prior probabilities sum to {float(probs.sum()):.6g}, not 1; "
                         "normalise them (p / p.sum()) if that is what you meant")
    return probs / probs.sum()


def _truncated_pmf(prior: torch.distributions.Distribution, num_depths: int) -> torch.Tensor:
    if not prior.support.is_discrete or prior.batch_shape != () or prior.event_shape != ():
        raise TypeError(f"a depth prior must be one discrete distribution over the depths; got "
                        f"{type(prior).__name__} (batch {tuple(prior.batch_shape)}); use "
                        f"{PRIOR_KINDS}")
    depths = torch.arange(num_depths, dtype=torch.get_default_dtype())
    try:
        log_p = prior.log_prob(depths)
    except (ValueError, RuntimeError) as err:  # a support that misses some depths
        raise ValueError(f"{type(prior).__name__} gives no probability to some of the depths "
                         f"0..{num_depths - 1} ({err})") from err
    return torch.softmax(log_p.detach(), 0)


class DepthNet(DynamicModel):
    """Pyro model with a latent depth over a ``DepthStack`` backbone.

    Args:
        backbone: a ``DepthStack`` (e.g. ``bayesdyn.nn.residual_mlp`` or ``resnet_depth``).
        prior: ``"uniform"`` (DUN), ``"decaying"`` (VDS) or any categorical over ``D + 1`` depths.
        likelihood: ``"classification"`` (softmax) or ``"regression"`` (Gaussian, learned
            ``sigma`` unless ``noise_scale`` is given).
        num_classes: number of classes (classification).
        input_shape: shape of one input, e.g. ``(1, 28, 28)``; inputs are checked against it.
        marginal: the marginal-likelihood variant (DUN's MLL): ``d`` is enumerated in the model,
            the guide is empty, the objective is ``log sum_d p(d) prod_n p(y_n | x_n, d)`` and the
            posterior over depth is exact by Bayes' rule (``update_posterior``). Pyro accepts it
            on full batches only (model-side enumeration of a global variable with a subsampled
            plate is an error); the fast path's minibatch version scales the batch likelihood
            by N/B inside the log-sum-exp (biased, as in the DUN code).
        output_prior_scale: put a ``N(0, scale^2)`` prior on the shared output block's weights
            (weight uncertainty on top of depth uncertainty). The default guide then pairs
            ``DepthGuide`` with a mean-field ``AutoNormal`` for those weights, and training goes
            through Pyro's ``TraceEnum_ELBO`` (no fast path for this combination yet).
    """

    reference_elbo = pyro.infer.TraceEnum_ELBO

    def __init__(self, backbone: DepthStack, prior="uniform", likelihood: str = "classification",
                 num_classes: int | None = None, noise_scale: float | None = None,
                 input_shape: tuple[int, ...] | None = None, marginal: bool = False,
                 output_prior_scale: float | None = None):
        super().__init__()
        if not isinstance(backbone, DepthStack):
            raise TypeError("backbone must be a bayesdyn.nn.DepthStack (one output per depth)")
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"likelihood must be 'classification' or 'regression', got {likelihood!r}")
        if likelihood == "classification":
            num_classes = classes_of(backbone.output_block, num_classes, "backbone")
        else:
            check_output_size(backbone.output_block, 1, "backbone")
        if noise_scale is not None:
            check_real("noise_scale", noise_scale, 0, open_low=True)
        self.backbone = backbone
        self.likelihood = likelihood
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes if likelihood == "classification" else None
        self.register_buffer("prior_probs", depth_prior(prior, backbone.max_depth + 1))
        self.marginal = marginal
        if output_prior_scale is not None and output_prior_scale <= 0:
            raise ValueError(f"output_prior_scale must be positive, got {output_prior_scale}")
        self.output_prior_scale = output_prior_scale
        if output_prior_scale is not None:  # the model samples these weights: the block's own
            backbone.output_block.requires_grad_(False)  # values only seed the weight guide
        if marginal:  # exact posterior p(d | data), set by update_posterior; the prior until then
            self.register_buffer("posterior_probs", self.prior_probs.clone())
        if likelihood == "regression":
            init = 1.0 if noise_scale is None else float(noise_scale)
            self.log_noise = nn.Parameter(torch.tensor(init).log(),
                                          requires_grad=noise_scale is None)

    @property
    def num_depths(self) -> int:
        return self.backbone.max_depth + 1

    def default_guide(self):
        if self.marginal:
            return EmptyGuide(self)
        if self.output_prior_scale is None:
            return DepthGuide(self)
        return weight_autoguide(self, AutoNormal)

    def structure_sites(self) -> list[str]:
        return ["depth"]

    def structure_guide(self, blocked_model) -> DepthGuide:
        return DepthGuide(blocked_model, self.num_depths)

    # --- Pyro model ---------------------------------------------------------------------------
    def model(self, x, y=None, dataset_size=None):
        outputs = self.backbone(x, output_params=self._output_weights())  # [(S,) D+1, B, C]
        infer = {"enumerate": "parallel"} if self.marginal else {}
        d = pyro.sample("depth", dist.Categorical(self.prior_probs), infer=infer)
        with data_plate(x, dataset_size):
            batch = torch.arange(x.shape[0], device=x.device)
            if outputs.dim() == 4:  # one sampled output block per draw
                draws = torch.arange(outputs.shape[0], device=x.device)[:, None]
                f = Vindex(outputs)[draws, d.reshape(-1, 1), batch]
            else:
                f = Vindex(outputs)[d, batch]
            if self.likelihood == "classification":
                pyro.deterministic("probs", torch.softmax(f, -1), event_dim=1)
                return pyro.sample("y", dist.Categorical(logits=f), obs=y)
            return pyro.sample("y", dist.Normal(f.squeeze(-1), self.log_noise.exp()), obs=y)

    def structure_parameters(self, guide) -> list[nn.Parameter]:
        """q(d)'s parameters: a ``DepthGuide``'s logits, or the whole of a guide that is only
        over the depth (e.g. ``AutoDiscreteParallel``), also inside an ``AutoGuideList``."""
        parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
        return [p for part in parts if isinstance(part, (DepthGuide, AutoDiscreteParallel))
                for p in part.parameters()]

    def network_values(self) -> dict[str, torch.Tensor]:
        if self.output_prior_scale is None:
            return {}
        return {f"output.{name}": p for name, p in self.backbone.output_block.named_parameters()}

    def _output_weights(self) -> dict | None:
        """Sampled output-block parameters (``output_prior_scale``), ``[(S,) ...]`` each."""
        if self.output_prior_scale is None:
            return None
        params = {}
        for name, p in self.backbone.output_block.named_parameters():
            prior = dist.Normal(torch.zeros_like(p), self.output_prior_scale).to_event(p.dim())
            w = pyro.sample(f"output.{name}", prior)
            params[name] = w.reshape(-1, *p.shape) if w.dim() > p.dim() else w
        return params

    # --- fast path ----------------------------------------------------------------------------
    def log_likelihoods(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``log p(y_n | x_n, d)`` for every depth, ``[D + 1, B]``."""
        outputs = full_precision(outputs)
        if self.likelihood == "classification":
            logp = torch.log_softmax(outputs, -1)
            return logp.gather(-1, y.expand(outputs.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        return dist.Normal(outputs.squeeze(-1), self.log_noise.exp()).log_prob(y)

    def fast_loss(self, guide, x, y, dataset_size):
        if self.output_prior_scale is not None:
            return NotImplemented
        if self.marginal and type(guide) is EmptyGuide:
            loglik = self.log_likelihoods(self.backbone(x), y).sum(-1) * (dataset_size / x.shape[0])
            log_marginal = torch.logsumexp(self.prior_probs.log() + loglik, 0)
            return -log_marginal, {"nll": -log_marginal}
        if type(guide) is not DepthGuide:
            return NotImplemented
        log_q = guide.log_probs()
        q = log_q.exp()
        loglik = self.log_likelihoods(self.backbone(x), y).sum(-1)  # [D+1]
        expected_loglik = (q * loglik).sum() * (dataset_size / x.shape[0])
        kl = (q * (log_q - self.prior_probs.log())).sum()
        return kl - expected_loglik, {"nll": -expected_loglik, "kl": kl}

    # --- budgets and prediction ---------------------------------------------------------------
    def budgets(self, guide=None) -> list[Budget]:
        return [Budget(f"depth {d}", d) for d in range(self.num_depths)]

    def budget_module(self, budget: Budget | None, guide=None) -> nn.Module:
        return self.backbone if budget is None else self.backbone.truncated(budget.setting)

    def head_module(self, budget: Budget, guide=None) -> nn.Module:
        adapter = [] if self.backbone.adapters is None else [self.backbone.adapters[budget.setting]]
        return nn.Sequential(*adapter, self.backbone.output_block)

    def depth_weights(self, guide, x: torch.Tensor | None = None) -> torch.Tensor:
        """``q(d)`` ``[D + 1]``: from a ``DepthGuide`` directly, or read off any guide whose
        ``depth`` site is a categorical (e.g. Pyro's ``AutoDiscreteParallel``) by tracing it."""
        if isinstance(guide, DepthGuide):
            return guide.probs()
        if self.marginal:
            return self.posterior_probs
        if x is None:
            if self.input_shape is None:
                raise ValueError("pass x (or build the model with input_shape) to read q(d) "
                                 f"from a {type(guide).__name__}")
            x = self._probe_input()
        site = pyro.poutine.trace(guide).get_trace(x[:1]).nodes.get("depth")
        if site is None or not isinstance(site["fn"], dist.Categorical):
            raise TypeError(f"{type(guide).__name__} has no categorical 'depth' site; use a "
                            "DepthGuide or a guide that samples depth from a Categorical")
        return site["fn"].probs.reshape(-1, self.num_depths)[0]

    def predict_probs(self, guide, x, budget=None, num_samples=1) -> PredictiveSamples:
        """Exact: per-depth probabilities weighted by ``q(d)`` (marginal) or one depth."""
        if self.likelihood != "classification":
            raise TypeError("a regression DepthNet has no class probabilities: use "
                            "regression_mixture (or bayesdyn.inference.predict_normal)")
        if self.output_prior_scale is not None:  # weight draws through Pyro, depth from q or fixed
            condition = None if budget is None else {"depth": torch.tensor(budget.setting)}
            trace, _ = vectorized_trace(self, guide, x, None, num_samples, condition)
            probs = trace.nodes["probs"]["value"]
            return PredictiveSamples.equal(probs.reshape(-1, *probs.shape[-2:]))
        if budget is None:
            return PredictiveSamples(torch.softmax(self.backbone(x), -1),
                                     self.depth_weights(guide, x))
        logits = self.backbone.truncated(budget.setting)(x)
        return PredictiveSamples.equal(torch.softmax(logits, -1)[None])

    def regression_mixture(self, guide, x, budget: Budget | None = None):
        """The Gaussian-mixture predictive of a regression DepthNet: ``(log_weights [K],
        means [K, B], scale)``, over the depths weighted by ``q(d)`` (``budget=None``) or the one
        depth of ``budget`` (``K = 1``)."""
        if self.likelihood != "regression":
            raise TypeError("regression_mixture is for DepthNet(likelihood='regression')")
        if budget is not None:
            means = self.backbone.truncated(budget.setting)(x).squeeze(-1)[None]
            return means.new_zeros(1), means, self.log_noise.exp()
        return (self.depth_weights(guide, x).log(), self.backbone(x).squeeze(-1),
                self.log_noise.exp())

    @torch.no_grad()
    def update_posterior(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
        """Exact ``p(d | x, y) ∝ p(d) prod_n p(y_n | x_n, d)`` over the given (training) data,
        stored for prediction (marginal-likelihood variant)."""
        if not self.marginal:
            raise ValueError("update_posterior is for DepthNet(marginal=True)")
        was_training = self.training
        self.eval()
        loglik = sum(self.log_likelihoods(self.backbone(xb), yb).sum(-1)
                     for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
        self.train(was_training)
        self.posterior_probs.copy_(torch.softmax(self.prior_probs.log() + loglik, 0))
        return self.posterior_probs

    def prepare_evaluation(self, train, guide=None) -> None:
        if self.marginal and isinstance(guide, EmptyGuide):
            self.update_posterior(*train.tensors)

    @torch.no_grad()
    def component_log_likelihood(self, guide, x, y):
        """Exact over depths: ``(log q(d) [D + 1], log p(y_n | x_n, d) [D + 1, N])``."""
        if self.output_prior_scale is not None:  # weight draws: PSIS-LOO on draws instead
            return None
        return self.depth_weights(guide, x).log(), self.log_likelihoods(self.backbone(x), y)

    def structure_posterior(self, guide) -> dict[str, torch.Tensor]:
        return {"depth": self.depth_weights(guide).detach(), "depth prior": self.prior_probs}

    # --- pruning ------------------------------------------------------------------------------
    def prune(self, guide, threshold: float = 0.95, x: torch.Tensor | None = None):
        """VDS pruning: cut at ``d* = min{d : q(d) > threshold * max q}``, drop deeper blocks
        and move their posterior (and prior) mass onto ``d*``. Returns a new, smaller model and
        guide; the originals are untouched. Every part of the model and posterior carries over:
        the likelihood and its noise, the marginal-likelihood posterior, a Bayesian output block
        and its weight guide (``x``: an input batch to set that guide up, when the model was
        built without ``input_shape``)."""
        q = self.depth_weights(guide, x).detach()
        cut = int(torch.nonzero(q > threshold * q.max())[0])
        backbone = copy.deepcopy(self.backbone)
        backbone.blocks = backbone.blocks[:cut]
        if backbone.adapters is not None:
            backbone.adapters = backbone.adapters[: cut + 1]
        fold = lambda p: torch.cat([p[:cut], p[cut:].sum(0, keepdim=True)])  # noqa: E731
        pruned = DepthNet(backbone, prior=fold(self.prior_probs).cpu(), likelihood=self.likelihood,
                          num_classes=self.num_classes, input_shape=self.input_shape,
                          marginal=self.marginal, output_prior_scale=self.output_prior_scale)
        if self.likelihood == "regression":
            pruned.log_noise = nn.Parameter(self.log_noise.detach().clone(),
                                            requires_grad=self.log_noise.requires_grad)
        pruned.to(self.prior_probs.device)
        if self.marginal:
            pruned.posterior_probs.copy_(fold(self.posterior_probs))
        new_guide = pruned.default_guide().to(q.device)
        if isinstance(new_guide, EmptyGuide):
            return pruned, new_guide
        parts = list(new_guide) if isinstance(new_guide, AutoGuideList) else [new_guide]
        old_parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
        if len(parts) > 1:  # set the weight guide up (labels observed), then load its values
            probe = x[:1] if x is not None else self._probe_input()
            labels = torch.zeros(1, device=probe.device,
                                 dtype=torch.long if self.likelihood == "classification" else None)
            was_training = pruned.training
            pruned.eval()  # BatchNorm cannot run on one example in training mode
            new_guide(probe, labels)
            pruned.train(was_training)
        for new, old in zip(parts, old_parts, strict=True):
            if isinstance(new, DepthGuide):
                with torch.no_grad():
                    new.logits.copy_(fold(q).log())
            else:
                new.load_state_dict(old.state_dict())
        return pruned, new_guide

    def _probe_input(self) -> torch.Tensor:
        if self.input_shape is None:
            raise ValueError("pass x (an input batch) or build the model with input_shape")
        return torch.zeros(1, *self.input_shape, device=self.prior_probs.device)
