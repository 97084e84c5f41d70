"""Multi-exit backbones and the two exit families (MultiExitNet, BoostedExits)."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from bayesdyn.evaluation import measure
from bayesdyn.guides import EmptyGuide
from bayesdyn.models import BoostedExits, MultiExitNet
from bayesdyn.nn import (
    MSDNET_CIFAR,
    ExitHead,
    MultiExitStack,
    gradient_equilibrium,
    msdnet,
    multiexit_mlp,
    multiexit_resnet,
)


def tiny_msdnet(**kw):
    return msdnet(1, 5, num_blocks=3, step=1, base=1, step_mode="lin_grow", channels=4,
                  growth_rate=2, head_channels=8, **kw)


def linear_heads_stack(in_features=6, classes=4, exits=3):
    """Identity blocks, exit k = a random linear map of the input: the logits are plain
    ``x @ W_k.T + b_k``, so references can be written by hand."""
    heads = [ExitHead(nn.Identity(), nn.Linear(in_features, classes)) for _ in range(exits)]
    return MultiExitStack(nn.Identity(), [nn.Identity() for _ in range(exits)], heads, input_ndim=1)


# --- backbones --------------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape", [
    (lambda: tiny_msdnet(), (1, 28, 28)),
    (lambda: msdnet(3, 5, **{**MSDNET_CIFAR["small"], "channels": 4, "growth_rate": 2,
                             "head_channels": 8}), (3, 32, 32)),
    (lambda: msdnet(1, 5, num_blocks=3, step=1, base=2, channels=4, growth_rate=2, prune="min",
                    head_channels=8), (1, 28, 28)),
    (lambda: multiexit_resnet(3, 5, stages=(1, 2), widths=(4, 8), exits_after=[1, 2]), (3, 16, 16)),
    (lambda: multiexit_mlp(12, 5, width=8, exits=3, input_shape=(1, 3, 4)), (1, 3, 4)),
])
def test_one_pass_gives_every_exit_equal_to_its_truncated_network(make, shape):
    net = make()
    with torch.no_grad():  # random BatchNorm statistics, so eval mode is not an identity
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    net.eval()
    x = torch.randn(5, *shape)
    out = net(x)
    assert out.logits.shape == (net.num_exits, 5, 5)
    for k in range(net.num_exits):
        alone = net.truncated(k)(x)
        assert torch.allclose(out.logits[k], alone, atol=1e-5)
        assert torch.allclose(net.heads[k].linear(out.features[k]), alone, atol=1e-5)
        assert torch.allclose(net(x, until=k).logits[k], alone, atol=1e-5)
    lead = net(x.expand(2, *x.shape))  # a leading sample dim broadcasts
    assert lead.logits.shape == (net.num_exits, 2, 5, 5)
    assert torch.allclose(lead.logits[:, 1], out.logits, atol=1e-5)
    assert lead.features[0].shape[:2] == (2, 5)


def test_msdnet_cost_matches_boostnet_op_counts():
    """BoostNet's CIFAR-100 anytime MSDNet (methods.md §3.6, read off a figure to about 1 %):
    cumulative Mul-Adds per exit 15.3 ... 121.7 M. Their op counter adds ReLU and pooling
    elements and linear biases to the conv and linear multiply-adds; counted the same way, ours
    is within 1.5 % at every exit."""
    from torch.utils.flop_counter import FlopCounterMode

    paper = [15.3, 25.6, 37.9, 52.2, 62.3, 74.2, 87.8, 100.1, 110.2, 121.7]
    net = msdnet(3, 100).eval()
    counter, elementwise, cumulative = FlopCounterMode(display=False), [0], []

    def count(module, inputs, output):
        elementwise[0] += inputs[0].numel()
        if isinstance(module, nn.Linear):  # the end of an exit: the cost so far is its cost
            elementwise[0] += module.out_features
            cumulative.append((counter.get_total_flops() / 2 + elementwise[0]) / 1e6)

    for m in net.modules():
        if isinstance(m, (nn.ReLU, nn.AdaptiveAvgPool2d, nn.Linear)):
            m.register_forward_hook(count)
    with counter, torch.no_grad():
        net(torch.zeros(1, 3, 32, 32))
    assert len(cumulative) == len(paper)
    for ours, ref in zip(cumulative, paper, strict=True):
        assert abs(ours - ref) < 0.015 * ref


def test_backbone_arguments_are_checked():
    with pytest.raises(ValueError, match="growth_rate must be even"):
        msdnet(1, 10, growth_rate=5)
    with pytest.raises(ValueError, match="step_mode"):
        msdnet(1, 10, step_mode="linear")
    with pytest.raises(ValueError, match="bn_factor"):
        msdnet(1, 10, bn_factor=(1, 2))
    with pytest.raises(ValueError, match="exits_after"):
        multiexit_resnet(3, 10, stages=(1, 1), widths=(4, 8), exits_after=[0])
    with pytest.raises(TypeError, match="nn.Linear"):
        ExitHead(nn.Identity(), nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="exit index"):
        multiexit_mlp(4, 3, exits=2).truncated(2)


# --- gradient equilibrium ---------------------------------------------------------------------
@pytest.mark.parametrize("block, num_blocks", [(0, 3), (1, 3), (2, 3), (0, 5)])
def test_gradient_equilibrium_is_identity_with_the_rescaled_gradient(block, num_blocks, float64):
    """Toy graph h -> (head branch, later branch): the gradient at h must be
    (g_head + (N - i - 1) g_later) / (N - i), with g_head and g_later by finite differences."""
    g = torch.Generator().manual_seed(block)
    w_head, w_later = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    head = lambda h: torch.tanh(w_head @ h).sum()  # noqa: E731
    later = lambda h: torch.sin(w_later @ h).pow(2).sum()  # noqa: E731
    h = torch.randn(3, generator=g, requires_grad=True)
    to_head, to_later = gradient_equilibrium(h, block, num_blocks)
    assert torch.equal(to_head, h) and torch.equal(to_later, h)
    (grad,) = torch.autograd.grad(head(to_head) + later(to_later), h)

    def finite_difference(fn, eps=1e-6):
        out = torch.zeros(3)
        for j in range(3):
            e = torch.zeros(3)
            e[j] = eps
            out[j] = (fn(h.detach() + e) - fn(h.detach() - e)) / (2 * eps)
        return out

    remaining = num_blocks - block
    expected = (finite_difference(head) + (remaining - 1) * finite_difference(later)) / remaining
    assert torch.allclose(grad, expected, atol=1e-8)


def test_gradient_equilibrium_switch_changes_gradients_not_outputs():
    torch.manual_seed(0)
    net = multiexit_mlp(6, 3, width=8, exits=3)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def run(ge):
        net.gradient_equilibrium = ge
        net.zero_grad()
        out = net(x).logits
        F.cross_entropy(out.flatten(0, 1), y.repeat(3)).backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    (out_off, grads_off), (out_on, grads_on) = run(False), run(True)
    assert torch.equal(out_off, out_on)
    same = [torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_off, grads_on, strict=True)]
    names = [n for n, _ in net.named_parameters()]
    # heads and the last block (scale 1 / (N - (N - 1)) = 1) are untouched; earlier blocks not
    assert all(s for n, s in zip(names, same, strict=True) if n.startswith(("heads", "blocks.2")))
    assert not any(s for n, s in zip(names, same, strict=True) if n == "blocks.0.0.weight")


# --- the families -----------------------------------------------------------------------------
def families(backbone_fn):
    """Both families (classes read off the heads), with per-exit gammas and without the
    stop-gradient too."""
    yield MultiExitNet(backbone_fn())
    yield BoostedExits(backbone_fn(), gamma=[0.3, 0.7])
    yield BoostedExits(backbone_fn(), stop_gradient=False)


def boostnet_reference(f, y, gamma, scale):
    """BoostNet's loss written out: E_1 = 0, E_{k+1} = gamma_{k+1} (f_k + E_k),
    sum_k CE(y, f_k + E_k) with a hand-written log-softmax, times N / B."""
    total, history = 0.0, torch.zeros_like(f[0])
    for k in range(f.shape[0]):
        logits = f[k] + history
        log_softmax = logits - logits.exp().sum(-1, keepdim=True).log()
        total = total - log_softmax[torch.arange(len(y)), y].sum()
        if k + 1 < f.shape[0]:
            history = gamma[k] * logits
    return total * scale


def test_boostnet_loss_equals_the_hand_computed_reference(float64):
    torch.manual_seed(0)
    stack = linear_heads_stack()
    model = BoostedExits(stack, 4, gamma=[0.3, 0.8])
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    f = torch.stack([x @ h.linear.weight.T + h.linear.bias for h in stack.heads])  # random logits
    loss, terms = model.fast_loss(EmptyGuide(model), x, y, 70)
    expected = boostnet_reference(f.detach(), y, [0.3, 0.8], 10.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert sum(terms.values()).item() == pytest.approx(loss.item(), rel=1e-12)
    # the predictions are F_k = f_k + gamma_k F_{k-1}
    F_ = model.exit_logits(x).detach()
    assert torch.allclose(F_[2], f[2] + 0.8 * (f[1] + 0.3 * f[0]).detach())
    plain, _ = MultiExitNet(stack, 4).fast_loss(EmptyGuide(model), x, y, 70)
    assert plain.item() == pytest.approx(boostnet_reference(f.detach(), y, [0.0, 0.0], 10.0).item())


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_blocks_the_history(stop_gradient):
    """Exit k's loss reaches heads < k only through the history F_{k-1}: not at all with the
    stop-gradient, and it does without it. The backbone is trained by exit k either way."""
    torch.manual_seed(0)
    model = BoostedExits(multiexit_mlp(6, 4, width=8, exits=3), 4, stop_gradient=stop_gradient)
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    last = F.cross_entropy(model.exit_logits(x)[2], y)
    heads = [model.backbone.heads[k].linear.weight for k in range(3)]
    grads = torch.autograd.grad(last, [*heads, model.backbone.blocks[0][0].weight],
                                allow_unused=True)
    for g in grads[:2]:
        zero = g is None or torch.count_nonzero(g) == 0
        assert zero == stop_gradient
    assert torch.count_nonzero(grads[2]) > 0 and torch.count_nonzero(grads[3]) > 0


@pytest.mark.parametrize("ge", [False, True])
def test_fast_loss_equals_trace_elbo_value_and_gradient(ge, float64):
    for model in families(lambda: tiny_msdnet(gradient_equilibrium=ge).double()):
        model.train()  # BatchNorm with batch statistics, the same in both evaluations
        guide = EmptyGuide(model)
        x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 4, (6,))
        params = [p for p in model.parameters() if p.requires_grad]
        ref = Trace_ELBO().differentiable_loss(model, guide, x, y, 60)
        fast, terms = model.fast_loss(guide, x, y, 60)
        assert fast.item() == pytest.approx(ref.item(), rel=1e-10)
        assert len(terms) == model.num_exits
        for g_fast, g_ref in zip(torch.autograd.grad(fast, params),
                                 torch.autograd.grad(ref, params), strict=True):
            assert torch.allclose(g_fast, g_ref, rtol=1e-8, atol=1e-10)


def test_every_exit_is_an_observed_site():
    model = BoostedExits(multiexit_mlp(6, 4, width=8, exits=3), 4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    trace = pyro.poutine.trace(model).get_trace(x, y)
    observed = [n for n, s in trace.nodes.items() if s["type"] == "sample" and s["is_observed"]
                and not s["infer"].get("_deterministic")]
    assert observed == ["y_exit1", "y_exit2", "y"]
    logits = model.exit_logits(x)
    for k, name in enumerate(observed):
        assert torch.allclose(trace.nodes[name]["fn"].logits, torch.log_softmax(logits[k], -1))
    assert trace.nodes["probs"]["value"].shape == (5, 4)


@pytest.mark.parametrize("family", [MultiExitNet, BoostedExits])
def test_plain_pyro_svi_trains_every_parameter(family):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = family(multiexit_resnet(1, 4, stages=(1, 1), widths=(4, 4)), 4,
                   input_shape=(1, 8, 8))
    guide = EmptyGuide(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    for _ in range(2):
        svi.step(x, y)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


def test_budgets_cost_and_prediction():
    torch.manual_seed(0)
    model = BoostedExits(multiexit_mlp(16, 3, width=8, exits=3), 3, input_shape=(16,))
    budgets = measure(model, (16,))
    assert [b.name for b in budgets] == ["exit 1", "exit 2", "exit 3"]
    first = 2 * 16 * 8
    block, head = 2 * 8 * 8, 2 * 8 * 3
    # exit k runs blocks and heads 1..k; a deeper exit reuses all of it (head_module is empty)
    assert [b.flops for b in budgets] == [first + head, first + block + 2 * head,
                                          first + 2 * block + 3 * head]
    assert [b.info["cumulative_flops"] for b in budgets] == [b.flops for b in budgets]
    assert budgets[0].params == 16 * 8 + 8 + 2 * 8 + 8 * 3 + 3  # block 1 (linear + BN), head 1
    model.eval()
    x = torch.randn(5, 16)
    for k, b in enumerate(budgets):
        probs = model.predict_probs(EmptyGuide(model), x, b).probs
        assert probs.shape == (1, 5, 3)
        assert torch.allclose(probs[0], torch.softmax(model.exit_logits(x)[k], -1))
    marginal = model.predict_probs(EmptyGuide(model), x).probs
    assert torch.equal(marginal, model.predict_probs(EmptyGuide(model), x, budgets[-1]).probs)
    y = torch.randint(0, 3, (5,))  # the marginal is one component, for an exact LOO
    log_w, loglik = model.component_log_likelihood(EmptyGuide(model), x, y)
    assert log_w.tolist() == [0.0]
    assert torch.allclose(loglik[0], marginal[0, torch.arange(5), y].log(), atol=1e-6)
    with pytest.raises(ValueError, match="budget must be one of"):
        model.predict_probs(EmptyGuide(model), x, 3)


def test_family_arguments_are_checked():
    stack = multiexit_mlp(6, 4, width=8, exits=3)
    with pytest.raises(ValueError, match="gamma must be a float or 2 values"):
        BoostedExits(stack, 4, gamma=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="finite and >= 0"):
        BoostedExits(stack, 4, gamma=-1.0)
    with pytest.raises(TypeError, match="MultiExitStack"):
        MultiExitNet(nn.Linear(3, 3), 4)
    with pytest.raises(ValueError, match="head of exit 1 has 4 outputs but 10"):
        MultiExitNet(stack, 10)
    assert MultiExitNet(stack).num_classes == 4  # read off the heads
    assert torch.allclose(BoostedExits(stack, 4).gamma, torch.tensor([0.5, 0.5]))
    assert math.isclose(BoostedExits(stack, 4, gamma=[0.2, 0.4]).gamma[1].item(), 0.4, rel_tol=1e-6)


# --- recipes and the command line -------------------------------------------------------------
def test_recipes_build_every_exit_backbone():
    from bayesdyn.recipes import Recipe, build

    cases = [(Recipe("exits"), (1, 8, 8), "Linear"),
             (Recipe("boosted-exits", arch="msdnet", exits=3), (1, 28, 28), "Stem"),
             (Recipe("exits", arch="resnet", width=4, depth=2, exits=3), (3, 32, 32), "Sequential")]
    for recipe, shape, stem in cases:
        model, guide = build(recipe, shape, 10)
        assert isinstance(guide, EmptyGuide) and model.num_exits == recipe.exits
        assert type(model.backbone.stem).__name__ in (stem, "Flatten")
        ge = model.backbone.gradient_equilibrium
        assert ge == (recipe.method == "boosted-exits")  # BoostNet's msdnet_ge; MSDNet's plain
        assert model(torch.randn(2, *shape)).shape == (2,)
    model, _ = build(Recipe("boosted-exits", gamma=0.25, stop_gradient=False,
                            gradient_equilibrium=False), (1, 8, 8), 10)
    assert model.gamma.tolist() == [0.25] * 3 and not model.stop_gradient
    assert not model.backbone.gradient_equilibrium


def test_recipe_errors_name_the_fix():
    from bayesdyn.recipes import Recipe

    with pytest.raises(ValueError, match="boosted-exits options"):
        Recipe("exits", gamma=0.3)
    with pytest.raises(ValueError, match="multi-exit backbone"):
        Recipe("depth", arch="msdnet")
    with pytest.raises(ValueError, match="has no exits"):
        Recipe("exits", arch="conv")
    with pytest.raises(ValueError, match="invalid exits=0"):
        Recipe("boosted-exits", exits=0)


def test_cli_trains_boosted_exits_with_every_switch(tmp_path, capsys):
    import json

    from bayesdyn.cli import main
    from bayesdyn.runs import evaluate_run

    out = tmp_path / "run"
    assert main(["train", "boosted-exits", "--dataset", "digits", "--epochs", "1", "--exits", "3",
                 "--gamma", "0.3", "--no-gradient-equilibrium", "--no-stop-gradient",
                 "--ood", "none", "--out", str(out), "--no-progress"]) == 0
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert (recipe["exits"], recipe["gamma"], recipe["gradient_equilibrium"],
            recipe["stop_gradient"]) == (3, 0.3, False, False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [b["budget"] for b in metrics["budgets"]] == ["exit 1", "exit 2", "exit 3"]
    assert len(metrics["budgeted_batch"]) == 39
    assert "exit 3" in capsys.readouterr().out
    again = evaluate_run(out)  # rebuilt from config.json and the checkpoint
    assert again["budgets"] == metrics["budgets"]
