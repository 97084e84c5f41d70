"""MSDNet's threshold rule with ties, budgeted batch, and early exiting that computes less."""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bayesdyn.evaluation import (
    apply_thresholds,
    budgeted_batch,
    exit_proportions,
    flat_curve,
    prediction_flops,
    select_thresholds,
    thresholds_per_level,
)
from bayesdyn.inference import exit_confidences, fit_thresholds, predict, predict_early_exit
from bayesdyn.models import BoostedExits, MultiExitNet
from bayesdyn.nn import ExitHead, MultiExitStack, multiexit_mlp


def msdnet_loop_reference(conf, proportions):
    """MSDNet-PyTorch's threshold search, loop for loop: walk each exit's inputs from the most
    confident down, counting those not yet filtered; the one at which the count reaches
    floor(n p_k) sets T_k (else T_k stays 1e8); then every input with conf >= T_k is filtered."""
    k_exits, n = conf.shape
    filtered = [False] * n
    thresholds = [1e8] * k_exits
    for k in range(k_exits - 1):
        target, count = math.floor(n * float(proportions[k])), 0
        for i in sorted(range(n), key=lambda i: -float(conf[k, i])):
            if not filtered[i]:
                count += 1
                if count == target:
                    thresholds[k] = float(conf[k, i])
                    break
        filtered = [f or float(conf[k, i]) >= thresholds[k] for i, f in enumerate(filtered)]
    thresholds[-1] = -1e8
    return thresholds


def as_reference(t):
    return [1e8 if v == math.inf else -1e8 if v == -math.inf else float(v) for v in t]


def test_ties_at_a_threshold_all_exit_and_a_starved_exit_takes_no_one():
    # exit 1: the 5th most confident is 0.9, shared by 8 inputs: all 8 exit (not 5).
    # exit 2: its target floor(10 * 0.4) = 4 exceeds the 2 inputs left: MSDNet sets no
    # threshold there (1e8) and both go on to exit 3.
    conf = torch.tensor([[0.9] * 8 + [0.1, 0.1],
                         [0.5] * 8 + [0.8, 0.7],
                         [0.0] * 10])
    t = select_thresholds(conf, torch.tensor([0.5, 0.4, 0.1], dtype=torch.float64))
    assert t.tolist() == [pytest.approx(0.9), math.inf, -math.inf]
    assert apply_thresholds(conf, t).tolist() == [0] * 8 + [2, 2]
    assert as_reference(t) == pytest.approx(msdnet_loop_reference(conf, [0.5, 0.4, 0.1]))


def test_threshold_selection_matches_msdnets_loop_and_ignores_input_order():
    g = torch.Generator().manual_seed(0)
    conf = torch.randint(0, 6, (4, 60), generator=g).double() / 5  # many ties
    perm = torch.randperm(60, generator=g)
    for level in range(1, 40):
        p = exit_proportions(level, 4)
        t = select_thresholds(conf, p)
        assert as_reference(t) == pytest.approx(msdnet_loop_reference(conf, p))
        assert torch.equal(t, select_thresholds(conf[:, perm], p))
        assert torch.equal(apply_thresholds(conf, t)[perm], apply_thresholds(conf[:, perm], t))


def test_flat_curve_carries_the_best_validation_level_forward():
    rows = [{"level": i + 1, "flops": 10.0 * (i + 1), "accuracy": a, "nll": 1.0 - a, "ece": 0.1,
             "val_accuracy": v, "exit_fractions": [1.0]}
            for i, (a, v) in enumerate([(0.50, 0.5), (0.62, 0.6), (0.70, 0.55), (0.66, 0.7)])]
    flat = flat_curve(rows)
    assert [r["accuracy"] for r in flat] == [0.50, 0.62, 0.62, 0.66]
    assert [r["nll"] for r in flat] == pytest.approx([0.50, 0.38, 0.38, 0.34])
    assert [r["flops"] for r in flat] == [10.0, 20.0, 30.0, 40.0] and all(r["flat"] for r in flat)
    assert rows[2]["accuracy"] == 0.70  # the raw curve is left as it was


def slicing_model(classes=4, exits=3):
    """Exit k's logits are the k-th slice of the input: confidences (and their ties) are set by
    hand, bit for bit."""
    heads = []
    for k in range(exits):
        linear = nn.Linear(classes * exits, classes, bias=False)
        with torch.no_grad():
            linear.weight.zero_()
            linear.weight[:, k * classes:(k + 1) * classes] = torch.eye(classes)
        heads.append(ExitHead(nn.Identity(), linear))
    stack = MultiExitStack(nn.Identity(), [nn.Identity() for _ in range(exits)], heads,
                           input_ndim=1)
    return MultiExitNet(stack, classes)


def tied_inputs(n, generator, classes=4, exits=3):
    """Each exit's logits are ``a * e_c`` with a in {0, 1, 2, 3}: four confidence values; at
    the first exit 3 in about 80 % of inputs, so ties there can starve the next exit."""
    strength = torch.randint(0, 4, (n, exits), generator=generator).double()
    strength[:, 0] = torch.where(torch.rand(n, generator=generator) < 0.8, 3.0, strength[:, 0])
    label = torch.randint(0, classes, (n, exits), generator=generator)
    logits = torch.nn.functional.one_hot(label, classes) * strength[..., None]
    return logits.reshape(n, -1).float()


def test_early_exit_and_budgeted_batch_agree_on_every_input_with_ties():
    g = torch.Generator().manual_seed(1)
    model = slicing_model()
    x_val, x_test = tied_inputs(40, g), tied_inputs(50, g)
    y_val, y_test = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 4, (50,), generator=g)
    budgets = model.budgets()
    val_preds = [predict(model, model.default_guide(), x_val, b) for b in budgets]
    test_preds = [predict(model, model.default_guide(), x_test, b) for b in budgets]
    rows = budgeted_batch(val_preds, y_val, test_preds, y_test, costs=[1, 2, 3])
    table = fit_thresholds(model, x_val)
    assert torch.equal(table, thresholds_per_level(exit_confidences(model, x_val)))
    test_conf, val_conf = exit_confidences(model, x_test), exit_confidences(model, x_val)
    starved = 0
    for level, row in enumerate(rows, start=1):
        early = predict_early_exit(model, x_test, table[level - 1])
        assert torch.equal(early.exit_index, apply_thresholds(test_conf, table[level - 1]))
        assert early.exit_fractions() == pytest.approx(row["exit_fractions"])
        mean_cost = 1 + early.exit_index.double().mean().item()
        assert mean_cost == pytest.approx(row["flops"])
        chosen = torch.stack([p.mean for p in test_preds])[early.exit_index, torch.arange(50)]
        assert torch.equal(early.probs, chosen)
        passed_first = (apply_thresholds(val_conf, table[level - 1]) > 0).any()
        starved += bool(table[level - 1][1].item() == math.inf and passed_first
                        and math.floor(40 * exit_proportions(level, 3)[1]) >= 1)
    assert starved  # some levels exercise MSDNet's rule: a starved exit takes no one


def test_early_exit_matches_the_full_prediction_on_a_boosted_network():
    torch.manual_seed(0)
    model = BoostedExits(multiexit_mlp(6, 5, width=16, exits=4), 5, gamma=[0.5, 0.3, 0.9]).double()
    model.eval()
    x_val, x_test = torch.randn(200, 6).double(), torch.randn(300, 6).double()
    for level in (3, 10, 25):
        t = fit_thresholds(model, x_val, level)
        early = predict_early_exit(model, x_test, t)
        full = torch.softmax(model.exit_logits(x_test), -1).detach()
        assert torch.equal(early.exit_index, apply_thresholds(full.max(-1).values, t))
        assert torch.allclose(early.probs, full[early.exit_index, torch.arange(300)])


def test_early_exit_computes_only_what_the_exits_taken_need():
    torch.manual_seed(0)
    model = MultiExitNet(multiexit_mlp(6, 5, width=16, exits=4), 5, input_shape=(6,))
    guide, x = model.default_guide(), torch.randn(64, 6)
    per_exit = [prediction_flops(model, (6,), guide, b, 1) for b in model.budgets()]

    def flops(thresholds):
        counter = FlopCounterMode(display=False)
        with counter:
            early = predict_early_exit(model, x, torch.tensor(thresholds))
        return counter.get_total_flops(), early.exit_index

    inf = math.inf
    assert flops([-inf, inf, inf, -inf])[0] == 64 * per_exit[0]  # everyone leaves at exit 1
    assert flops([inf, inf, inf, -inf])[0] == 64 * per_exit[3]
    median = exit_confidences(model, x)[0].median().item()
    spent, exit_index = flops([median, inf, inf, -inf])
    n_first = int((exit_index == 0).sum())
    assert 0 < n_first < 64
    assert spent == n_first * per_exit[0] + (64 - n_first) * per_exit[3]


def test_early_exit_arguments_are_checked():
    model = slicing_model()
    with pytest.raises(ValueError, match="thresholds must have shape \\[3\\]"):
        predict_early_exit(model, torch.zeros(2, 12), torch.zeros(2))
    with pytest.raises(ValueError, match="level must be in 1..39"):
        fit_thresholds(model, torch.zeros(2, 12), level=40)
    with pytest.raises(TypeError, match="MultiExitNet or BoostedExits"):
        predict_early_exit(nn.Linear(2, 2), torch.zeros(2, 2), torch.zeros(1))
