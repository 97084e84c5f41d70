"""Last-layer Laplace of one head (bayesdyn.inference.laplace) against laplace-torch, in float64:
posterior precisions, log marginal likelihood, probit / bridge / Monte Carlo predictives, and
the exact evidence-maximising prior precision."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdyn.inference import link
from bayesdyn.inference.lastlayer import HeadLaplace

laplace_torch = pytest.importorskip("laplace", reason="laplace-torch is the dev extra's reference")

N, D, C = 150, 5, 4


def trained_head(n=N, d=D, c=C):
    """A head trained a little on separable-ish features (a MAP-like point, not a random one)."""
    phi, w = torch.randn(n, d), torch.randn(c, d)
    y = (phi @ w.T + 0.5 * torch.randn(n, c)).argmax(-1)
    head = nn.Linear(d, c)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=50)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(phi), y, reduction="sum") \
            + 0.5 * sum(p.pow(2).sum() for p in head.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return head, phi, y


def reference(head, phi, y, structure, prior_precision):
    net = nn.Sequential(nn.Identity(), head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = laplace_torch.Laplace(net, "classification", subset_of_weights="last_layer",
                                   hessian_structure=structure, last_layer_name="1",
                                   prior_precision=prior_precision)
        la.fit(DataLoader(TensorDataset(phi, y), batch_size=64))
    return la


def dense(precision):
    if hasattr(precision, "to_matrix"):
        return precision.to_matrix()
    return torch.diag(precision) if precision.ndim == 1 else precision


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_precision_evidence_and_predictives_equal_laplace_torch(float64, structure):
    head, phi, y = trained_head()
    la = reference(head, phi, y, structure, 0.7)
    mine = HeadLaplace.fit(head, phi, y, structure, batch_size=64)  # several chunks
    mine.prior_precision.fill_(0.7)
    assert rel(mine.posterior_precision(), dense(la.posterior_precision)) < 1e-10
    assert abs(float(mine.log_marginal_likelihood()) / float(la.log_marginal_likelihood()) - 1) < 1e-10
    x = torch.randn(9, D)
    mu, cov = mine.logit_moments(x)
    assert rel(link.probit(mu, cov), la(x, link_approx="probit")) < 1e-10
    _, var = mine.logit_moments(x, full_cov=False)  # the fast diagonal path agrees
    assert rel(link.probit(mu, var), la(x, link_approx="probit")) < 1e-10
    assert rel(link.bridge(mu, cov), la(x, link_approx="bridge")) < 1e-10
    f_mu, f_var = la._glm_predictive_distribution(x)  # MC given the same shared noise
    ref = la._glm_predictive_samples(f_mu, f_var, n_samples=6,
                                     generator=torch.Generator().manual_seed(3)).mean(0)
    noise = torch.randn(C, 6, generator=torch.Generator().manual_seed(3)).T  # laplace-torch's draw
    assert rel(link.mc(mu, cov, noise=noise), ref) < 1e-10


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_prior_precision_is_the_exact_evidence_maximiser(float64, structure):
    head, phi, y = trained_head()
    mine = HeadLaplace.fit(head, phi, y, structure)
    best = mine.optimal_prior_precision()
    la = reference(head, phi, y, structure, best)
    log_delta = torch.tensor(best).log().requires_grad_()
    evidence = la.log_marginal_likelihood(prior_precision=log_delta.exp())  # the reference's
    (grad,) = torch.autograd.grad(evidence, log_delta)
    evidence = evidence.detach()
    assert abs(float(grad)) < 1e-6 * abs(evidence.item())
    # the closed-form gradient is the autograd one of our evidence (guards each of its terms)
    delta = torch.tensor(1.3, requires_grad=True)
    (auto,) = torch.autograd.grad(mine.log_marginal_likelihood(delta), delta)
    assert torch.allclose(mine.evidence_gradient(1.3), auto, rtol=1e-10)
    # laplace-torch's default optimiser (100 Adam steps on log delta) ends at no higher evidence
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(method="marglik")
    assert float(la.log_marginal_likelihood()) <= float(mine.log_marginal_likelihood(best)) + 1e-9


@pytest.mark.parametrize("structure", ["diag", "kron", "full", "kron-paper"])
def test_weight_draws_have_the_posterior_covariance_behind_the_logit_moments(float64, structure):
    """``sample`` and ``logit_moments`` describe one Gaussian: the logits of many weight draws
    have the predicted mean and covariance."""
    head, phi, y = trained_head(n=60, d=3, c=3)
    mine = HeadLaplace.fit(head, phi, y, structure, batch_size=16)
    mine.prior_precision.fill_(4.0)
    x = torch.randn(2, 3)
    w = mine.sample(40000, generator=torch.Generator().manual_seed(0))
    f = torch.einsum("scd,nd->snc", w, torch.cat([x, torch.ones(2, 1)], 1))
    mu, cov = mine.logit_moments(x)
    assert torch.allclose(f.mean(0), mu, atol=0.02)
    emp = torch.einsum("sna,snb->nab", f - mu, f - mu) / f.shape[0]
    assert torch.allclose(emp, cov, atol=0.03 * float(cov.abs().max()))
    if structure != "kron-paper":  # the precision's inverse, mapped through J, is the same cov
        sigma = torch.linalg.inv(mine.posterior_precision())
        j = torch.cat([torch.kron(torch.eye(3), x[:1]), torch.eye(3)], 1)  # [vec(W), b] order
        assert torch.allclose(j @ sigma @ j.T, cov[0], rtol=1e-8)


def test_bad_input_raises_before_work():
    head = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="structure"):
        HeadLaplace.fit(head, torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "block")
    with pytest.raises(ValueError, match="features"):
        HeadLaplace.fit(head, torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="link"):
        link.predictive(torch.zeros(1, 2), torch.ones(1, 2), "softmax")


def test_paper_variant_is_ema_of_sampled_fisher_with_sqrt_n_and_sqrt_prior(float64):
    """kron-paper on two minibatches, by hand: one sampled label per input, factors averaged
    per batch, EMA weights rho_0 = 0 and rho_1 = 1/2, each factor times sqrt(N), sqrt(delta)
    added to each."""
    head, phi, y = trained_head(n=40, d=3, c=3)
    mine = HeadLaplace.fit(head, phi, y, "kron-paper", batch_size=20,
                           generator=torch.Generator().manual_seed(5))
    mine.prior_precision.fill_(2.0)
    g = torch.Generator().manual_seed(5)
    phit = torch.cat([phi, torch.ones(40, 1)], 1)
    outs, ins = [], []
    for part in (slice(0, 20), slice(20, 40)):
        p = torch.softmax(phit[part] @ mine.mean.T, -1)
        grad = p - torch.nn.functional.one_hot(torch.multinomial(p, 1, generator=g)[:, 0], 3)
        outs.append(grad.T @ grad / 20)
        ins.append(phit[part].T @ phit[part] / 20)
    u = (0.5 * outs[0] + 0.5 * outs[1]) * 40 ** 0.5 + 2.0 ** 0.5 * torch.eye(3)
    v = (0.5 * ins[0] + 0.5 * ins[1]) * 40 ** 0.5 + 2.0 ** 0.5 * torch.eye(4)
    folded = torch.kron(u, v)
    order = torch.cat([torch.arange(12).view(3, 4)[:, :3].flatten(), torch.arange(12).view(3, 4)[:, 3]])
    assert torch.allclose(mine.posterior_precision(), folded[order][:, order], rtol=1e-10)


def test_mc_draws_fresh_noise_per_input_by_default(float64):
    mu, cov = torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3)
    fresh = link.logit_samples(mu, cov, 5, generator=torch.Generator().manual_seed(0))
    shared = link.logit_samples(mu, cov, 5, shared_noise=True,
                                generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(fresh[:, 0], fresh[:, 1]) and torch.allclose(shared[:, 0], shared[:, 1])
    mu = torch.randn(2, 3)  # both estimate E[softmax(f)]: equal for many draws
    a = link.mc(mu, cov * 2, 100000, generator=torch.Generator().manual_seed(1))
    b = link.mc(mu, cov * 2, 100000, shared_noise=True, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, atol=0.005) and not torch.allclose(a, link.probit(mu, cov * 2),
                                                                   atol=0.005)
