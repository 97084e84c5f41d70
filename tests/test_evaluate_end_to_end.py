import json

import matplotlib.image as mpimg
import pytest

from bayesdyn.evaluation import evaluate
from bayesdyn.inference import fit
from bayesdyn.recipes import Recipe, build

METRIC_KEYS = {"accuracy", "nll", "brier", "ece", "ood_auroc"}


@pytest.fixture(scope="module")
def trained(digits):
    model, guide = build(Recipe("depth", depth=3, width=32), digits.input_shape, 10)
    fit(model, guide, digits, epochs=3, batch_size=64, lr=3e-3, device="cpu")
    return model, guide


def test_evaluate_writes_design_metrics_and_plots(trained, digits, tmp_path):
    model, guide = trained
    metrics = evaluate(model, guide, digits, out=tmp_path, method="depth", seed=0,
                       train_seconds=1.0)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    for key in ("method", "dataset", "seed", "train_seconds", "marginal", "budgets"):
        assert key in on_disk
    assert METRIC_KEYS <= set(on_disk["marginal"])
    assert len(on_disk["budgets"]) == 4
    for row in on_disk["budgets"]:
        assert {"budget", "flops", "params"} | METRIC_KEYS <= set(row)
        assert 0 <= row["ood_auroc"] <= 1 and row["flops"] > 0
    flops = [b["flops"] for b in on_disk["budgets"]]
    assert flops == sorted(flops)
    assert len(on_disk["budgeted_batch"]) == 39
    assert abs(sum(on_disk["structure"]["depth"]) - 1) < 1e-5
    for name in ("reliability", "accuracy_vs_flops", "nll_vs_flops", "ece_vs_flops",
                 "ood_histogram", "posterior_depth"):
        image = mpimg.imread(tmp_path / "plots" / f"{name}.png")
        assert image.shape[0] > 100 and image.std() > 0.01  # a real picture, not a blank


def test_evaluate_without_ood_and_bad_score(trained, digits):
    model, guide = trained
    metrics = evaluate(model, guide, digits, ood=None)
    assert metrics["marginal"]["ood_auroc"] is None
    with pytest.raises(ValueError, match="unknown OOD score"):
        evaluate(model, guide, digits, ood_score="bogus")
