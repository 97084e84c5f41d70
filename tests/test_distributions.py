import pytest
import torch
from pyro.distributions.testing.gof import multinomial_goodness_of_fit
from scipy import integrate
from torch.distributions import kl_divergence

from bayesdyn.distributions import Downhill, StickBreakingOrdering, TruncatedGeometric

TEST_FAILURE_RATE = 1e-3  # Pyro's convention for its own goodness-of-fit tests


def test_truncated_geometric_pmf_support_and_survival():
    p = TruncatedGeometric(0.8, 4)
    expected = torch.tensor([0.2, 0.8 * 0.2, 0.8**2 * 0.2, 0.8**3 * 0.2, 0.8**4])
    assert torch.allclose(p.probs, expected) and torch.isclose(p.probs.sum(), torch.tensor(1.0))
    assert p.enumerate_support(expand=False).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(p.log_prob(torch.tensor(2)), expected[2].log())
    assert torch.allclose(p.survival(), 0.8 ** torch.arange(5.0))
    assert torch.allclose(p.survival(), super(TruncatedGeometric, p).survival())
    assert p.batch_shape == () and p.expand((3,)).batch_shape == (3,)
    with pytest.raises(ValueError):
        TruncatedGeometric(torch.tensor(1.5), 3, validate_args=True)


def test_stick_breaking_matches_prior_when_constant_and_survival():
    beta = torch.full((4,), 0.8)
    q = StickBreakingOrdering(beta)
    assert torch.allclose(q.probs, TruncatedGeometric(0.8, 4).probs)
    betas = torch.tensor([0.9, 0.5, 0.7])
    q = StickBreakingOrdering(betas)
    assert torch.allclose(q.probs, torch.tensor([0.1, 0.9 * 0.5, 0.45 * 0.3, 0.45 * 0.7]))
    assert torch.allclose(q.survival(), torch.tensor([1.0, 0.9, 0.45, 0.315]))
    assert torch.isclose(q.probs.sum(), torch.tensor(1.0))
    batched = StickBreakingOrdering(torch.rand(2, 3, 5))
    assert batched.batch_shape == (2, 3) and batched.probs.shape == (2, 3, 6)


def test_kl_between_orderings_is_registered_and_exact():
    q, p = StickBreakingOrdering(torch.tensor([0.9, 0.5, 0.7])), TruncatedGeometric(0.6, 3)
    manual = (q.probs * (q.probs.log() - p.probs.log())).sum()
    assert torch.isclose(kl_divergence(q, p), manual)
    assert kl_divergence(p, p).abs() < 1e-7


def test_hard_samples_follow_the_ordering_pmf():
    q = StickBreakingOrdering(torch.tensor([0.9, 0.6, 0.5, 0.8]))
    d = Downhill(probs=q.probs, temperature=2.0, hard=True)
    masks = d.sample((20_000,))
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    counts = torch.bincount(d.cut(masks), minlength=5).double()
    assert multinomial_goodness_of_fit(q.probs.double(), counts) > TEST_FAILURE_RATE


def test_relaxed_samples_are_monotone_masks_in_unit_interval():
    d = Downhill(probs=TruncatedGeometric(0.7, 6).probs, temperature=0.5)
    masks = d.rsample((1000,))
    assert masks.shape == (1000, 6)
    assert (masks >= 0).all() and (masks <= 1 + 1e-6).all()
    assert (masks[:, 1:] <= masks[:, :-1] + 1e-6).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_log_prob_integrates_to_one(temperature):
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    d2 = Downhill(probs=probs, temperature=temperature)
    dens2 = lambda d2_, d1_: d2.log_prob(torch.tensor([d1_, d2_], dtype=torch.float64)).exp().item()  # noqa: E731
    total, _ = integrate.dblquad(dens2, 0, 1, 0, lambda d1_: d1_)  # 1 >= d1 >= d2 >= 0
    assert total == pytest.approx(1.0, abs=2e-3)
    d1 = Downhill(probs=torch.tensor([0.3, 0.7], dtype=torch.float64), temperature=temperature)
    dens1 = lambda v: d1.log_prob(torch.tensor([v], dtype=torch.float64)).exp().item()  # noqa: E731
    total, _ = integrate.quad(dens1, 0, 1)
    assert total == pytest.approx(1.0, abs=1e-6)


def test_gradients_reach_the_ordering_parameters():
    for hard in (False, True):
        rho = torch.zeros(4, requires_grad=True)
        q = StickBreakingOrdering(torch.sigmoid(rho))
        masks = Downhill(probs=q.probs, temperature=1.0, hard=hard).rsample((64,))
        (masks * torch.arange(1.0, 5.0)).sum().backward()
        assert rho.grad is not None and rho.grad.abs().sum() > 0


def test_zero_temperature_limit_is_the_categorical():
    q = StickBreakingOrdering(torch.tensor([0.8, 0.5, 0.9]))
    d = Downhill(probs=q.probs, temperature=0.02)
    masks = d.rsample((20_000,))
    assert (masks - masks.round()).abs().mean() < 0.01  # nearly binary
    counts = torch.bincount(d.cut(masks), minlength=4).double()
    assert multinomial_goodness_of_fit(q.probs.double(), counts) > TEST_FAILURE_RATE


def test_batch_shapes_broadcast():
    probs = TruncatedGeometric(torch.tensor([0.5, 0.9, 0.7]), 5).probs  # [3, 6]
    d = Downhill(probs=probs, temperature=1.0)
    assert d.batch_shape == (3,) and d.event_shape == (5,)
    sample = d.rsample((4,))
    assert sample.shape == (4, 3, 5) and d.log_prob(sample).shape == (4, 3)
    assert d.expand((2, 3)).rsample().shape == (2, 3, 5)
    with pytest.raises(ValueError, match="exactly one"):
        Downhill(temperature=1.0)
