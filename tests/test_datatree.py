import arviz as az
import numpy as np
import pytest
import torch

from bayesdyn.inference import fit, predict, to_datatree
from bayesdyn.recipes import Recipe, build


@pytest.fixture(scope="module")
def two_runs(digits):
    runs = []
    for seed in range(2):
        torch.manual_seed(seed)
        model, guide = build(Recipe("depth", depth=4, width=16), digits.input_shape, 10)
        fit(model, guide, digits, epochs=2, batch_size=64, lr=3e-3, device="cpu", seed=seed,
            progress=False)
        runs.append((model, guide))
    return runs


@pytest.fixture(scope="module")
def tree(two_runs, digits):
    x, y = (t[:60] for t in digits.test.tensors)
    # PSIS needs distinct importance ratios in its tail: with D + 1 = 5 depths, draw enough
    return to_datatree(*two_runs[0], x, y, num_samples=200, runs=two_runs[1:])


def test_groups_dims_and_draws_from_the_guide(tree, two_runs, digits):
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(tree.children)
    post = tree["posterior"].dataset
    assert post["depth"].dims == ("chain", "draw") and post["depth"].shape == (2, 200)
    assert post["probs"].dims == ("chain", "draw", "obs_id", "class")
    # draws follow q(d): every drawn depth has positive mass, probs are the drawn depth's softmax
    model, guide = two_runs[0]
    model.eval()
    x = digits.test.tensors[0][:60]
    per_depth = torch.softmax(model.backbone(x), -1).detach().numpy()
    d = post["depth"].values[0]
    assert np.allclose(post["probs"].values[0], per_depth[d], atol=1e-5)
    loglik = tree["log_likelihood"].dataset["y"].values[0]
    y = digits.test.tensors[1][:60].numpy()
    assert np.allclose(loglik, np.log(per_depth[d[:, None], np.arange(60), y]), atol=1e-4)


def test_arviz_diagnostics_run(tree, tmp_path):
    summary = az.summary(tree, var_names=["depth"])
    assert "r_hat" in summary.columns and np.isfinite(summary.loc["depth", "mean"])
    assert np.isfinite(float(az.ess(tree, var_names=["depth"])["depth"]))
    assert np.isfinite(float(az.rhat(tree, var_names=["depth"])["depth"]))
    loo = az.loo(tree)
    assert np.isfinite(loo.elpd)
    az.plot_forest(tree, var_names=["depth"])
    az.plot_dist(tree, var_names=["depth"])
    path = tmp_path / "posterior.nc"
    tree.to_netcdf(path, engine="h5netcdf")
    back = az.from_netcdf(path)
    assert np.array_equal(back["posterior"]["depth"].values, tree["posterior"]["depth"].values)


def test_deterministic_model_exports_too(digits):
    model, guide = build(Recipe("deterministic", depth=1, width=8), digits.input_shape, 10)
    x, y = (t[:20] for t in digits.test.tensors)
    tree = to_datatree(model, guide, x, y, num_samples=5)
    assert tree["posterior"]["probs"].shape == (1, 5, 20, 10)


def test_predict_chunks_equal_one_pass(two_runs, digits):
    model, guide = two_runs[0]
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
