"""Regression as a first-class task: data, likelihoods, validation, evaluation, CLI, plots."""

import json
import math

import numpy as np
import pyro
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from bayesdyn.cli import main
from bayesdyn.data import load
from bayesdyn.evaluation import regression_metrics
from bayesdyn.guides import EmptyGuide
from bayesdyn.inference import fit, loo, predict_normal
from bayesdyn.models import DeterministicNet
from bayesdyn.recipes import Recipe, build


def test_regression_metrics_by_hand():
    g = torch.Generator().manual_seed(0)
    log_w = torch.log_softmax(torch.randn(3, generator=g), 0)
    means, y, scale, std = torch.randn(3, 50, generator=g), torch.randn(50, generator=g), 0.7, 4.0
    m = regression_metrics(log_w, means, scale, y, target_std=std)
    w, mu, yy = log_w.exp().numpy()[:, None], means.numpy(), y.numpy()
    mix = logsumexp(np.log(w) + norm.logpdf(yy, mu, scale), axis=0)
    mean = (w * mu).sum(0)
    var = (w * (scale**2 + mu**2)).sum(0) - mean**2
    assert m["rmse"] == pytest.approx(std * np.sqrt(np.mean((mean - yy) ** 2)), rel=1e-5)
    assert m["nll"] == pytest.approx(-mix.mean() + math.log(std), rel=1e-5)
    assert m["nll_gaussian"] == pytest.approx(-norm.logpdf(yy, mean, np.sqrt(var)).mean()
                                              + math.log(std), rel=1e-5)
    assert m["nll"] != pytest.approx(m["nll_gaussian"], rel=1e-3)  # they really differ


def test_regression_datasets_are_standardised_offline_and_split_by_seed():
    d0, d1 = load("diabetes", seed=0), load("diabetes", seed=1)
    assert d0.task == "regression" and d0.num_classes is None and d0.input_shape == (10,)
    x, y = d0.train.tensors
    assert y.dtype == torch.float32 and abs(float(y.mean())) < 1e-5
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5)
    assert len(d0.train) + len(d0.val) + len(d0.test) == 442
    assert 50 < d0.target_std < 100  # the original units are kept for the metrics
    assert not torch.equal(d0.test.tensors[1], d1.test.tensors[1])
    toy = load("toy-1d")
    assert toy.input_shape == (1,) and len(toy.test) == 120


def test_deterministic_regression_fast_loss_equals_trace_elbo(float64):
    torch.manual_seed(0)
    model = DeterministicNet(torch.nn.Linear(3, 1), None, likelihood="regression")
    guide = EmptyGuide(model)
    x, y = torch.randn(8, 3), torch.randn(8)
    fast, _ = model.fast_loss(guide, x, y, 40)
    ref = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, x, y, 40)
    assert torch.allclose(fast, ref)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(fast, params), torch.autograd.grad(ref, params), strict=True):
        assert torch.allclose(a, b)
    with pytest.raises(TypeError, match="floating-point"):
        model(x, torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("method", ["depth", "deterministic"])
def test_fit_validates_and_evaluate_scores_regression(method, tmp_path):
    data = load("toy-1d")
    torch.manual_seed(0)
    model, guide = build(Recipe(method, depth=3, width=32), data.input_shape, None)
    history = fit(model, guide, data, epochs=20, batch_size=64, lr=3e-3, device="cpu",
                  progress=False)
    assert {"val_rmse", "val_nll"} <= set(history.epochs[-1])
    assert history["val_rmse"][-1] < history["val_rmse"][0]
    pred = predict_normal(model, guide, data.test.tensors[0])
    assert pred.means.shape[1] == len(data.test)
    from bayesdyn.evaluation import evaluate

    metrics = evaluate(model, guide, data, out=tmp_path, method=method)
    assert metrics["task"] == "regression"
    assert {"rmse", "nll", "nll_gaussian", "flops"} <= set(metrics["marginal"])
    assert metrics["marginal"]["rmse"] < data.target_std  # better than predicting the mean
    assert (tmp_path / "plots" / "predictive.png").is_file()
    x, y = data.train.tensors
    assert np.isfinite(loo(model, guide, x[:100], y[:100]).elpd)


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_regression_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "depth", "--dataset", "diabetes", "--epochs", "3", "--out", str(out),
                 "--width", "16", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "RMSE" in printed and "NLL Gauss" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["budgets"]) == 5 and metrics["task"] == "regression"
    assert main(["evaluate", str(out)]) == 0
    assert main(["train", "nested", "--dataset", "diabetes", "--epochs", "1",
                 "--out", str(tmp_path / "nested")]) == 2
    assert "classification" in capsys.readouterr().err
