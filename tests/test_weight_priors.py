"""Weight priors: every closed-form KL against an independent reference (torch's KL, numerical
integration, Monte Carlo with the prior's own log-density)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import Normal, kl_divergence

from bayesdyn.distributions import (
    ARDPrior,
    GaussianPrior,
    LogUniformPrior,
    SymmetricLogUniform,
    weight_prior,
)

EULER_GAMMA = 0.5772156649015329


def exact_log_uniform_kl(log_alpha: float) -> float:
    """``KL(N(mu, alpha mu^2) || p ∝ 1/|w|)`` by quadrature, in the convention KL -> 0 as
    alpha -> inf: ``-0.5 log alpha + E_{N(1, alpha)} log|e| + (gamma + log 2) / 2``."""
    scale = math.exp(0.5 * log_alpha)
    f = lambda e: math.log(abs(e)) * stats.norm.pdf(e, 1.0, scale)  # noqa: E731
    lo, hi = 1 - 12 * scale, 1 + 12 * scale
    e_log = sum(integrate.quad(f, a, b, limit=400)[0] for a, b in ((lo, 0), (0, hi)) if a < b)
    return -0.5 * log_alpha + e_log + (EULER_GAMMA + math.log(2)) / 2


def test_gaussian_prior_kl_equals_torch():
    mu, sigma = torch.randn(50), torch.rand(50) + 0.05
    ref = kl_divergence(Normal(mu, sigma), Normal(0.0, 2.0))
    assert torch.allclose(GaussianPrior(2.0).kl(mu, sigma), ref, atol=1e-6)
    assert torch.allclose(weight_prior("gaussian", 2.0).kl(mu, sigma), ref, atol=1e-6)


def test_ard_kl_is_the_kl_to_the_optimal_gaussian():
    mu, sigma = torch.randn(50, dtype=torch.float64), torch.rand(50, dtype=torch.float64) + 0.05
    prior = ARDPrior()
    ref = kl_divergence(Normal(mu, sigma), prior.site(mu, sigma))
    assert torch.allclose(prior.kl(mu, sigma), ref, atol=1e-10)
    # empirical Bayes: any other prior scale gives a larger KL
    best = prior.site(mu, sigma).scale
    for factor in (0.8, 1.25):
        worse = kl_divergence(Normal(mu, sigma), Normal(0.0, best * factor))
        assert bool((worse > ref).all())


def test_log_uniform_kl_approximation_within_0_01_nats_of_quadrature():
    log_alphas = np.linspace(-8, 8, 33)
    mu = torch.ones(len(log_alphas), dtype=torch.float64)
    sigma = torch.exp(0.5 * torch.tensor(log_alphas))
    approx = LogUniformPrior().kl(mu, sigma).numpy()
    exact = np.array([exact_log_uniform_kl(a) for a in log_alphas])
    assert np.abs(approx - exact).max() < 0.01
    assert np.abs(approx - exact).max() > 1e-4  # an approximation, not the quadrature itself
    # depends on alpha only: rescaling mu and sigma together leaves it unchanged
    assert torch.allclose(LogUniformPrior().kl(3 * mu, 3 * sigma), torch.tensor(approx), atol=1e-6)


@pytest.mark.parametrize("log_alpha", [-3.0, 0.0, 2.0])
def test_log_uniform_density_constant_matches_the_kl_convention(log_alpha):
    """Monte Carlo ``E_q[log q - log p]`` with ``SymmetricLogUniform.log_prob`` is the quadrature
    KL: the improper density's constant is the one the fast path assumes."""
    torch.manual_seed(0)
    q = Normal(torch.tensor(0.7, dtype=torch.float64),
               0.7 * math.exp(0.5 * log_alpha) * torch.tensor(1.0, dtype=torch.float64))
    w = q.sample((400_000,))
    diff = q.log_prob(w) - SymmetricLogUniform().log_prob(w)
    se = diff.std().item() / math.sqrt(len(w))
    assert abs(diff.mean().item() - exact_log_uniform_kl(log_alpha)) < 4 * se + 1e-3


def test_log_uniform_is_improper_and_names_are_checked():
    d = SymmetricLogUniform((3,))
    assert d.batch_shape == (3,) and d.expand((2, 3)).batch_shape == (2, 3)
    with pytest.raises(NotImplementedError, match="improper"):
        d.sample()
    with pytest.raises(ValueError, match="unknown weight prior"):
        weight_prior("laplace")
    with pytest.raises(ValueError, match="positive"):
        GaussianPrior(0.0)


def test_sparsity_priors_favour_noisy_weights():
    """The log-uniform and ARD KLs fall as alpha grows (the pressure that sparsifies)."""
    mu = torch.ones(5)
    sigma = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0])
    for prior in (LogUniformPrior(), ARDPrior()):
        kl = prior.kl(mu, sigma)
        assert bool((kl[1:] < kl[:-1]).all()) and bool((kl > 0).all())
