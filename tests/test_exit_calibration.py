"""Calibrated exits: Laplace on every exit head of a trained multi-exit net, temperatures, MIE,
the Pyro model with latent head weights (Laplace as a guide, the variational guide's fast path)
and budgeted batch with the calibrated predictive."""

import math

import pyro
import pytest
import torch
from pyro.infer import Predictive, TraceMeanField_ELBO
from torch import nn

from bayesdyn.data.datasets import DataSplits
from bayesdyn.evaluation import evaluate
from bayesdyn.guides.exit_heads import ExitHeadsGuide
from bayesdyn.inference import to_datatree
from bayesdyn.inference.exit_laplace import (
    PAPER_PRIOR_VARIANCES,
    PAPER_TEMPERATURES,
    ExitCalibration,
    calibrate_variants,
    ensemble,
    exit_features,
    laplace,
    mie_weights,
    tune,
)
from bayesdyn.inference.lastlayer import HeadLaplace
from bayesdyn.models import BoostedExits, MultiExitNet
from bayesdyn.models.bayesian_exits import BayesianExits, head_site
from bayesdyn.nn import ExitHead, MultiExitStack


def linear_stack(d=5, c=3, exits=3):
    """Exit k reads a fixed random projection of the input (features differ per exit)."""
    blocks = [nn.Linear(d, d) for _ in range(exits)]
    heads = [ExitHead(nn.Tanh(), nn.Linear(d, c)) for _ in range(exits)]
    return MultiExitStack(nn.Identity(), blocks, heads, input_ndim=1)


def toy_data(n=120, d=5, c=3):
    x = torch.randn(3 * n, d)
    y = (x[:, :c] + 0.7 * torch.randn(3 * n, c)).argmax(-1)
    split = lambda a, b: torch.utils.data.TensorDataset(x[a:b], y[a:b])  # noqa: E731
    return DataSplits("toy", split(0, n), split(n, 2 * n), split(2 * n, 3 * n), c, (d,), (0.0,), (1.0,))


def net_of(cls=MultiExitNet, data=None, **kw):
    """A multi-exit net trained a little on ``data`` (Adam on the summed exits' cross-entropy)."""
    net = cls(linear_stack(), **kw)
    if data is not None:
        x, y = data.train.tensors
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        for _ in range(60):
            opt.zero_grad()
            net.fast_loss(net.default_guide(), x, y, len(x))[0].backward()
            opt.step()
    return net.eval()


@pytest.mark.parametrize("cls", [MultiExitNet, BoostedExits])
def test_laplace_fits_every_head_from_one_feature_pass(float64, cls):
    data = toy_data()
    net = net_of(cls, data)
    cal = laplace(net, data, "full", temperature=None)
    feats = exit_features(net, data.train.tensors[0])
    for k, head in enumerate(cal.heads):
        offset = feats.logits[k] - feats.own[k]
        alone = HeadLaplace.fit(net.backbone.heads[k].linear, feats.features[k],
                                data.train.tensors[1], "full", offset if k else None)
        assert torch.allclose(head.ggn, alone.ggn)
        assert float(head.prior_precision) == pytest.approx(alone.optimal_prior_precision())
    if cls is BoostedExits:  # the history changes the curvature of later heads
        plain = HeadLaplace.fit(net.backbone.heads[2].linear, feats.features[2],
                                data.train.tensors[1], "full")
        assert not torch.allclose(plain.ggn, cal.heads[2].ggn)


def test_boosted_exit_logits_covariance_sums_the_heads(float64):
    """``F_k = f_k + gamma F_{k-1}``: the moments of F_k match draws of every head's weights."""
    data = toy_data()
    net = net_of(BoostedExits, data, gamma=[0.5, 0.8])
    cal = laplace(net, data, "kron", temperature=None, link="mc")
    model = BayesianExits(net)
    x = data.test.tensors[0][:2]
    feats = exit_features(net, x)
    pyro.set_rng_seed(0)
    draws = Predictive(model, guide=cal, num_samples=4000, parallel=True, return_sites=[
        head_site(k) for k in range(3)])(x)
    weights = [draws[head_site(k)] for k in range(3)]
    f = model.head_logits(feats.features, weights)  # [K, S, B, C]
    mu, cov = cal.moments(feats, 2)
    assert torch.allclose(f[2].mean(0), mu, atol=0.05)
    emp = torch.einsum("sna,snb->nab", f[2] - mu, f[2] - mu) / f.shape[1]
    assert torch.allclose(emp, cov, atol=0.08 * float(cov.abs().max()))


def test_mie_averages_probabilities_with_flops_weights():
    net = net_of()
    w = mie_weights(net, (5,))
    assert w[-1] == 1 and bool((w.diff() > 0).all())
    assert w[0] == pytest.approx((2 * 25 + 2 * 15) / (3 * 2 * 25 + 3 * 2 * 15))  # matmul FLOPs
    p = torch.softmax(torch.randn(3, 4, 3), -1)
    out = ensemble(p, w)
    assert torch.allclose(out[1], (w[0] * p[0] + w[1] * p[1]) / (w[0] + w[1]))
    assert torch.allclose(out[0], p[0])


def test_temperature_minimises_validation_nll(float64):
    data = toy_data()
    net = net_of(MultiExitNet, data)
    cal = ExitCalibration(net)
    val = exit_features(net, data.val.tensors[0])
    tune(cal, val, data.val.tensors[1])
    y = data.val.tensors[1]
    for k in range(3):
        t = torch.tensor(float(cal.temperature[k]), requires_grad=True)
        nll = -torch.log_softmax(val.logits[k] / t, -1).gather(1, y[:, None]).mean()
        (grad,) = torch.autograd.grad(nll, t)
        assert abs(float(grad)) < 1e-4


def test_greedy_mie_tuning_and_five_variants(float64):
    data = toy_data()
    net = net_of(MultiExitNet, data)
    variants = calibrate_variants(net, data, "diag", prior="grid")
    assert set(variants) == {"vanilla", "temperature", "laplace", "mie", "laplace+mie"}
    val = exit_features(net, data.val.tensors[0])
    y = data.val.tensors[1]
    best = variants["laplace+mie"]
    nll = lambda cal: float(-cal.probs(val)[:, 0].gather(-1, y[None, :, None].expand(3, -1, 1))  # noqa: E731
                            .log().mean((1, 2))[1])
    base = nll(best)
    best.temperature[1] *= 1.3  # moving the tuned exit-2 temperature off the grid point
    assert nll(best) >= base - 1e-12
    assert variants["vanilla"].temperature.eq(1).all() and not variants["vanilla"].mie


def test_laplace_guide_works_with_predictive_and_evaluate():
    data = toy_data()
    net = net_of(MultiExitNet, data)
    cal = laplace(net, data, "kron", mie=True)
    model = BayesianExits(net)
    out = Predictive(model, guide=cal, num_samples=3)(data.test.tensors[0][:4])
    assert out[head_site(0)].shape[-2:] == (3, 6) and out["probs"].shape == (3, 4, 3)
    tree = to_datatree(model, cal, *(t[:10] for t in data.train.tensors), num_samples=4)
    assert tree["log_likelihood"]["y"].shape == (1, 4, 10)
    metrics = evaluate(model, cal, data, ood=None)
    assert len(metrics["budgets"]) == 3 and len(metrics["budgeted_batch"]) == 39
    probs = model.predict_probs(cal, data.test.tensors[0], model.budgets()[1]).mean()
    feats = exit_features(net, data.test.tensors[0])
    assert torch.allclose(probs, cal.probs(feats)[1, 0].float())


def test_variational_fast_loss_equals_pyro_elbo_in_value_and_gradient(float64):
    data = toy_data()
    net = net_of(BoostedExits, data)
    model = BayesianExits(net, prior_precision=[1.0, 2.0, 3.0])
    guide = ExitHeadsGuide(model, init_scale=0.1)
    x, y = data.train.tensors[0][:16], data.train.tensors[1][:16]
    params = list(guide.parameters())
    torch.manual_seed(3)
    fast, terms = model.fast_loss(guide, x, y, 120)
    torch.manual_seed(3)
    ref = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y, 120)
    assert terms["kl"] > 1 and torch.allclose(fast, ref, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(ref, params),
                    strict=True):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert not any(p.requires_grad for p in net.parameters())  # the backbone is frozen


def test_bad_options_raise_before_work():
    data = toy_data()
    net = net_of(MultiExitNet, data)
    with pytest.raises(ValueError, match="structure"):
        laplace(net, data, "block")
    with pytest.raises(ValueError, match="link"):
        laplace(net, data, link="logit")
    with pytest.raises(TypeError, match="MultiExitNet"):
        laplace(nn.Linear(2, 2), data)
    with pytest.raises(ValueError, match="prior_precision"):
        BayesianExits(net, prior_precision=-1.0)
    assert math.isfinite(float(mie_weights(net, (5,))[0]))


@pytest.mark.slow
def test_cli_calibrate_writes_five_predictives_side_by_side(tmp_path, capsys):
    import json

    from bayesdyn.cli import main

    run = tmp_path / "run"
    assert main(["train", "exits", "--dataset", "digits", "--epochs", "1", "--out", str(run),
                 "--ood", "none", "--no-progress"]) == 0
    assert main(["calibrate", str(run), "--laplace", "block"]) == 2
    assert "--laplace must be one of" in capsys.readouterr().err
    assert main(["calibrate", str(run), "--laplace", "diag", "--mie"]) == 0
    metrics = json.loads((run / "calibration" / "metrics.json").read_text())
    assert list(metrics["variants"]) == ["vanilla", "temperature", "mie", "laplace", "laplace+mie"]
    assert all(len(v["budgeted_batch"]) == 39 for v in metrics["variants"].values())
    assert (run / "calibration" / "plots" / "ece_vs_flops.png").is_file()
    assert "laplace+mie" in capsys.readouterr().out


@pytest.mark.parametrize("cls", [MultiExitNet, BoostedExits])
def test_early_exit_with_the_calibrated_predictive_matches_budgeted_batch(cls):
    """predict_early_exit with an ExitCalibration (LA + MIE) takes, for every input, the exit
    and the probabilities the calibrated predictive of all exits gives."""
    from bayesdyn.evaluation import apply_thresholds
    from bayesdyn.inference import exit_confidences, fit_thresholds, predict_early_exit

    data = toy_data()
    net = net_of(cls, data)
    cal = laplace(net, data, "kron", mie=True)
    thresholds = fit_thresholds(net, data.val.tensors[0], level=15, calibration=cal)
    x = data.test.tensors[0]
    early = predict_early_exit(net, x, thresholds, calibration=cal)
    expected = apply_thresholds(exit_confidences(net, x, calibration=cal), thresholds)
    assert torch.equal(early.exit_index, expected) and len(set(expected.tolist())) > 1
    all_probs = cal.probs(exit_features(net, x)).mean(1)
    assert torch.allclose(early.probs, all_probs[expected, torch.arange(len(x))].float(), atol=1e-6)


def test_pyro_autoguides_work_on_the_head_sites():
    from pyro.infer.autoguide import AutoNormal

    from bayesdyn.guides import init_to_network

    data = toy_data()
    model = BayesianExits(net_of(MultiExitNet, data))
    guide = AutoNormal(model, init_loc_fn=init_to_network(model), init_scale=1e-3)
    pyro.clear_param_store()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    x, y = data.train.tensors
    before = svi.evaluate_loss(x, y)
    for _ in range(8):
        svi.step(x, y)
    assert svi.evaluate_loss(x, y) < before
    probs = model.predict_probs(guide, data.test.tensors[0][:5], model.budgets()[1], num_samples=4)
    assert probs.probs.shape == (4, 5, 3)
    start = guide.median()[head_site(0)]  # started at the trained head, bias last
    assert start.shape == (3, 6)


def test_paper_recipe_mc_link_on_a_float32_network():
    """The WACV recipe end to end: kron-paper, grids for prior and temperature, MC link with
    noise shared across inputs, in float32."""
    data = toy_data()
    net = net_of(BoostedExits, data)
    cal = laplace(net, data, "kron-paper", prior="grid", temperature="grid", link="mc",
                  num_samples=8, shared_noise=True)
    assert set(cal.temperature.tolist()) <= set(PAPER_TEMPERATURES)
    assert {round(1 / float(h.prior_precision), 6) for h in cal.heads} <= set(PAPER_PRIOR_VARIANCES)
    probs = cal.probs(exit_features(net, data.test.tensors[0]))
    assert probs.shape == (3, 8, 120, 3) and torch.allclose(probs.sum(-1), torch.ones(()).double())
