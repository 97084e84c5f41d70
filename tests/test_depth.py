import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal

from bayesdyn.evaluation import measure
from bayesdyn.guides import DepthGuide
from bayesdyn.inference import fit, predict
from bayesdyn.models import DepthNet, depth_prior
from bayesdyn.nn import Bottleneck, residual_mlp, resnet50_depth, resnet_depth, vds_convnet


def random_pair(likelihood="classification", prior="uniform", backbone=None):
    backbone = backbone or residual_mlp(6, 4 if likelihood == "classification" else 1, width=8,
                                        depth=3)
    model = DepthNet(backbone, prior=prior, likelihood=likelihood,
                     num_classes=4 if likelihood == "classification" else None)
    guide = DepthGuide(model, init_logits=torch.randn(model.num_depths))
    with torch.no_grad():  # random parameters everywhere, including BatchNorm's affine ones
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model, guide


@pytest.fixture
def float64():
    """float64 throughout (Pyro's enumeration builds its own tensors in the default dtype), so
    any difference between the two losses is a real one, not rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("prior", ["uniform", "decaying"])
def test_fast_loss_equals_traceenum_value_and_gradients(likelihood, prior, float64):
    model, guide = random_pair(likelihood, prior)
    x = torch.randn(9, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (9,)) if likelihood == "classification" else torch.randn(9).double()
    model.eval()  # the same BatchNorm behaviour in both evaluations
    params = [p for p in (*model.parameters(), *guide.parameters()) if p.requires_grad]
    ref = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, y, 250)
    fast, terms = model.fast_loss(guide, x, y, 250)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    assert (terms["nll"] + terms["kl"]).item() == pytest.approx(fast.item(), rel=1e-6)
    for g_fast, g_ref in zip(grads(fast, params), grads(ref, params), strict=True):
        assert (g_fast - g_ref).norm() <= 1e-5 * g_ref.norm() + 1e-12


def test_fast_loss_equals_traceenum_with_batchnorm_in_the_shared_head(float64):
    """DUN's ResNet-50 layout: the shared output block holds a bottleneck stage with BatchNorm in
    training mode (statistics over every depth of the batch); the fast path still equals Pyro."""
    backbone = resnet_depth(1, 4, stages=(1, 2, 1), widths=(2, 2, 4), block="bottleneck",
                            shared_stages=1)
    model, guide = random_pair(backbone=backbone)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    model.train()
    ref = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, y, 60)
    fast, _ = model.fast_loss(guide, x, y, 60)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)


def test_resnet50_recipe_trains_and_every_depth_is_a_budget(digits):
    from bayesdyn.evaluation import evaluate
    from bayesdyn.recipes import Recipe, build

    torch.manual_seed(0)
    model, guide = build(Recipe("depth", arch="resnet50", width=4), digits.input_shape, 10)
    history = fit(model, guide, digits, epochs=1, batch_size=128, lr=3e-3, device="cpu",
                  progress=False)
    assert history.objective == "fast"
    metrics = evaluate(model, guide, digits, ood=None)
    flops = [b["flops"] for b in metrics["budgets"]]
    assert len(flops) == 14 and flops == sorted(flops) and flops[0] > 0  # stage 4 in every depth


def test_kl_term_is_the_categorical_kl():
    model, guide = random_pair(prior="decaying")
    _, terms = model.fast_loss(guide, torch.randn(3, 6), torch.randint(0, 4, (3,)), 3)
    ref = torch.distributions.kl_divergence(dist.Categorical(logits=guide.logits),
                                            dist.Categorical(model.prior_probs))
    assert terms["kl"].item() == pytest.approx(ref.item(), rel=1e-6)


def test_priors():
    assert torch.allclose(depth_prior("uniform", 4), torch.full((4,), 0.25))
    vds = depth_prior("decaying", 3)
    assert torch.allclose(vds, torch.tensor([0.85, 0.85**2, 0.85**3]) / (0.85 + 0.85**2 + 0.85**3))
    user = depth_prior(torch.distributions.Categorical(torch.tensor([1.0, 3.0])), 2)
    assert torch.allclose(user, torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="expected \\[3\\]"):
        depth_prior(torch.ones(4), 3)
    with pytest.raises(ValueError, match="positive"):
        depth_prior(torch.tensor([1.0, 0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="unknown depth prior"):
        depth_prior("geometric", 3)


def test_one_pass_returns_every_depth_and_matches_truncated_nets():
    for backbone, shape in ((residual_mlp(6, 4, width=8, depth=3), (6,)),
                            (vds_convnet(1, 4, depth=2, channels=8, hidden=4), (1, 12, 12)),
                            (resnet_depth(3, 4, stages=(1, 1), widths=(4, 8)), (3, 8, 8)),
                            (resnet_depth(3, 4, stages=(1, 2, 1), widths=(2, 4, 4),
                                          block="bottleneck", shared_stages=1), (3, 8, 8))):
        backbone.eval()
        x = torch.randn(5, *shape)
        out = backbone(x)
        assert out.shape == (backbone.max_depth + 1, 5, 4)
        for d in range(backbone.max_depth + 1):
            assert torch.allclose(out[d], backbone.truncated(d)(x), atol=1e-5)
        lead = backbone(x.expand(2, *x.shape))  # a leading sample dim broadcasts
        assert lead.shape == (backbone.max_depth + 1, 2, 5, 4)


def test_resnet50_depth_has_torchvisions_residual_trunk():
    """DUN's ResNet-50: stages 1-3 (13 bottlenecks) are the depths, stage 4 sits in the shared
    output block; the blocks hold exactly torchvision's ResNet-50 layer1-layer4 parameters."""
    from torchvision.models import resnet50

    net = resnet50_depth(3, 10)
    assert net.max_depth == 13
    ours = sum(p.numel() for p in net.blocks.parameters())
    ours += sum(p.numel() for m in net.output_block if isinstance(m, Bottleneck)
                for p in m.parameters())
    ref = resnet50(num_classes=10)
    assert ours == sum(p.numel() for name in ("layer1", "layer2", "layer3", "layer4")
                       for p in getattr(ref, name).parameters())
    assert net.output_block[-1].in_features == 2048
    with pytest.raises(ValueError, match="block must be"):
        resnet_depth(3, 10, block="dense")


def _per_depth_reference(backbone, x):
    """DUN's code, written out: the trunk once, then adapter + output block once per depth, in
    depth order (each call normalises with its own batch and updates the running statistics)."""
    h = backbone.input_block(x)
    acts = [h]
    for block in backbone.blocks:
        h = block(h)
        acts.append(h)
    return torch.stack([backbone.output_block(backbone.adapters[d](a))
                        for d, a in enumerate(acts)])


def _bn_state(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "tracked" in k}


@pytest.mark.parametrize("momentum", [0.1, None])
def test_resnet_shared_head_matches_duns_one_call_per_depth(momentum):
    import copy

    torch.manual_seed(0)
    net = resnet_depth(3, 4, stages=(1, 2, 1), widths=(4, 4, 8), block="bottleneck",
                       shared_stages=1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    with torch.no_grad():  # non-trivial affine BN parameters everywhere
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    reference = copy.deepcopy(net)
    x = torch.randn(6, 3, 8, 8)
    for step in range(2):  # training mode: per-depth batch statistics, D + 1 updates per call
        ours, ref = net(x + step), _per_depth_reference(reference, x + step)
        assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
        for (k, a), b in zip(_bn_state(net).items(), _bn_state(reference).values(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), k
    net.eval(), reference.eval()
    assert torch.allclose(net(x), _per_depth_reference(reference, x), atol=1e-5)
    pooled = resnet_depth(3, 4, stages=(1, 2, 1), widths=(4, 4, 8), block="bottleneck",
                          shared_stages=1, head_statistics="pooled")
    pooled.load_state_dict(copy.deepcopy(reference).state_dict(), strict=False)
    pooled.train()
    assert not torch.allclose(pooled(x), _per_depth_reference(copy.deepcopy(reference), x),
                              atol=1e-3)  # the option really differs


def test_dun_adapters_are_shared_per_stage_and_chained():
    net = resnet50_depth(3, 10, width=4)  # stages 1-3 are depths: 1 stem + 3 + 4 + 6 blocks
    stages = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3]  # the stem has stage 1's shape
    steps = {}
    for d, stage in enumerate(stages):
        adapter = net.adapters[d]
        if stage == 3:
            assert isinstance(adapter, torch.nn.Identity)
            continue
        convs = [m for m in adapter.modules() if isinstance(m, torch.nn.Conv2d)]
        chain = convs[1:] if d == 0 else convs  # depth 0 first widens the stem (16 -> 16 x 4)
        assert [c.stride for c in chain] == [(2, 2)] * (3 - stage)  # stage s -> s+1 -> ... -> 3
        for i, conv in enumerate(chain):
            assert steps.setdefault(stage + i, conv) is conv  # one module per transition
    assert len(steps) == 2
    per_depth = resnet50_depth(3, 10, width=4, adapters="per-depth")
    assert len({id(a) for a in per_depth.adapters}) == 14


def test_residual_mlp_in_duns_exact_form():
    """DUN's fully connected net: linear input layer (depth 0 is a linear model), blocks
    x + BN(ReLU(W x)), linear output layer; and its no-skip "MLP" variant."""
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    for residual in (True, False):
        net = residual_mlp(5, 2, width=6, depth=3, input_relu=False, residual=residual)
        net.train()
        out = net(x)
        h = net.input_block(x)  # = W_in x + b, no nonlinearity
        assert torch.allclose(h, x @ net.input_block[0].weight.T + net.input_block[0].bias)
        expected = [net.output_block(h)]
        for block in net.blocks:
            body = block.body if residual else block
            h = h + body(h) if residual else body(h)
            expected.append(net.output_block(h))
        assert torch.allclose(out, torch.stack(expected), atol=1e-6)
    depth0 = residual_mlp(5, 2, width=6, depth=1, input_relu=False).truncated(0)
    y1, y2 = depth0(x), depth0(2 * x)  # linear: f(2x) - f(0) = 2 (f(x) - f(0))
    y0 = depth0(torch.zeros(1, 5))
    assert torch.allclose(y2 - y0, 2 * (y1 - y0), atol=1e-5)


def test_marginal_prediction_is_the_q_mixture():
    model, guide = random_pair()
    model.eval()
    x = torch.randn(7, 6)
    pred = predict(model, guide, x)
    per_depth = torch.softmax(model.backbone(x), -1)
    expected = torch.einsum("d,dbc->bc", guide.probs(), per_depth)
    assert torch.allclose(pred.mean, expected.detach(), atol=1e-6)
    assert pred.probs.shape == (4, 7, 4) and (pred.epistemic >= 0).all()
    one = predict(model, guide, x, budget=model.budgets()[2])
    assert torch.allclose(one.mean, per_depth[2].detach(), atol=1e-6)


def test_regression_mixture_moments():
    model, guide = random_pair("regression")
    model.eval()
    x = torch.randn(5, 6)
    from bayesdyn.evaluation import mixture_moments

    mean, var = mixture_moments(*model.regression_mixture(guide, x))
    mean, var = mean.float(), var.float()
    q = guide.probs()[:, None]
    mu = model.backbone(x).squeeze(-1)
    samples_var = (q * (model.log_noise.exp() ** 2 + mu**2)).sum(0) - mean**2
    assert torch.allclose(var, samples_var, atol=1e-5)


def test_pruning_makes_a_smaller_network_with_folded_posterior():
    model, guide = random_pair()
    with torch.no_grad():
        guide.logits.copy_(torch.tensor([0.0, 2.0, 2.01, 1.0]))
    pruned, new_guide = model.prune(guide)
    assert pruned.backbone.max_depth == 1  # q(1) > 0.95 max q
    q, q_new = guide.probs(), new_guide.probs()
    assert torch.allclose(q_new, torch.stack([q[0], q[1:].sum()]), atol=1e-6)
    full, small = measure(model, (6,))[-1], measure(pruned, (6,))[-1]
    assert small.params < full.params and small.flops < full.flops
    assert model.backbone.max_depth == 3  # the original is untouched


def test_pruning_keeps_every_part_of_model_and_posterior(digits):
    """A DUN with a Bayesian output block (AutoNormal weights): the pruned net keeps the trained
    output weights' posterior and predicts as well as before (it fell to chance when pruning
    dropped them); a marginal-likelihood DUN keeps its exact posterior; regression its noise."""
    from bayesdyn.inference import fit, predict

    torch.manual_seed(0)
    model = DepthNet(residual_mlp(64, 10, 32, 3, input_shape=(1, 8, 8)), num_classes=10,
                     input_shape=(1, 8, 8), output_prior_scale=1.0)
    guide = model.default_guide()
    fit(model, guide, digits, epochs=4, batch_size=64, lr=3e-3, device="cpu", progress=False)
    x, y = digits.test.tensors
    accuracy = lambda m, g: float((predict(m, g, x, num_samples=16).mean.argmax(-1) == y)  # noqa: E731
                                  .float().mean())
    before = accuracy(model, guide)
    pruned, new_guide = model.prune(guide, threshold=0.0)  # cut at depth 0: a real change
    assert pruned.output_prior_scale == 1.0 and pruned.backbone.max_depth == 0
    assert torch.equal(new_guide[1]._get_loc_and_scale("output.weight")[0],
                       guide[1]._get_loc_and_scale("output.weight")[0])
    q = model.depth_weights(guide).detach()
    assert torch.allclose(pruned.depth_weights(new_guide), q.sum().reshape(1), atol=1e-6)
    depth0 = accuracy(*model.prune(guide, threshold=0.0))
    assert before > 0.8 and depth0 > 0.5  # untrained output weights would give ~0.1
    pruned_keep, guide_keep = model.prune(guide, threshold=0.999)  # cut at the mode
    assert accuracy(pruned_keep, guide_keep) > before - 0.05

    marginal = DepthNet(residual_mlp(6, 4, 8, 3), num_classes=4, marginal=True)
    marginal.posterior_probs.copy_(torch.tensor([0.1, 0.6, 0.2, 0.1]))
    small, empty = marginal.prune(marginal.default_guide())
    assert small.marginal and torch.allclose(small.posterior_probs, torch.tensor([0.1, 0.9]))
    regression, reg_guide = random_pair("regression")
    assert torch.equal(regression.prune(reg_guide)[0].log_noise, regression.log_noise)


def test_guide_contract():
    model, guide = random_pair()
    with torch.no_grad():
        guide.logits.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]).log_softmax(0))
    assert guide.median()["depth"].item() == 2
    # q ~ [.0066, .0066, .98, .0066]: cdf [.0066, .0132, .9934, 1]
    assert guide.quantiles([0.01, 0.999])["depth"].tolist() == [1, 3]
    trace = pyro.poutine.trace(guide).get_trace(torch.randn(2, 6))
    assert trace.nodes["depth"]["infer"]["enumerate"] == "parallel"


def test_guide_composes_with_pyro_autoguides():
    # a user adds a continuous latent next to the depth: DepthGuide + AutoNormal in one guide
    model, _ = random_pair("regression")

    def extended(x, y=None, dataset_size=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        return model(x, None if y is None else y - shift, dataset_size)

    guide = AutoGuideList(extended)
    guide.append(DepthGuide(pyro.poutine.block(extended, expose=["depth"]),
                            num_depths=model.num_depths))
    guide.append(AutoNormal(pyro.poutine.block(extended, hide=["depth"])))
    x, y = torch.randn(4, 6), torch.randn(4)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(extended, guide, x, y)
    loss.backward()
    assert torch.isfinite(loss) and guide[0].logits.grad.abs().sum() > 0
    assert set(guide.median(x)) == {"depth", "shift"}


def test_bad_backbone_and_likelihood():
    with pytest.raises(TypeError, match="DepthStack"):
        DepthNet(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="likelihood"):
        DepthNet(residual_mlp(3, 3, depth=1), likelihood="poisson")


def test_swapping_in_pyros_discrete_guide_trains_through_traceenum(digits):
    from pyro.infer.autoguide import AutoDiscreteParallel

    from bayesdyn.inference import fit

    torch.manual_seed(0)
    model = DepthNet(residual_mlp(64, 10, width=16, depth=2, input_shape=(1, 8, 8)),
                     num_classes=10, input_shape=(1, 8, 8))
    guide = AutoDiscreteParallel(model)
    history = fit(model, guide, digits, epochs=1, batch_size=128, device="cpu", progress=False)
    assert history.objective == "pyro"  # no fast path for a foreign guide: Pyro's ELBO is used
    q = model.structure_posterior(guide)["depth"]
    assert q.shape == (3,) and abs(q.sum().item() - 1) < 1e-5
    pred = predict(model, guide, digits.test.tensors[0][:10])
    assert torch.allclose(pred.weights.float(), q.float(), atol=1e-5)


def test_marginal_likelihood_variant_matches_pyro_and_bayes_rule(float64):
    from pyro import poutine
    from pyro.infer import Trace_ELBO

    from bayesdyn.guides import EmptyGuide

    model = DepthNet(residual_mlp(6, 4, width=8, depth=3), prior="decaying", num_classes=4,
                     marginal=True)
    guide = model.default_guide()
    assert isinstance(guide, EmptyGuide)
    model.eval()
    x, y = torch.randn(12, 6), torch.randint(0, 4, (12,))
    ref = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x, y)  # -log p(D)
    fast, _ = model.fast_loss(guide, x, y, len(x))
    assert fast.item() == pytest.approx(ref.item(), rel=1e-9)
    post = model.update_posterior(x, y)
    for d in range(model.num_depths):  # p(d | D) = p(d) p(D | d) / p(D), each term from Pyro
        joint = Trace_ELBO().differentiable_loss(poutine.condition(model, {"depth": torch.tensor(d)}),
                                                 guide, x, y)  # -log p(d, D)
        assert post[d].item() == pytest.approx(torch.exp(ref - joint).item(), rel=1e-6)
    assert torch.allclose(predict(model, guide, x).weights, post)


def test_bayesian_output_block_trains_and_predicts_with_weight_uncertainty(digits):
    from bayesdyn.inference import fit

    torch.manual_seed(0)
    model = DepthNet(residual_mlp(64, 10, width=16, depth=2, input_shape=(1, 8, 8)),
                     num_classes=10, input_shape=(1, 8, 8), output_prior_scale=1.0)
    guide = model.default_guide()
    history = fit(model, guide, digits, epochs=2, batch_size=128, lr=1e-2, device="cpu",
                  progress=False)
    assert history.objective == "pyro" and history.epochs[-1]["val_accuracy"] > 0.5
    x = digits.test.tensors[0][:20]
    pred = predict(model, guide, x, num_samples=16)
    assert pred.probs.shape == (16, 20, 10) and (pred.epistemic > 0).all()
    at_two = predict(model, guide, x, budget=model.budgets()[2], num_samples=4)
    assert at_two.probs.shape == (4, 20, 10)
    q = model.structure_posterior(guide)["depth"]
    assert q.shape == (3,) and abs(q.sum().item() - 1) < 1e-5
