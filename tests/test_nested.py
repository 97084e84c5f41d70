import math

import numpy as np
import pyro
import pytest
import torch

from bayesdyn.distributions import GaussianPrior, StickBreakingOrdering, TruncatedGeometric
from bayesdyn.evaluation import measure
from bayesdyn.guides import NestedGuide
from bayesdyn.inference import fit, predict
from bayesdyn.models import Budget, NestedNet
from bayesdyn.nn import nested_convnet, nested_mlp


def small_pair(bayesian=True, **kwargs):
    torch.manual_seed(0)
    net = nested_mlp(6, 3, hidden=(8, 8), groups=4, frozen=1, bayesian=bayesian)
    if bayesian:
        for layer in net.bayes_layers().values():
            layer.weight_log_sigma.data.fill_(-1.0)  # visible weight noise
    model = NestedNet(net, 3, keep_prob=0.7, **kwargs)
    return model, NestedGuide(model, init_rho=0.5, learn_ordering=bayesian)


@pytest.mark.parametrize("weight_prior", ["gaussian", "ard", "log-uniform"])
def test_fast_loss_equals_trace_elbo_in_expectation(float64, weight_prior):
    model, guide = small_pair(weight_prior=weight_prior)
    model.eval()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with torch.no_grad():
        fast = torch.stack([model.fast_loss(guide, x, y, 100)[0] for _ in range(800)])
        elbo = pyro.infer.Trace_ELBO(num_particles=4000, vectorize_particles=True,
                                     max_plate_nesting=1)
        ref = torch.tensor([elbo.loss(model, guide, x, y, 100) for _ in range(4)])
    se = math.sqrt(fast.var().item() / len(fast) + ref.var().item() / len(ref))
    # the log-uniform KL is an approximation, within 0.01 nats per weight (test_weight_priors)
    n_weights = sum(layer.weight_mu.numel() for layer in model.net.bayes_layers().values())
    approx = 0.01 * n_weights if weight_prior == "log-uniform" else 0.0
    assert abs(fast.mean().item() - ref.mean().item()) < 4 * se + 1e-3 + approx
    assert se < 1.0  # the comparison is sharp enough to mean something (loss ~ 170)


def test_kl_terms_are_exact():
    model, guide = small_pair()
    terms = model.kl_terms(guide)
    q = guide.orderings()
    ref_z = sum(torch.distributions.kl_divergence(qi, TruncatedGeometric(0.7, qi.num_groups))
                for qi in q)
    assert torch.isclose(terms["kl_order"], ref_z.float(), rtol=1e-5)
    # weight KL by hand for block 0: Q_g * sum over the group's weights of the Gaussian KL
    layer, block = model.net.blocks[0].layer, model.net.blocks[0]
    kl_unit = torch.distributions.kl_divergence(
        torch.distributions.Normal(layer.weight_mu, layer.weight_sigma()),
        torch.distributions.Normal(0.0, 1.0)).sum(-1)
    survival = torch.cat([torch.ones(1), q[0].survival()[1:]])
    block0 = (survival * kl_unit.reshape(block.groups, -1).sum(-1)).sum()
    per_group = layer.kl_per_unit(GaussianPrior(1.0)).reshape(4, -1).sum(-1)
    assert torch.isclose(per_group @ survival, block0, rtol=1e-5)


def test_gradients_reach_ordering_and_weights():
    model, guide = small_pair()
    loss, _ = model.fast_loss(guide, torch.randn(16, 6), torch.randint(0, 3, (16,)), 100)
    loss.backward()
    assert all(r.grad.abs().sum() > 0 for r in guide.rho)
    assert model.net.blocks[0].layer.weight_log_sigma.grad.abs().sum() > 0


def test_gaussian_preactivation_matches_autograd_reference(float64):
    from bayesdyn.nn.ordered import GaussianPreactivation

    mean = torch.randn(4, 3, 5, 5, requires_grad=True)
    var = torch.rand(4, 3, 5, 5, requires_grad=True)
    torch.manual_seed(1)
    out = GaussianPreactivation.apply(mean, var)
    torch.manual_seed(1)
    ref = mean + var.sqrt() * torch.randn_like(mean)
    grad = torch.randn_like(out)
    assert torch.allclose(out, ref)
    got = torch.autograd.grad(out, (mean, var), grad)
    want = torch.autograd.grad(ref, (mean, var), grad)
    assert all(torch.allclose(a, b) for a, b in zip(got, want, strict=True))


def test_mask_gradient_reaches_switched_off_groups_after_pooling():
    """The straight-through gradient of a group that is off is sum(grad * pooled activation):
    masking after the max-pool gives it exactly (pooling a zeroed map would pick arbitrary ties)."""
    torch.manual_seed(0)
    net = nested_convnet(1, 3, channels=(8,), groups=4, frozen=1)
    block = net.blocks[0]
    block.eval()
    x = torch.randn(1, 5, 1, 6, 6)
    mask = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    out = block(x, mask, sample=False)
    out.sum().backward()
    with torch.no_grad():
        full = block(x, None, sample=False)  # all groups on
    per_group = full.sum((0, 1, 3, 4)).reshape(4, -1).sum(-1)[1:]
    assert torch.allclose(mask.grad[0], per_group, rtol=1e-5)
    assert (out[:, :, 4:] == 0).all() and torch.allclose(out[:, :, :4], full[:, :, :4])


def test_width_slicing_computes_less_and_equals_masking():
    net = nested_convnet(1, 10, channels=(16, 32, 32), groups=16, frozen=1)
    model = NestedNet(net, 10, input_shape=(1, 28, 28))
    budgets = measure(model, (1, 28, 28))
    flops = [b.flops for b in budgets]
    assert len(budgets) == 16 and flops == sorted(flops) and flops[0] < flops[-1] / 10
    assert budgets[0].params < budgets[-1].params / 10
    net.eval()
    x = torch.randn(3, 1, 28, 28)
    keep = budgets[4].setting
    sliced = net(x, n_groups=keep, sample=False)
    masks = [(torch.arange(b.num_orderable) < k - b.frozen).float()
             for b, k in zip(net.blocks, keep, strict=True)]
    assert torch.allclose(sliced, net(x, masks=masks, sample=False), atol=1e-5)


def test_prediction_is_vectorised_over_samples_and_widths():
    model, guide = small_pair()
    model.eval()
    x = torch.randn(7, 6)
    marginal = predict(model, guide, x, num_samples=6)
    assert marginal.probs.shape == (6, 7, 3) and (marginal.epistemic > 0).any()
    narrow = predict(model, guide, x, budget=model.budgets()[0], num_samples=4)
    assert narrow.probs.shape == (4, 7, 3)
    mean_only = model.predict_probs(guide, x, deterministic=True, num_samples=5)
    assert mean_only.probs.shape == (1, 7, 3)


def test_nested_dropout_baseline_has_no_kl_and_fixed_ordering():
    model, guide = small_pair(bayesian=False)
    _, terms = model.fast_loss(guide, torch.randn(4, 6), torch.randint(0, 3, (4,)), 40)
    assert terms["kl_order"] == 0 and terms["kl_weights"] == 0
    assert not list(guide.parameters())
    assert torch.allclose(guide.orderings()[0].probs, TruncatedGeometric(0.7, 3).probs, atol=1e-6)


def test_learned_ordering_and_width_calibration_on_digits(digits):
    torch.manual_seed(0)
    net = nested_mlp(64, 10, hidden=(32, 32), groups=16, frozen=1, input_shape=(1, 8, 8))
    model = NestedNet(net, 10, input_shape=(1, 8, 8))
    guide = model.default_guide()
    history = fit(model, guide, digits, epochs=3, batch_size=64, lr=3e-3, device="cpu",
                  progress=False)
    assert history.objective == "fast" and history.epochs[-1]["val_accuracy"] > 0.5
    before = [q.probs.detach() for q in NestedGuide(model).orderings()]
    after = [q.probs.detach() for q in guide.orderings()]
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(after, before, strict=False))  # q moved: learned
    model.prepare_evaluation(digits.train, guide)
    settings = model._marginal_settings
    assert len(settings) == NestedNet.MARGINAL_ORDERINGS
    assert set(model._width_stats) == {b.setting for b in model.budgets()} | set(settings)
    # the marginal averages the calibrated orderings, each with its own BatchNorm statistics
    model.eval()
    x = digits.test.tensors[0][:20]
    marginal = model.predict_probs(guide, x, deterministic=True).mean()
    per_ordering = torch.stack([model.predict_probs(guide, x, Budget("o", s), deterministic=True)
                                .mean() for s in settings])
    assert torch.allclose(marginal, per_ordering.mean(0), atol=1e-6)
    draws = model.predict_probs(guide, x, num_samples=20)  # draw s uses ordering s mod 8
    assert draws.probs.shape[0] == 20 and torch.isclose(draws.weights.sum(), torch.tensor(1.0))
    assert set(model.structure_posterior(guide)) == {"order_0", "order_0 prior",
                                                     "order_1", "order_1 prior"}


def test_sparsity_prior_sparsifies_and_recipe_passes_it_on(digits):
    """Same data and steps: the log-uniform prior leaves far more weights noise-dominated
    (log alpha > 3) than the Gaussian prior, and the network still learns."""
    from bayesdyn.recipes import Recipe, build

    sparsity, accuracy = {}, {}
    for prior in ("gaussian", "log-uniform"):
        torch.manual_seed(0)
        model, guide = build(Recipe("nested", width=32, weight_prior=prior), digits.input_shape, 10)
        assert model.weight_prior.name == prior
        history = fit(model, guide, digits, epochs=4, batch_size=64, lr=1e-2, device="cpu",
                      progress=False)
        sparsity[prior] = model.weight_sparsity()["blocks.0.layer"]
        accuracy[prior] = history.epochs[-1]["val_accuracy"]
    assert sparsity["log-uniform"] > 0.4 and sparsity["log-uniform"] > 3 * sparsity["gaussian"]
    assert accuracy["log-uniform"] > 0.7


def test_user_ordering_prior_and_errors():
    net = nested_mlp(6, 3, hidden=(8,), groups=4, frozen=1)
    custom = StickBreakingOrdering(torch.tensor([0.9, 0.9, 0.2]))
    model = NestedNet(net, 3, ordering_prior=custom)
    assert torch.allclose(model.prior_probs()[0], custom.probs)
    with pytest.raises(ValueError, match="OrderingDistribution over 0..3"):
        NestedNet(net, 3, ordering_prior=TruncatedGeometric(0.5, 5))
    with pytest.raises(ValueError, match="keep_prob"):
        NestedNet(net, 3, keep_prob=1.5)
    with pytest.raises(ValueError, match="groups cannot share equally"):
        nested_mlp(6, 3, hidden=(10,), groups=4)


def test_nested_exports_to_arviz(digits):
    import arviz as az

    from bayesdyn.inference import to_datatree
    from bayesdyn.recipes import Recipe, build

    torch.manual_seed(0)
    model, guide = build(Recipe("nested", width=32), digits.input_shape, 10)
    x, y = (t[:30] for t in digits.test.tensors)
    tree = to_datatree(model, guide, x, y, num_samples=400)
    post = tree["posterior"].dataset
    assert set(post.data_vars) == {"order_0", "order_1", "order_0_probs", "order_1_probs"}
    cuts = post["order_0"].values  # [chain, draw]: the number of ordered groups on
    assert cuts.shape == (1, 400) and cuts.min() >= 0 and cuts.max() <= 15
    q = guide.orderings()[0].probs.detach().numpy()
    assert np.allclose(post["order_0_probs"].values[0, 0], q, atol=1e-6)
    freq = np.bincount(cuts[0], minlength=16) / 400
    assert np.abs(freq - q).max() < 0.1  # the drawn cuts follow q(z)
    assert "mean" in az.summary(tree, var_names=["order_0"]).columns
