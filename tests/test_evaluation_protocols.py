import json

import pytest
import torch
from torch import nn

from bayesdyn.evaluation import (
    apply_thresholds,
    budgeted_batch,
    exit_proportions,
    forward_flops,
    parameter_count,
    pareto_front,
    select_thresholds,
)
from bayesdyn.inference.predict import Prediction


def test_linear_and_conv_flops_match_formula():
    lin = nn.Linear(30, 20)
    assert forward_flops(lin, (30,)) == 2 * 30 * 20
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert forward_flops(conv, (3, 10, 10)) == 2 * 8 * 10 * 10 * 3 * 3 * 3
    strided = nn.Conv2d(4, 6, kernel_size=5, stride=2)  # 12x12 -> 4x4
    assert forward_flops(strided, (4, 12, 12)) == 2 * 6 * 4 * 4 * 4 * 5 * 5
    assert parameter_count(lin) == 30 * 20 + 20


def test_shared_parameters_counted_once():
    lin = nn.Linear(4, 4)
    assert parameter_count(nn.Sequential(lin, lin)) == 20


def test_exit_proportions_follow_msdnet():
    p = exit_proportions(level=10, num_budgets=3)  # q = 0.5 -> 0.5, 0.25, 0.125 normalised
    assert torch.allclose(p, torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))


def test_threshold_selection_by_hand():
    # 10 validation inputs, 3 budgets; proportions 0.5, 0.3, 0.2
    conf = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],   # budget 0
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.99, 0.98, 0.97, 0.1, 0.1],  # budget 1
        [0.0] * 10])
    t = select_thresholds(conf, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    # budget 0: the 5 most confident (0.9 .. 0.5) exit -> t0 = 0.5
    # budget 1: among inputs 5..9, the 3 most confident (0.99, 0.98, 0.97) exit -> t1 = 0.97
    assert t[0].item() == pytest.approx(0.5) and t[1].item() == pytest.approx(0.97)
    assert t[2].item() == float("-inf")
    assert apply_thresholds(conf, t).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]


def _prediction(mean):
    return Prediction(mean[None], torch.ones(1, dtype=torch.float64), mean, *(torch.zeros(len(mean)),) * 3)


def test_budgeted_batch_spends_more_flops_at_higher_levels():
    g = torch.Generator().manual_seed(0)
    n, c = 400, 5
    labels = torch.randint(0, c, (n,), generator=g)
    preds = []
    for k in range(3):  # later budgets are more accurate and more confident
        logits = torch.randn(n, c, generator=g) + (k + 1) * 2.0 * nn.functional.one_hot(labels, c)
        preds.append(_prediction(torch.softmax(logits, -1)))
    rows = budgeted_batch(preds, labels, preds, labels, costs=[1.0, 2.0, 3.0], levels=39)
    flops = [r["flops"] for r in rows]
    assert flops[0] < flops[-1] and 1.0 <= min(flops) and max(flops) <= 3.0
    assert all(abs(sum(r["exit_fractions"]) - 1) < 1e-6 for r in rows)
    assert rows[-1]["accuracy"] >= rows[0]["accuracy"]
    json.dumps(rows)  # plain numbers: metrics.json can hold them


def test_cumulative_flops_reuse_shared_trunk():
    from bayesdyn.evaluation import marginal_cost, measure
    from bayesdyn.models import DepthNet
    from bayesdyn.nn import residual_mlp

    model = DepthNet(residual_mlp(16, 3, width=8, depth=2))
    budgets = measure(model, (16,))
    head = 2 * 8 * 3  # the shared linear head, paid once per depth tried
    block = 2 * 8 * 8
    assert [b.flops for b in budgets] == [2 * 16 * 8 + head + d * block for d in range(3)]
    assert [b.info["cumulative_flops"] for b in budgets] == [
        b.flops + d * head for d, b in enumerate(budgets)]
    assert marginal_cost(model, (16,))[0] == budgets[-1].info["cumulative_flops"]


def test_cost_is_that_of_the_predictive_that_produced_the_metrics():
    """Monte Carlo predictives pay per sample; the nested marginal pays for each ordering it
    averages (not one full-width pass)."""
    from bayesdyn.data import load
    from bayesdyn.evaluation import marginal_cost, measure
    from bayesdyn.models import Budget, NestedNet
    from bayesdyn.nn import nested_mlp

    torch.manual_seed(0)
    model = NestedNet(nested_mlp(64, 10, (32, 32), groups=8, input_shape=(1, 8, 8)), 10,
                      input_shape=(1, 8, 8))
    guide = model.default_guide()
    one, four = (measure(model, (1, 8, 8), guide, num_samples=s) for s in (1, 4))
    assert [4 * b.flops for b in one] == [b.flops for b in four]
    model.prepare_evaluation(load("digits").train, guide)
    settings = model._marginal_settings
    per_draw = {s: measure(model, (1, 8, 8), guide, [Budget("w", s)], num_samples=1)[0].flops
                for s in set(settings)}
    for draws in (3, 8, 11):
        expected = sum(per_draw[settings[s % len(settings)]] for s in range(draws))
        assert marginal_cost(model, (1, 8, 8), guide, num_samples=draws)[0] == expected


def test_a_deterministic_fixed_width_is_one_pass_whatever_the_samples():
    """Nested dropout at a fixed width has no weight noise: 8 draws would be 8 equal passes."""
    from bayesdyn.evaluation import marginal_cost, measure
    from bayesdyn.models import NestedNet
    from bayesdyn.nn import nested_mlp

    torch.manual_seed(0)
    model = NestedNet(nested_mlp(64, 10, (32, 32), groups=8, bayesian=False,
                                 input_shape=(1, 8, 8)), 10, input_shape=(1, 8, 8))
    guide = model.default_guide()
    one, eight = (measure(model, (1, 8, 8), guide, num_samples=s) for s in (1, 8))
    assert [b.flops for b in one] == [b.flops for b in eight]
    budget, x = one[-1], torch.randn(5, 1, 8, 8)
    assert model.predict_probs(guide, x, budget, num_samples=8).probs.shape[0] == 1
    # the marginal still averages orderings drawn from the prior: it pays per draw
    assert marginal_cost(model, (1, 8, 8), guide, 8)[0] > marginal_cost(model, (1, 8, 8), guide, 1)[0]


def test_pareto_front_by_hand_and_against_its_definition():
    rows = [{"name": "a", "flops": 1, "accuracy": 0.5, "nll": 1.0},
            {"name": "b", "flops": 2, "accuracy": 0.4, "nll": 0.9},  # dearer and worse than a
            {"name": "c", "flops": 2, "accuracy": 0.7, "nll": 1.2},
            {"name": "d", "flops": 3, "accuracy": 0.7, "nll": 0.8},  # ties c, costs more
            {"name": "e", "flops": 4, "accuracy": 0.9, "nll": float("nan")}]
    assert [r["name"] for r in pareto_front(rows)] == ["a", "c", "e"]
    assert [r["name"] for r in pareto_front(rows, "nll")] == ["a", "b", "d"]  # lower is better
    g = torch.Generator().manual_seed(0)
    flops, acc = torch.randint(0, 20, (200,), generator=g), torch.rand(200, generator=g)
    points = [{"flops": int(f), "accuracy": float(a)} for f, a in zip(flops, acc, strict=True)]
    front = pareto_front(points)
    dominated = lambda p: any(q["flops"] <= p["flops"] and q["accuracy"] >= p["accuracy"]  # noqa: E731
                              and (q["flops"], q["accuracy"]) != (p["flops"], p["accuracy"])
                              for q in points)
    assert {(p["flops"], p["accuracy"]) for p in front} == \
        {(p["flops"], p["accuracy"]) for p in points if not dominated(p)}
