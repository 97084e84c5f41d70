"""bayesdyn as a Pyro citizen: no global settings, Pyro's own SVI trains every parameter of every
family, the Pyro path's gradients equal the fast path's, and unsupported swaps explain
themselves."""

import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from torch.utils.data import TensorDataset

from bayesdyn.data import DataSplits
from bayesdyn.guides import DepthGuide, EmptyGuide, NestedGuide, init_to_network
from bayesdyn.inference import fit
from bayesdyn.models import DepthNet, DeterministicNet, NestedNet
from bayesdyn.nn import nested_mlp, residual_mlp


def test_import_changes_no_global_pyro_setting():
    code = """
import pyro, torch, warnings
before = dict(pyro.settings.get())
import bayesdyn, bayesdyn.models, bayesdyn.guides, bayesdyn.inference, bayesdyn.evaluation
import bayesdyn.cli, bayesdyn.runs
assert dict(pyro.settings.get()) == before, (before, pyro.settings.get())
# a user's unrelated AutoNormal + SVI still keeps its parameters in the global param store
def model():
    pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
guide = pyro.infer.autoguide.AutoNormal(model)
svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
svi.step()
assert "AutoNormal.locs.z" in pyro.get_param_store(), list(pyro.get_param_store())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "IProgress" not in result.stderr


def _tiny_data(n=32, features=6, classes=3, regression=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, features, generator=g)
    y = torch.randn(n, generator=g) if regression else torch.randint(0, classes, (n,), generator=g)
    return x, y


def _depth():
    torch.manual_seed(0)
    model = DepthNet(residual_mlp(6, 3, width=8, depth=2), num_classes=3)
    return model, DepthGuide(model), TraceEnum_ELBO(max_plate_nesting=1)


def _depth_bayesian_head():
    torch.manual_seed(0)
    model = DepthNet(residual_mlp(6, 3, width=8, depth=2), num_classes=3, output_prior_scale=1.0)
    return model, model.default_guide(), TraceEnum_ELBO(max_plate_nesting=1)


def _deterministic():
    torch.manual_seed(0)
    model = DeterministicNet(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(),
                                                 torch.nn.Linear(8, 3)), 3)
    return model, EmptyGuide(model), Trace_ELBO()


def _nested(bayesian=True):
    torch.manual_seed(0)
    model = NestedNet(nested_mlp(6, 3, hidden=(8, 8), groups=4, bayesian=bayesian), 3)
    return model, NestedGuide(model, learn_ordering=bayesian), TraceMeanField_ELBO()


FAMILIES = {"deterministic": _deterministic, "depth": _depth,
            "depth-bayesian-head": _depth_bayesian_head, "nested": _nested,
            "nested-dropout": lambda: _nested(bayesian=False)}


def _params(model, guide):
    out = {f"model.{n}": p for n, p in model.named_parameters()}
    out.update({f"guide.{n}": p for n, p in guide.named_parameters()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_svi_trains_every_parameter(family):
    model, guide, elbo = FAMILIES[family]()
    x, y = _tiny_data()
    guide(x, y, dataset_size=100)  # lazy autoguides create their parameters
    before = {n: p.detach().clone() for n, p in _params(model, guide).items()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    losses = [svi.step(x, y, dataset_size=100) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    unmoved = [n for n, p in _params(model, guide).items()
               if p.requires_grad and torch.equal(p.detach(), before[n])]
    assert not unmoved, f"SVI did not train {unmoved}"


@pytest.mark.parametrize("family", ["deterministic", "depth"])
def test_svi_loss_follows_fit_with_the_pyro_objective(family):
    """Same seed, same (full) batches: Pyro's SVI + pyro.optim.Adam and ``fit(objective="pyro")``
    (Pyro's ELBO as an nn.Module + torch Adam) take the same steps."""
    x, y = _tiny_data()
    data = DataSplits("tiny", TensorDataset(x, y), TensorDataset(x[:0], y[:0]),
                      TensorDataset(x[:0], y[:0]), 3, (6,), (0.0,), (1.0,))
    model, guide, _ = FAMILIES[family]()
    history = fit(model, guide, data, epochs=6, batch_size=len(x), lr=1e-2, objective="pyro",
                  device="cpu", progress=False)
    model_b, guide_b, elbo = FAMILIES[family]()
    svi = SVI(model_b, guide_b, pyro.optim.Adam({"lr": 1e-2}), elbo)
    losses = torch.tensor([svi.step(x, y, dataset_size=len(x)) for _ in range(6)]) / len(x)
    assert torch.allclose(losses, torch.tensor(history["loss"]), rtol=1e-4)
    assert losses[-1] < losses[0]
    for (name, p), q in zip(_params(model, guide).items(), _params(model_b, guide_b).values(),
                            strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_copies_train_their_own_parameters():
    import copy

    model, guide, elbo = _depth()
    twin, twin_guide = copy.deepcopy(model), copy.deepcopy(guide)
    x, y = _tiny_data()
    SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x, y)  # registers the original
    start = twin_guide.logits.detach().clone()
    SVI(twin, twin_guide, pyro.optim.Adam({"lr": 1e-2}), elbo).step(x, y)
    assert not torch.equal(twin_guide.logits.detach(), start)


# --- the nested family's Pyro path: equal to the fast path in value and gradient -------------

def _nested_pair(bayesian=True, gumbel_logits="log_probs", kl_weighting="survival"):
    torch.manual_seed(0)
    net = nested_mlp(6, 3, hidden=(8, 8), groups=4, frozen=1, bayesian=bayesian)
    model = NestedNet(net, 3, keep_prob=0.7, kl_weight=0.3)
    guide = NestedGuide(model, learn_ordering=True, gumbel_logits=gumbel_logits,
                        kl_weighting=kl_weighting)
    with torch.no_grad():  # far from the prior, with distinct survival and KL per group
        for rho in guide.rho:
            rho.copy_(torch.randn(rho.shape) * 3)
        for layer in net.bayes_layers().values():
            if bayesian:
                layer.weight_mu.normal_(0, 0.7)
                layer.weight_log_sigma.uniform_(-2.0, 0.0)
    return model, guide


def _grads(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


@pytest.mark.parametrize("gumbel_logits", ["log_probs", "probs"])
@pytest.mark.parametrize("kl_weighting", ["survival", "full"])
def test_trace_mean_field_kl_equals_fast_path_in_value_and_gradient(float64, gumbel_logits,
                                                                    kl_weighting):
    """Without the likelihood, the family's reference ELBO is deterministic (every KL in closed
    form): it must equal the fast path's KL terms exactly, gradients included. Deleting the
    ordering KL from the fast path, or shifting the survival weights by one group, breaks it."""
    model, guide = _nested_pair(gumbel_logits=gumbel_logits, kl_weighting=kl_weighting)
    x = torch.randn(5, 6)
    params = [*model.parameters(), *guide.parameters()]
    loss, terms = model.fast_loss(guide, x, torch.randint(0, 3, (5,)), 50)
    fast = loss - terms["nll"]
    prior_only = poutine.block(model, hide=["y"])  # the KL part of the ELBO
    pyro_kl = TraceMeanField_ELBO().differentiable_loss(prior_only, guide, x, None)
    assert terms["kl_order"] > 1.0 and terms["kl_weights"] > 1.0  # both terms matter
    assert torch.allclose(fast, pyro_kl, rtol=1e-10)
    for a, b in zip(_grads(fast, params), _grads(pyro_kl, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    rho_grad = _grads(pyro_kl, list(guide.rho))
    assert all(g.abs().max() > 1e-3 for g in rho_grad)  # the ordering KL reaches q(z)


def test_likelihood_part_equals_fast_path_under_the_same_draw(float64):
    """With point weights the only randomness is the ordering draw: the same seed gives the
    same straight-through mask, so the whole loss and its gradient in rho are equal."""
    model, guide = _nested_pair(bayesian=False)
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    params = [*model.parameters(), *guide.parameters()]
    torch.manual_seed(3)
    fast, _ = model.fast_loss(guide, x, y, 50)
    torch.manual_seed(3)
    ref = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y, 50)
    assert torch.allclose(fast, ref, rtol=1e-10)
    for a, b in zip(_grads(fast, params), _grads(ref, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_probs_as_logits_draws_masks_from_softmax_of_q_on_both_paths(float64):
    model, guide = _nested_pair(gumbel_logits="probs")
    q = guide.orderings()[0]
    with torch.no_grad():
        cuts = guide.downhill(q).sample((40000,)).sum(-1).long()
    freq = torch.bincount(cuts, minlength=q.num_groups + 1) / len(cuts)
    assert torch.allclose(freq, torch.softmax(q.probs, -1), atol=0.01)
    trace = poutine.trace(guide).get_trace(torch.randn(2, 6))
    assert torch.allclose(trace.nodes["order_0"]["fn"].probs, q.probs)  # KL uses the declared q


def test_kl_order_is_finite_when_q_underflows():
    """float32, K = 30, keep probabilities at the clip floor: q(z = 30) = 0.0067^30 underflows."""
    model = NestedNet(nested_mlp(6, 3, hidden=(32,), groups=32, frozen=2), 3)
    guide = NestedGuide(model)
    with torch.no_grad():
        guide.rho[0].fill_(-10.0)
    assert guide.orderings()[0].probs[-1] == 0
    kl = model.kl_terms(guide)["kl_order"]
    assert torch.isfinite(kl)
    kl.backward()
    assert torch.isfinite(guide.rho[0].grad).all()


def test_fixed_ordering_is_exactly_the_prior_beyond_the_rho_clip():
    """Nested dropout with keep_prob above sigmoid(5): its masks must follow the prior."""
    model = NestedNet(nested_mlp(6, 3, hidden=(8,), groups=4, bayesian=False), 3, keep_prob=0.999)
    guide = NestedGuide(model, learn_ordering=False)
    assert torch.allclose(guide.orderings()[0].probs, model.prior_probs()[0])


# --- unsupported swaps explain themselves -----------------------------------------------------

def test_depth_prior_accepts_discrete_distributions_and_explains_the_rest():
    stack = residual_mlp(6, 3, width=8, depth=3)
    model = DepthNet(stack, prior=dist.Geometric(0.5), num_classes=3)
    expected = 0.5 ** torch.arange(1.0, 5.0)  # Geometric(0.5) on 0..3, renormalised
    assert torch.allclose(model.prior_probs, expected / expected.sum())
    with pytest.raises(TypeError, match="discrete distribution"):
        DepthNet(stack, prior=dist.Normal(0.0, 1.0), num_classes=3)
    with pytest.raises(TypeError, match="unsupported depth prior"):
        DepthNet(stack, prior=0.5, num_classes=3)
    with pytest.raises(ValueError, match="sum to"):
        DepthNet(stack, prior=[0.5, 0.5, 0.5, 0.5], num_classes=3)


def test_log_uniform_prior_works_with_autonormal_and_explains_direct_draws():
    """The improper prior has no draws: an autoguide sets itself up at the network's weights
    (the model supplies them), and a direct draw says what to do instead."""
    from bayesdyn.distributions import SymmetricLogUniform

    torch.manual_seed(0)
    model = NestedNet(nested_mlp(6, 3, hidden=(8,), groups=4), 3, weight_prior="log-uniform")
    x, y = _tiny_data()
    is_order = lambda m: m["name"].startswith("order")  # noqa: E731
    guide = AutoGuideList(model)
    guide.append(NestedGuide(poutine.block(model, expose_fn=is_order), weights=False,
                             nested=model))
    guide.append(AutoNormal(poutine.block(model, hide_fn=is_order), init_scale=1e-3))
    loss = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y, 100)
    assert torch.isfinite(loss)
    assert torch.equal(guide[1]._get_loc_and_scale("blocks.0.layer.weight")[0],
                       model.grouped(model.net.blocks[0].layer.weight_mu, 4))
    with pytest.raises(NotImplementedError, match="init_to_network"):
        SymmetricLogUniform((3,)).sample()


def test_init_to_network_starts_autoguides_at_the_network_weights():
    model, _, elbo = _depth_bayesian_head()
    guide = AutoGuideList(model)
    guide.append(DepthGuide(poutine.block(model, expose=["depth"]), model.num_depths))
    guide.append(AutoNormal(poutine.block(model, hide=["depth"]),
                            init_loc_fn=init_to_network(model)))
    guide(*_tiny_data())
    assert torch.equal(guide[1]._get_loc_and_scale("output.weight")[0],
                       model.backbone.output_block.weight)


def test_weight_kl_is_its_expectation_over_the_ordering(float64):
    """An independent reference for the survival weighting: enumerate z under q(z) and sum the
    KL of the groups that are on (``1[g <= z]``), in value and gradient."""
    from torch.distributions import Normal, kl_divergence

    model, guide = _nested_pair()
    params = [*model.parameters(), *guide.parameters()]
    expected = torch.zeros(())
    for q, block in zip(guide.orderings(), model.net.blocks, strict=True):
        layer = block.layer
        kl_unit = kl_divergence(Normal(layer.weight_mu, layer.weight_sigma()), Normal(0.0, 1.0))
        kl_group = kl_unit.reshape(block.groups, -1).sum(-1)  # [G]
        for z, q_z in enumerate(q.probs):  # z ordered groups on, after the frozen ones
            expected = expected + q_z * kl_group[: block.frozen + z].sum()
    head = model.net.head
    expected = expected + kl_divergence(Normal(head.weight_mu, head.weight_sigma()),
                                        Normal(0.0, 1.0)).sum()
    got = model.kl_terms(guide)["kl_weights"]
    assert torch.allclose(got, expected, rtol=1e-10)
    for a, b in zip(_grads(got, params), _grads(expected, params), strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("family", ["depth", "nested"])
def test_weight_autoguide_starts_at_the_network_and_trains(family, digits):
    """The family's structure guide + a Pyro autoguide over the weights, with defaults that train
    (Pyro's own start all-zero weights, every unit equal)."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    from bayesdyn.guides import weight_autoguide
    from bayesdyn.inference import predict

    torch.manual_seed(0)
    if family == "depth":
        model = DepthNet(residual_mlp(64, 10, 32, 2, input_shape=(1, 8, 8)), num_classes=10,
                         input_shape=(1, 8, 8), output_prior_scale=1.0)
        site, value = "output.weight", lambda: model.backbone.output_block.weight
    else:
        model = NestedNet(nested_mlp(64, 10, (32,), groups=8, input_shape=(1, 8, 8)), 10,
                          input_shape=(1, 8, 8))
        site, value = "blocks.0.layer.weight", lambda: model.grouped(
            model.net.blocks[0].layer.weight_mu, 8)
    guide = weight_autoguide(model)
    guide(*digits.train[:2])
    loc, scale = guide[1]._get_loc_and_scale(site)
    assert torch.equal(loc, value()) and torch.allclose(scale, torch.full_like(scale, 1e-3))
    assert type(guide[0]).__name__ == ("DepthGuide" if family == "depth" else "NestedGuide")
    fit(model, guide, digits, epochs=4, batch_size=64, lr=3e-3, device="cpu", progress=False)
    x, y = digits.test.tensors
    assert (predict(model, guide, x).mean.argmax(-1) == y).float().mean() > 0.7
    lowrank = weight_autoguide(model, AutoLowRankMultivariateNormal, rank=2)
    assert torch.isfinite(model.reference_loss().differentiable_loss(model, lowrank,
                                                                       *digits.train[:8]))
