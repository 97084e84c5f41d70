"""Vectorised prediction: all posterior samples of a chunk in one call, chunks of bounded size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluation.metrics import mixture_moments, uncertainty
from ..validation import check_inputs


@dataclass
class Prediction:
    """Predictive of ``N`` inputs: ``probs [S, N, C]`` with sample ``weights [S]``, their mixture
    ``mean [N, C]`` and the uncertainty terms ``total``, ``aleatoric``, ``epistemic`` ``[N]``
    (entropies in nats). Tensors are on the CPU."""

    probs: torch.Tensor
    weights: torch.Tensor
    mean: torch.Tensor
    total: torch.Tensor
    aleatoric: torch.Tensor
    epistemic: torch.Tensor


class _EvalMode:
    """Puts modules in eval mode and restores their previous modes."""

    def __init__(self, *modules):
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]

    def __enter__(self):
        self.modes = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, mode in zip(self.modules, self.modes, strict=True):
            m.train(mode)


@torch.no_grad()
def predict(model, guide, x: torch.Tensor, budget=None, num_samples: int = 8,
            batch_size: int = 2048) -> Prediction:
    """Predictive distribution of ``model`` at ``budget`` (``None``: marginalised over the
    structure) for inputs ``x [N, ...]``, ``num_samples`` posterior draws per input, evaluated
    in chunks of ``batch_size`` inputs (memory stays bounded for large ``N``)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    check_inputs(x, input_shape=getattr(model, "input_shape", None))
    if len(x) == 0:
        raise ValueError("x is empty: pass at least one input to predict")
    param = next(model.parameters())
    chunks, weights = [], None
    with _EvalMode(model, guide):
        for start in range(0, len(x), batch_size):  # inputs take the model's device and dtype
            xb = x[start:start + batch_size].to(param.device, param.dtype, non_blocking=True)
            samples = model.predict_probs(guide, xb, budget=budget, num_samples=num_samples)
            chunks.append(samples.probs.float().cpu())
            weights = samples.weights.double().cpu() if weights is None else weights
    probs = torch.cat(chunks, dim=1)
    terms = uncertainty(probs, weights)
    mean = torch.einsum("s,snc->nc", weights, probs.double()).float()
    return Prediction(probs, weights, mean, terms["total"].float(), terms["aleatoric"].float(),
                      terms["epistemic"].float())


@dataclass
class NormalMixture:
    """Regression predictive of ``N`` inputs: ``sum_k exp(log_weights[k]) N(means[k], scale^2)``
    with ``log_weights [K]``, ``means [K, N]`` and a shared ``scale`` (standardised units)."""

    log_weights: torch.Tensor
    means: torch.Tensor
    scale: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return mixture_moments(self.log_weights, self.means, self.scale)[0].float()

    @property
    def variance(self) -> torch.Tensor:
        return mixture_moments(self.log_weights, self.means, self.scale)[1].float()


@torch.no_grad()
def predict_normal(model, guide, x: torch.Tensor, budget=None,
                   batch_size: int = 2048) -> NormalMixture:
    """The Gaussian-mixture predictive of a regression model at ``budget`` (``None``:
    marginalised over the structure) for inputs ``x [N, ...]``, in chunks of ``batch_size``."""
    if getattr(model, "likelihood", "classification") != "regression":
        raise TypeError(f"{type(model).__name__} is not a regression model: use predict")
    check_inputs(x, input_shape=getattr(model, "input_shape", None))
    if len(x) == 0:
        raise ValueError("x is empty: pass at least one input to predict")
    param = next(model.parameters())
    means = []
    with _EvalMode(model, guide):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(param.device, param.dtype, non_blocking=True)
            log_weights, m, scale = model.regression_mixture(guide, xb, budget)
            means.append(m.float().cpu())
    return NormalMixture(log_weights.float().cpu(), torch.cat(means, 1), scale.float().cpu())
