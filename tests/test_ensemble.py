"""Structured and deep ensembles: stacked members, the mask stage, importances, pruning,
extraction, the Pyro models and the continual-learning variant."""

import math

import pytest
import torch
import torch.nn.functional as F
from pyro.infer import TraceEnum_ELBO
from torch.utils.data import TensorDataset

from bayesdyn.evaluation import measure
from bayesdyn.guides import EmptyGuide
from bayesdyn.inference import fit
from bayesdyn.inference.continual import ContinualSubnets, run_continual, split_tasks
from bayesdyn.inference.subnets import (
    MaskSearch,
    channel_importance,
    gaussian_mmd,
    official_mmd,
    prune,
    structured_subnetworks,
    total_divergence,
)
from bayesdyn.models import Budget, DeepEnsemble, MemberGuide, StructuredEnsemble
from bayesdyn.nn.members import PlainSpec, StackedNet, extract, member_of, to_sequential

MLP = PlainSpec((1, 4, 4), (6, 5), 3)
CONV = PlainSpec((2, 6, 6), (4, "M", 5), 3, conv=True)


def randomise_batchnorm(net):
    with torch.no_grad():
        for norm in net.norms:
            norm.running_mean.normal_(0, 0.3), norm.running_var.uniform_(0.5, 1.5)
            norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0, 0.3)


def toy_data(n=48, shape=(1, 4, 4), classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# --- stacked members ----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [MLP, CONV], ids=["mlp", "conv"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_one_vectorised_forward_equals_separate_forwards(spec, train):
    torch.manual_seed(0)
    net = StackedNet(spec, 3)
    randomise_batchnorm(net)
    net.train(train)
    shared, own = torch.randn(7, *spec.input_shape), torch.randn(3, 7, *spec.input_shape)
    out_shared, out_own = net(shared), net(own)
    assert out_shared.shape == (3, 7, 3)
    for m in range(3):
        alone = to_sequential(net, m).train(train)  # plain torch layers, the same weights
        assert torch.allclose(out_shared[m], alone(shared), atol=1e-5)
        assert torch.allclose(out_own[m], alone(own[m]), atol=1e-5)
    assert torch.allclose(net(shared, members=2), out_shared[:2], atol=1e-6)
    # gradients of member 1 equal those of its own network
    net.zero_grad()
    net(shared)[1].pow(2).sum().backward()
    alone = to_sequential(net, 1).train(train)
    alone(shared).pow(2).sum().backward()
    assert torch.allclose(net.weights[0].grad[1], alone[1 if not spec.conv else 0].weight.grad,
                          atol=1e-5)
    assert net.weights[0].grad[0].abs().max() == 0


def test_deep_ensemble_vmap_equals_separate_networks():
    torch.manual_seed(0)
    nets = [to_sequential(StackedNet(MLP, 1)) for _ in range(3)]
    ens = DeepEnsemble(nets)
    x = torch.randn(9, *MLP.input_shape)
    ens.train()
    logits = ens.member_logits(x)
    for m, net in enumerate(nets):
        assert torch.allclose(logits[m], net.train()(x), atol=1e-5)
        # each member's BatchNorm running statistics moved as its own network's did
        assert torch.allclose(ens.buffer__2__running_mean[m], net[2].running_mean, atol=1e-6)
    ens.eval()
    assert torch.allclose(ens.member_logits(x, 2)[1], nets[1].eval()(x), atol=1e-5)
    stacked = StackedNet(MLP, 3).eval()  # the batched-matmul engine, the same interface
    fast = DeepEnsemble(stacked)
    assert torch.allclose(fast.member_logits(x, 2), stacked(x)[:2])
    assert sum(p.numel() for p in fast.budget_module(Budget("1", 1)).parameters()) == \
        sum(p.numel() for p in to_sequential(stacked, 0).parameters())


# --- mask stage -----------------------------------------------------------------------------------
def test_divergences_on_hand_computed_examples():
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 3.0])
    # official: k(u, v)_i = exp(-mean_j (u_i - v_j)^2 / 2); k(a,a) = e^-.25 (both entries),
    # k(b,b) = e^-1, k(a,b) = (e^-2.5 + e^-1) / 2, k(b,a) = (e^-.25 + e^-3.25) / 2
    e = math.exp
    assert official_mmd(a, b).item() == pytest.approx(e(-.25) + e(-1) - (e(-2.5) + e(-1)), 1e-6)
    assert official_mmd(b, a).item() == pytest.approx(e(-.25) + e(-1) - (e(-.25) + e(-3.25)),
                                                      1e-6)
    # Gaussian kernel, bandwidth 1: k = exp(-d^2 / 2) averaged over the 4 pairs
    kaa, kbb = (2 + 2 * e(-.5)) / 4, (2 + 2 * e(-2)) / 4
    kab = (e(-.5) + e(-4.5) + 1 + e(-2)) / 4
    assert gaussian_mmd(a, b).item() == pytest.approx(kaa + kbb - 2 * kab, 1e-6)
    assert gaussian_mmd(b, a).item() == pytest.approx(gaussian_mmd(a, b).item(), 1e-7)
    # the total sums pairs m < m' over units
    s = [torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 2.0]]), torch.tensor([[0.5], [1.0], [0.0]])]
    expected = sum(gaussian_mmd(u[i], u[j]) for u in s for i in range(3) for j in range(i + 1, 3))
    assert torch.allclose(total_divergence(s), expected)
    assert torch.allclose(total_divergence(s, "official"),
                          sum(official_mmd(u[i], u[j]) for u in s for i in range(3)
                              for j in range(i + 1, 3)))


def test_mask_stage_loss_is_chunked_cross_entropy_plus_inverse_divergence():
    torch.manual_seed(0)
    search = MaskSearch(StackedNet(MLP, 1), 2, divergence_weight=0.5)
    x, y = toy_data(9)
    loss, terms = search.fast_loss(search.default_guide(), x, y, 100)
    s = search.scales()
    expected_nll = sum(F.cross_entropy(search.net(x[4 * m: 4 * m + 4], s, members=2)[m],
                                       y[4 * m: 4 * m + 4], reduction="sum")
                       for m in range(2)) * 100 / 8  # row 9 left over
    expected_penalty = 0.5 * 100 / (total_divergence(s) + 1e-12)
    assert torch.allclose(terms["nll"], expected_nll, rtol=1e-5)
    assert torch.allclose(loss, expected_nll + expected_penalty, rtol=1e-5)
    # Pyro's ELBO on the model agrees
    elbo = search.reference_loss()(search, EmptyGuide(search))
    assert torch.allclose(elbo(x, y, dataset_size=100), loss, rtol=1e-5)


def test_importances_equal_autograd_on_a_toy():
    """One unit, no BatchNorm: dL/ds_{m,c} written out by hand, L = CE(y, mean_m logits_m)."""
    torch.manual_seed(0)
    spec = PlainSpec((3,), (4,), 2, batch_norm=False)
    search = MaskSearch(StackedNet(spec, 1), 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    importances = channel_importance(search, x, y, batch_size=5)[0]
    W, b = search.net.weights[0][0], search.net.biases[0][0]
    V = search.net.classifier_weight[0]
    s = search.loc[0].detach()
    expected = torch.zeros(2, 4)
    for xb, yb in ((x[:5], y[:5]), (x[5:], y[5:])):
        z = xb @ W.T + b  # [B, C]
        logits = [torch.relu(z * s[m]) @ V.T + search.net.classifier_bias[0] for m in range(2)]
        p = torch.softmax((logits[0] + logits[1]) / 2, -1)
        dlogit = (p - F.one_hot(yb, 2)) / len(yb) / 2  # dL/dlogits_m
        for m in range(2):
            grad = ((dlogit @ V) * (z * s[m] > 0) * z).sum(0)
            expected[m] += grad.abs() / 2
    assert torch.allclose(importances, expected, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "local"])
@pytest.mark.parametrize("q", [0.3, 0.5, 0.8])
def test_pruned_fraction_is_q_within_one_channel_per_layer(scope, q):
    g = torch.Generator().manual_seed(1)
    widths = (10, 7, 33)
    importances = [torch.rand(w, generator=g) * (10 if i == 1 else 1) for i, w in enumerate(widths)]
    kept = prune(importances, q, scope)
    assert all(len(k) >= 1 for k in kept)
    pruned = [w - len(k) for w, k in zip(widths, kept, strict=True)]
    if scope == "local":
        assert all(abs(p - q * w) <= 1 for p, w in zip(pruned, widths, strict=True))
    else:
        assert abs(sum(pruned) - q * sum(widths)) <= len(widths)
        # global pruning keeps the most important channels overall
        flat = torch.cat(importances)
        threshold = flat.sort().values[round(q * len(flat))]
        for imp, k in zip(importances, kept, strict=True):
            assert (imp[k] >= threshold).all() or len(k) == 1
    with pytest.raises(ValueError, match="q must be in"):
        prune(importances, 1.0)


@pytest.mark.parametrize("spec", [MLP, CONV], ids=["mlp", "conv"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_extracted_member_equals_the_masked_network(spec, train):
    torch.manual_seed(0)
    net = StackedNet(spec, 2)
    randomise_batchnorm(net)
    kept = [torch.tensor([0, 2, 3]), torch.tensor([1, 4])]
    masks = [torch.zeros(2, w) for w in spec.widths]
    for mask, k in zip(masks, kept, strict=True):
        mask[1, k] = 1.0
    x = torch.randn(6, *spec.input_shape)
    small = extract(net, kept, member=1).train(train)
    net.train(train)
    assert small.spec.widths == (3, 2)
    assert torch.allclose(small(x)[0], net(x, masks)[1], atol=1e-5)
    full = sum(p[1].numel() for p in net.parameters())
    assert sum(p.numel() for p in small.parameters()) < full


# --- the families -----------------------------------------------------------------------------
def small_ensemble(scope="global", members=3):
    torch.manual_seed(0)
    x, y = toy_data(60)
    nets, report = structured_subnetworks(StackedNet(MLP, 1), x, y, members=members, q=0.5,
                                          scope=scope, mask_epochs=1, batch_size=30)
    return StructuredEnsemble(nets), report, (x, y)


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (Pyro's deterministic sites make their
    zero log-densities in the default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_structured_ensemble_fast_loss_equals_trace_enum_elbo(float64_default):
    ens, _, (x, y) = small_ensemble()  # float64: the comparison is about the maths, not rounding
    guide = MemberGuide(ens)
    fast, _ = ens.fast_loss(guide, x, y, 200)
    ref = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(ens, guide, x, y, 200)
    assert torch.allclose(fast, ref, rtol=1e-10)
    grads = torch.autograd.grad(fast, list(ens.parameters()))
    ref_grads = torch.autograd.grad(TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        ens, guide, x, y, 200), list(ens.parameters()))
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_structured_ensemble_budgets_and_predictive():
    ens, report, (x, y) = small_ensemble()
    assert len(report["kept"]) == 3
    ens.eval()
    budgets = measure(ens, MLP.input_shape)
    assert [b.setting for b in budgets] == [1, 2, 3]
    member_params = ens.member_parameters()
    assert [b.params for b in budgets] == [sum(member_params[:k]) for k in (1, 2, 3)]
    member_flops = [measure(StructuredEnsemble([member_of(g, j)]), MLP.input_shape)[0].flops
                    for g in ens.groups for j in range(g.members)]
    assert [b.flops for b in budgets] == [sum(member_flops[:k]) for k in (1, 2, 3)]
    pred = ens.predict_probs(ens.default_guide(), x[:5])
    logits = ens.member_logits(x[:5])
    assert torch.allclose(pred.mean(), torch.softmax(logits, -1).mean(0), atol=1e-6)
    ens.combine = "logits"
    assert torch.allclose(ens.predict_probs(None, x[:5]).mean(), torch.softmax(logits.mean(0), -1),
                          atol=1e-6)


def test_local_pruning_gives_one_vectorised_group_and_a_checkpoint_rebuilds():
    ens, _, (x, y) = small_ensemble(scope="local")
    assert len(ens.groups) == 1 and ens.groups[0].members == 3
    glob, _, _ = small_ensemble(scope="global")
    state = glob.state_dict()
    ens.load_state_dict(state)  # the widths follow the checkpoint
    ens.eval(), glob.eval()
    assert torch.allclose(ens.member_logits(x), glob.member_logits(x))


def test_joint_training_keeps_a_copy_of_the_best_weights(tmp_path):
    ens, _, (x, y) = small_ensemble()
    xv, yv = toy_data(30, seed=1)
    history = fit(ens, ens.default_guide(), (x, y), val=(xv, yv), epochs=4, batch_size=20,
                  lr=0.05, early_stopping=1, progress=False)
    assert "val_accuracy_member3" in history.epochs[-1]
    best = min(history.epochs, key=lambda e: e["val_nll"])
    assert best["epoch"] < history.epochs[-1]["epoch"]  # the last weights are not the best
    from bayesdyn.inference import predict

    nll = -predict(ens, ens.default_guide(), xv).mean.gather(1, yv[:, None]).log().mean()
    assert float(nll) == pytest.approx(best["val_nll"], rel=1e-5)


# --- continual learning -----------------------------------------------------------------------
def test_continual_frozen_channels_do_not_move():
    torch.manual_seed(0)
    spec = PlainSpec((1, 4, 4), (8, 6), 2, batch_norm=False)
    x, y = toy_data(80, classes=4)
    data = type("D", (), {})()
    data.num_classes = 4
    for name in ("train", "val", "test"):
        setattr(data, name, TensorDataset(x, y))
    tasks = split_tasks(data, 2)
    assert len(tasks) == 2 and int(tasks[1]["train"].tensors[1].max()) == 1
    net = ContinualSubnets(spec, 2, 2)
    from bayesdyn.inference.continual import _claim_channels, _train

    _claim_channels(net, 0, tasks[0]["train"], 0.5, 1, 0, {})
    _train(net, 0, tasks[0], {"epochs": 2, "batch_size": 16})
    owners = [o.clone() for o in net.owners()]
    before = [w.detach().clone() for w in net.backbone.weights]
    out_before = net(x, 0).detach()
    _claim_channels(net, 1, tasks[1]["train"], 0.5, 1, 0, {})
    hooks = net.freeze_hooks(1)
    _train(net, 1, tasks[1], {"epochs": 2, "batch_size": 16, "lr": 0.05})
    for h in hooks:
        h.remove()
    for unit, (w, old, owner) in enumerate(zip(net.backbone.weights, before, owners,
                                               strict=True)):
        frozen = owner == 0
        assert torch.equal(w[0][frozen], old[0][frozen]), unit
        assert not torch.equal(w[0][net.owners()[unit] == 1], old[0][net.owners()[unit] == 1])
    assert torch.equal(net(x, 0), out_before)  # task 0 is not forgotten


def test_continual_runs_and_reports(tmp_path):
    torch.manual_seed(0)
    spec = PlainSpec((1, 4, 4), (8,), 2, batch_norm=False)
    x, y = toy_data(60, classes=4)
    data = type("D", (), {})()
    data.num_classes = 4
    for name in ("train", "val", "test"):
        setattr(data, name, TensorDataset(x, y))
    out = run_continual(split_tasks(data), spec, "subnets", epochs=1, mask_epochs=1)
    assert out["backward_transfer"] == 0.0
    assert len(out["accuracy_matrix"]) == 2 and out["parameters"][1] > out["parameters"][0]
    sep = run_continual(split_tasks(data), spec, "separate", epochs=1)
    assert sep["parameters"][1] == 2 * sep["parameters"][0]
    with pytest.raises(ValueError, match="method must be"):
        run_continual(split_tasks(data), spec, "bogus")


def test_cli_run_resumes_with_the_found_structure_and_evaluates(tmp_path):
    from bayesdyn.cli import main
    from bayesdyn.runs import evaluate_run, load_run

    out = tmp_path / "se"
    common = ["train", "structured-ensemble", "--dataset", "digits", "--batch-size", "128",
              "--depth", "2", "--width", "16", "--mask-epochs", "1", "--ood", "none",
              "--no-progress", "--device", "cpu", "--out", str(out)]
    assert main([*common, "--epochs", "1"]) == 0
    first = load_run(out).model.structure.clone()
    assert main([*common, "--epochs", "2", "--resume"]) == 0
    run = load_run(out)
    assert torch.equal(run.model.structure, first) and len(run.history) == 2
    metrics = evaluate_run(out, device="cpu")
    assert [b["params"] for b in metrics["budgets"]][-1] == sum(run.model.member_parameters())
    assert metrics["budgets"][-1]["params"] < 3 * (64 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10)


def test_fit_runs_the_mask_stage_and_a_resumed_fit_trains_the_found_structure(tmp_path):
    """``fit`` on a freshly built structured ensemble finds the members first (not the unpruned
    network); resuming rebuilds them from the checkpoint before the optimiser is made."""
    from bayesdyn import recipes

    x, y = toy_data(64, shape=(1, 8, 8), classes=10)
    recipe = recipes.Recipe("structured-ensemble", depth=2, width=16, mask_epochs=1)

    def build():
        torch.manual_seed(0)
        return recipes.build(recipe, (1, 8, 8), 10)

    model, guide = build()
    unpruned = sum(p.numel() for p in model.parameters())
    fit(model, guide, (x, y), epochs=1, batch_size=32, out=tmp_path, progress=False)
    found = model.structure.clone()
    after_one = {k: v.clone() for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) < unpruned
    resumed, guide = build()
    fit(resumed, guide, (x, y), epochs=2, batch_size=32, out=tmp_path, resume=True, progress=False)
    assert torch.equal(resumed.structure, found)
    moved = [not torch.equal(v, after_one[k]) for k, v in resumed.state_dict().items()
             if k.endswith("weight") and v.dtype.is_floating_point]
    assert any(moved)  # the optimiser holds the rebuilt members' parameters


def test_reparameterised_masks_and_reinitialised_extraction():
    torch.manual_seed(0)
    x, y = toy_data(40)
    search = MaskSearch(StackedNet(MLP, 1), 2, parametrisation="normal")
    a, b = search.scales(), search.scales()
    assert not torch.equal(a[0], b[0])  # s = mu + sigma eps, a new eps per call
    assert all(torch.equal(s, mu) for s, mu in zip(search.scales(sample=False), search.loc,
                                                   strict=True))
    loss, _ = search.fast_loss(search.default_guide(), x, y, 40)
    loss.backward()
    assert search.log_scale[0].grad.abs().sum() > 0  # sigma is trained through the samples
    assert search.net.weights[0].grad is None  # W0 stays frozen
    base = StackedNet(MLP, 1)
    copied, report = structured_subnetworks(base, x, y, members=2, mask_epochs=0, q=0.5)
    expected = base.weights[0][0][report["kept"][0][0]]
    assert torch.equal(copied[0].weights[0][0], expected)
    fresh, report = structured_subnetworks(base, x, y, members=2, mask_epochs=0, q=0.5,
                                           reinit=True)
    assert not torch.equal(fresh[0].weights[0][0], base.weights[0][0][report["kept"][0][0]])
    with pytest.raises(ValueError, match="parametrisation"):
        MaskSearch(base, 2, parametrisation="beta")


def test_importances_use_batch_statistics_not_the_running_ones():
    """The official code ran the importance pass with freshly reset running statistics in eval
    mode (methods.md §5.7 bug 4); here BatchNorm normalises with each batch's statistics, so the
    running averages (and the module's mode) do not matter and are left untouched."""
    torch.manual_seed(0)
    search = MaskSearch(StackedNet(MLP, 1), 2)
    x, y = toy_data(40)
    first = channel_importance(search, x, y, batch_size=20)
    with torch.no_grad():
        for norm in search.net.norms:
            norm.running_mean.normal_(0, 3), norm.running_var.uniform_(0.1, 5)
    search.net.eval()
    running = search.net.norms[0].running_mean.clone()
    again = channel_importance(search, x, y, batch_size=20)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first, again, strict=True))
    assert torch.equal(search.net.norms[0].running_mean, running) and not search.net.training


@pytest.mark.parametrize("make", [
    lambda: StructuredEnsemble([StackedNet(MLP, 1), StackedNet(MLP.with_widths((3, 2)), 1)]),
    lambda: DeepEnsemble(StackedNet(MLP, 3)),
    lambda: DeepEnsemble(to_sequential(StackedNet(MLP, 1)), members=2),
], ids=["structured", "deep-stacked", "deep-vmap"])
def test_pyro_svi_trains_every_parameter_and_predictive_draws_members(make):
    import pyro
    from pyro.infer import SVI, Predictive

    torch.manual_seed(0)
    ens = make()
    guide = ens.default_guide()
    x, y = toy_data(12)
    before = {n: p.detach().clone() for n, p in ens.named_parameters()}
    svi = SVI(ens, guide, pyro.optim.Adam({"lr": 0.01}), TraceEnum_ELBO(max_plate_nesting=1))
    svi.step(x, y)
    assert all(not torch.equal(p, before[n]) for n, p in ens.named_parameters())
    out = Predictive(ens, guide=guide, num_samples=4, return_sites=["member", "probs"])(x)
    assert out["probs"].shape == (4, 12, 3) and out["member"].max() < ens.num_members


def test_per_member_validation_is_the_mean_over_the_whole_set_in_chunks():
    """fit evaluates members chunk by chunk (2048 inputs); the recorded means equal one pass."""
    ens, _, (x, y) = small_ensemble()
    xv, yv = toy_data(3000, seed=2)  # more than one chunk, the last one partial
    history = fit(ens, ens.default_guide(), (x, y), val=(xv, yv), epochs=1, batch_size=20,
                  progress=False)
    ens.eval()
    with torch.no_grad():
        whole = ens.member_validation(ens.default_guide(), xv, yv)
    for key, value in whole.items():
        assert history.epochs[-1][key] == pytest.approx(value, rel=1e-5)
