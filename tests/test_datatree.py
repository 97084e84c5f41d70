import arviz as az
import numpy as np
import pytest
import torch

from bayesdyn.cli import main
from bayesdyn.inference import fit, loo, predict, to_datatree
from bayesdyn.models import DepthNet
from bayesdyn.nn import residual_mlp
from bayesdyn.recipes import Recipe, build
from bayesdyn.runs import runs_to_datatree


@pytest.fixture(scope="module")
def two_runs(digits):
    runs = []
    for seed in range(2):
        torch.manual_seed(seed)
        model, guide = build(Recipe("depth", depth=4, width=16), digits.input_shape, 10)
        history = fit(model, guide, digits, epochs=2, batch_size=64, lr=3e-3, device="cpu",
                      seed=seed, progress=False)
        runs.append((model, guide, history))
    return runs


@pytest.fixture(scope="module")
def tree(two_runs, digits):
    x, y = (t[:300] for t in digits.train.tensors)
    (model, guide, h0), (m1, g1, h1) = two_runs
    return to_datatree(model, guide, x, y, num_samples=50, runs=[(m1, g1)],
                       predict_x=digits.test.tensors[0][:40], histories=[h0, h1])


def test_groups_dims_and_draws_from_the_guide(tree, two_runs, digits):
    assert {"posterior", "prior", "posterior_predictive", "log_likelihood", "observed_data",
            "predictions", "structure", "optimization"} <= set(tree.children)
    post = tree["posterior"].dataset
    assert post["depth"].dims == ("chain", "draw") and post["depth"].shape == (2, 50)
    model, guide, _ = two_runs[0]
    model.eval()
    # exact q(d) stored per chain, constant over draws; the prior pmf beside it
    q = guide.probs().detach().numpy()
    assert np.allclose(post["depth_probs"].values[0], q[None], atol=1e-6)
    assert np.allclose(tree["prior"]["depth_probs"].values[0, 0], 0.2)
    # predictions: class probabilities of new inputs under the same drawn depths
    x_new = digits.test.tensors[0][:40]
    per_depth = torch.softmax(model.backbone(x_new), -1).detach().numpy()
    d = post["depth"].values[0]
    assert np.allclose(tree["predictions"]["probs"].values[0], per_depth[d], atol=1e-5)
    # log-likelihood of the (training) data under the drawn depth
    x, y = (t[:300] for t in digits.train.tensors)
    train_depth = torch.log_softmax(model.backbone(x), -1).detach().numpy()
    loglik = tree["log_likelihood"]["y"].values[0]
    assert np.allclose(loglik, train_depth[d[:, None], np.arange(300), y.numpy()], atol=1e-4)
    # the ELBO trace per run
    assert tree["optimization"]["loss"].shape == (2, 2)


def test_summary_is_readable_and_rhat_compares_runs(tree):
    summary = az.summary(tree, kind="stats")
    assert len(summary) < 20, summary.index.tolist()  # no per-example class probabilities
    assert {"depth", "depth_probs[0]"} <= set(summary.index)
    # the exact q(d) of each run, read off directly
    assert summary.loc["depth_probs[0]", "mean"] == pytest.approx(
        float(tree["posterior"]["depth_probs"].values[:, 0, 0].mean()), abs=1e-3)
    # R-hat across runs on draw-based quantities: drawn depths, predictive probabilities
    assert np.isfinite(float(az.rhat(tree, var_names=["depth"])["depth"]))
    rhat = az.rhat(tree["predictions"].dataset)["probs"].values
    assert np.isfinite(rhat).mean() > 0.9
    az.plot_forest(tree, var_names=["depth_probs"])
    az.plot_dist(tree, var_names=["depth"])


def test_netcdf_round_trip(tree, tmp_path):
    path = tmp_path / "posterior.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    back = az.from_netcdf(path)
    assert np.array_equal(back["posterior"]["depth"].values, tree["posterior"]["depth"].values)
    assert loo(back).elpd == pytest.approx(loo(tree).elpd)


def test_exact_loo_equals_refitting_the_depth_posterior_without_each_point(digits):
    """Marginal-likelihood DUN: p(d | data) is exact, so leaving point i out is Bayes' rule on
    the other points. Recompute it directly for every i and compare with the exact LOO."""
    torch.manual_seed(0)
    model = DepthNet(residual_mlp(64, 10, width=16, depth=3, input_shape=(1, 8, 8)),
                     num_classes=10, input_shape=(1, 8, 8), marginal=True)
    guide = model.default_guide()
    fit(model, guide, digits, epochs=1, batch_size=64, lr=3e-3, device="cpu", progress=False)
    x, y = (t[:40] for t in digits.train.tensors)
    model.eval()
    model.update_posterior(x, y)
    result = loo(model, guide, x, y, num_samples=20)
    loglik = model.log_likelihoods(model.backbone(x), y).detach().double()  # [D+1, N]
    log_prior = model.prior_probs.double().log()
    expected = []
    for i in range(len(x)):
        others = torch.cat([loglik[:, :i], loglik[:, i + 1:]], 1).sum(1)
        post = torch.log_softmax(log_prior + others, 0)
        expected.append(torch.logsumexp(post + loglik[:, i], 0))
    assert np.allclose(result.elpd_i.values, torch.stack(expected).numpy(), rtol=1e-6)
    assert result.elpd == pytest.approx(float(sum(expected)), rel=1e-6)
    lpd = torch.logsumexp(torch.log_softmax(log_prior + loglik.sum(1), 0)[:, None] + loglik, 0)
    assert result.p == pytest.approx(float((lpd - torch.stack(expected)).sum()), rel=1e-5)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for method, seed in [("depth", 0), ("depth", 1), ("nested", 0)]:
        out = root / f"{method}-{seed}"
        assert main(["train", method, "--dataset", "digits", "--epochs", "2", "--seed", str(seed),
                     "--out", str(out), "--width", "16", "--ood", "none", "--no-progress"]) == 0
        dirs[f"{method}-{seed}"] = out
    return dirs


@pytest.mark.slow
def test_loo_and_compare_on_cli_runs(cli_runs):
    depth = az.from_netcdf(cli_runs["depth-0"] / "posterior.nc")
    nested = az.from_netcdf(cli_runs["nested-0"] / "posterior.nc")
    psis = az.loo(nested, pointwise=True)  # continuous draws: ArviZ's own PSIS-LOO
    assert np.isfinite(psis.elpd) and psis.n_data_points == 1000
    exact = loo(depth)  # discrete, exact structure posterior: exact LOO as ArviZ's ELPD object
    assert exact.kind == "loo" and np.isfinite(exact.elpd) and exact.n_data_points == 1000
    table = az.compare({"depth": exact, "nested": loo(nested)})
    assert set(table.index) == {"depth", "nested"} and np.isfinite(table["elpd"]).all()


@pytest.mark.slow
def test_cli_runs_become_chains(cli_runs):
    tree = runs_to_datatree([cli_runs["depth-0"], cli_runs["depth-1"]], num_samples=30)
    assert tree["posterior"]["depth"].shape == (2, 30)
    assert np.isfinite(float(az.rhat(tree, var_names=["depth"])["depth"]))
    with pytest.raises(ValueError, match="different recipes"):
        runs_to_datatree([cli_runs["depth-0"], cli_runs["nested-0"]])


def test_deterministic_model_exports_too(digits):
    model, guide = build(Recipe("deterministic", depth=1, width=8), digits.input_shape, 10)
    x, y = (t[:20] for t in digits.train.tensors)
    tree = to_datatree(model, guide, x, y, num_samples=5, predict_x=x[:3])
    assert tree["predictions"]["probs"].shape == (1, 5, 3, 10)
    result = loo(tree)  # one component: LOO is the plain log-likelihood, no effective parameters
    assert result.p == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="num_samples"):
        to_datatree(model, guide, x, y, num_samples=0)


def test_predict_chunks_equal_one_pass(two_runs, digits):
    model, guide, _ = two_runs[0]
    x = digits.test.tensors[0]
    whole = predict(model, guide, x, batch_size=10_000)
    chunked = predict(model, guide, x, batch_size=37)
    assert torch.allclose(whole.mean, chunked.mean, atol=1e-6)
    assert whole.probs.shape == (5, len(x), 10)  # one slice per depth, weighted by q(d)
    assert torch.allclose(whole.mean.sum(-1), torch.ones(len(x)), atol=1e-5)
    with pytest.raises(ValueError, match="num_samples"):
        predict(model, guide, x, num_samples=0)
    with pytest.raises(ValueError, match="expected \\[batch, 1, 8, 8\\]"):
        predict(model, guide, torch.zeros(3, 64))
