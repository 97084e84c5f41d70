"""Class probabilities from a Gaussian over the logits, ``f ~ N(mu, Sigma)`` (``mu [B, C]``,
``Sigma [B, C, C]`` or variances ``[B, C]``): the predictive ``E[softmax(f)]`` approximated by

- ``probit``: ``softmax(mu_c / sqrt(1 + pi/8 Sigma_cc))`` (MacKay's probit approximation, per class);
- ``bridge``: the Laplace bridge (Hobbhahn et al. 2022), the mean of the Dirichlet whose Laplace
  approximation in the softmax basis is this Gaussian, after projecting the Gaussian onto logits
  that sum to zero (the softmax ignores that direction);
- ``mc``: Monte Carlo with ``S`` draws, fresh noise for every input (default) or, as the WACV
  code and laplace-torch do, one set of ``S`` noise vectors shared by every input.
"""

from __future__ import annotations

import math

import torch

LINKS = ("probit", "bridge", "mc")


def _variances(cov: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return cov if cov.shape == mu.shape else cov.diagonal(dim1=-2, dim2=-1)


def probit(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Probit-approximated predictive ``[B, C]``."""
    kappa = torch.rsqrt(1.0 + math.pi / 8.0 * _variances(cov, mu))
    return torch.softmax(kappa * mu, -1)


def bridge(mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Laplace-bridge predictive ``[B, C]`` (needs the full ``Sigma [B, C, C]``)."""
    if cov.shape == mu.shape:
        cov = torch.diag_embed(cov)
    row = cov.sum(-1)  # Sigma 1   [B, C]
    total = row.sum(-1, keepdim=True)  # 1^T Sigma 1
    mu = mu - row * mu.sum(-1, keepdim=True) / total  # condition on sum(f) = 0
    var = cov.diagonal(dim1=-2, dim2=-1) - row * row / total
    k = mu.shape[-1]
    alpha = (1 - 2 / k + mu.exp() * torch.exp(-mu).sum(-1, keepdim=True) / k ** 2) / var
    return alpha / alpha.sum(-1, keepdim=True)


def logit_samples(mu: torch.Tensor, cov: torch.Tensor, num_samples: int,
                  shared_noise: bool = False, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draws ``[S, B, C]`` of ``f``: ``mu + L eps`` with ``L L^T = Sigma``. ``noise``: given
    standard normals, ``[S, C]`` (shared) or ``[S, B, C]`` (per input)."""
    b, c = mu.shape
    if noise is None:
        shape = (num_samples, 1, c) if shared_noise else (num_samples, b, c)
        noise = torch.randn(shape, dtype=mu.dtype, device=mu.device, generator=generator)
    elif noise.ndim == 2:
        noise = noise[:, None, :]
    if cov.shape == mu.shape:
        return mu + cov.sqrt() * noise
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):  # singular (e.g. an input of zeros without bias): clamp eigenvalues
        evals, evecs = torch.linalg.eigh(cov)
        chol = evecs * evals.clamp_min(0).sqrt()[:, None, :]
    return mu + torch.einsum("bij,sbj->sbi", chol, noise.expand(-1, b, -1))


def mc(mu, cov, num_samples: int = 100, shared_noise: bool = False, generator=None,
       noise=None, samples: bool = False) -> torch.Tensor:
    """Monte Carlo predictive ``[B, C]`` (``samples=True``: the softmax of every draw,
    ``[S, B, C]``)."""
    probs = torch.softmax(logit_samples(mu, cov, num_samples, shared_noise, generator, noise), -1)
    return probs if samples else probs.mean(0)


def predictive(mu, cov, link: str = "probit", num_samples: int = 100,
               shared_noise: bool = False, generator=None) -> torch.Tensor:
    """``E[softmax(f)]`` ``[B, C]`` by ``link`` (one of ``LINKS``)."""
    if link == "probit":
        return probit(mu, cov)
    if link == "bridge":
        return bridge(mu, cov)
    if link == "mc":
        return mc(mu, cov, num_samples, shared_noise, generator)
    raise ValueError(f"link must be one of {LINKS}, got {link!r}")
