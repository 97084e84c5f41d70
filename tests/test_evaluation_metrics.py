import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score, roc_curve

from bayesdyn.evaluation import accuracy, brier, ece, nll, ood_metrics, reliability, uncertainty
from bayesdyn.evaluation.ood import score_entropy, score_max_prob, score_mutual_information


def random_predictions(n=500, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, c, generator=g), -1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def test_accuracy_nll_brier_match_sklearn():
    probs, labels = random_predictions()
    p, y = probs.double().numpy(), labels.numpy()
    p /= p.sum(1, keepdims=True)  # float32 rounding: exact simplex for sklearn's check
    assert accuracy(probs, labels) == pytest.approx(np.mean(p.argmax(1) == y), abs=1e-6)
    assert nll(probs, labels) == pytest.approx(log_loss(y, p, labels=range(7)), abs=1e-6)
    # sklearn's multiclass Brier is sum over classes, mean over examples (scale_by_half=False)
    ref = brier_score_loss(y, p, labels=range(7), scale_by_half=False)
    assert brier(probs, labels) == pytest.approx(ref, abs=1e-6)


def test_perfectly_calibrated_predictor_has_small_ece():
    # confidence c drawn uniformly; the prediction is right with probability exactly c
    g = torch.Generator().manual_seed(1)
    n = 200_000
    conf = 0.5 + 0.5 * torch.rand(n, generator=g)
    probs = torch.stack([conf, 1 - conf], -1)
    correct = torch.rand(n, generator=g) < conf
    labels = torch.where(correct, 0, 1)
    # sampling error of the per-bin accuracy ~ sqrt(p(1-p)/n_bin) ~ 0.004 here
    assert ece(probs, labels, n_bins=15) < 0.01
    assert ece(probs, labels, n_bins=15, adaptive=True) < 0.01


def test_constant_predictor_ece_is_closed_form():
    # always predicts class 0 with probability 0.9; class 0 is right 60% of the time: ECE = 0.3
    probs = torch.tensor([[0.9, 0.1]]).repeat(1000, 1)
    labels = torch.cat([torch.zeros(600), torch.ones(400)]).long()
    assert ece(probs, labels) == pytest.approx(0.3, abs=1e-6)
    r = reliability(probs, labels, n_bins=10)
    assert r["count"].sum() == 1000 and r["count"][8] == 1000  # 0.9 lies in (0.8, 0.9]
    assert r["accuracy"][8] == pytest.approx(0.6)


def test_adaptive_ece_does_not_depend_on_the_order_of_ties():
    """Constant p = 0.9, 60 % correct: every input is tied, so all share one bin and the
    adaptive ECE is |0.6 - 0.9| = 0.3 in any order (it was 0.393 with the labels sorted)."""
    probs = torch.tensor([[0.9, 0.1]]).repeat(1000, 1)
    labels = torch.cat([torch.zeros(600), torch.ones(400)]).long()
    shuffled = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    for y in (labels, shuffled, labels.flip(0)):
        assert ece(probs, y, n_bins=15, adaptive=True) == pytest.approx(0.3, abs=1e-6)
    # partial ties: two confidence levels, any order, each level kept whole in one bin
    conf = torch.cat([torch.full((300,), 0.7), torch.full((700,), 0.95)])
    probs = torch.stack([conf, 1 - conf], -1)
    correct = torch.zeros(1000, dtype=torch.bool)
    correct[:150], correct[300:965] = True, True  # 50 % at 0.7, 95 % at 0.95
    y = torch.where(correct, 0, 1)
    by_hand = 0.3 * abs(0.5 - 0.7) + 0.7 * abs(0.95 - 0.95)
    for perm in (torch.arange(1000), torch.randperm(1000, generator=torch.Generator().manual_seed(1))):
        assert ece(probs[perm], y[perm], n_bins=10, adaptive=True) == pytest.approx(by_hand, abs=1e-6)


def test_confidence_one_is_counted_in_last_bin():
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    r = reliability(probs, labels, n_bins=10)
    assert r["count"][-1] == 2
    assert ece(probs, labels) == pytest.approx(0.5)


def test_ece_by_hand():
    # two bins of 15: conf 0.25 (bin 3), conf 0.95 (bin 14)
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25]] * 4 + [[0.95, 0.05, 0.0, 0.0]] * 6)
    labels = torch.tensor([0, 1, 1, 1] + [0, 0, 0, 0, 0, 1])
    # bin A: 4 examples, acc 1/4, conf .25 -> gap 0;  bin B: 6 examples, acc 5/6, conf .95
    expected = 0.6 * abs(5 / 6 - 0.95)
    assert ece(probs, labels) == pytest.approx(expected, abs=1e-6)


def test_uncertainty_decomposition():
    # two equally weighted, confident but disagreeing samples: aleatoric 0, epistemic log 2
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    u = uncertainty(probs)
    assert u["aleatoric"].item() == pytest.approx(0, abs=1e-9)
    assert u["epistemic"].item() == pytest.approx(np.log(2))
    # weighted mixture: total = H(mixture)
    w = torch.tensor([0.25, 0.75])
    u = uncertainty(probs, w)
    assert u["total"].item() == pytest.approx(-(0.25 * np.log(0.25) + 0.75 * np.log(0.75)))
    # identical samples: no epistemic part
    same = torch.softmax(torch.randn(1, 5, 3), -1).repeat(4, 1, 1)
    assert torch.allclose(uncertainty(same)["epistemic"], torch.zeros(5, dtype=torch.float64),
                          atol=1e-7)


def test_ood_metrics_match_sklearn():
    g = torch.Generator().manual_seed(2)
    s_in, s_out = torch.randn(300, generator=g), torch.randn(200, generator=g) + 1.0
    m = ood_metrics(s_in, s_out)
    labels = np.r_[np.zeros(300), np.ones(200)]
    scores = np.r_[s_in.numpy(), s_out.numpy()]
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert m["aupr"] == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    # FPR@95 from sklearn's ROC with in-distribution as the positive (accepted) class
    fpr, tpr, _ = roc_curve(1 - labels, -scores)
    assert m["fpr95"] == pytest.approx(fpr[np.searchsorted(tpr, 0.95)], abs=1e-6)


def test_ood_scores_order():
    confident = torch.tensor([[[0.98, 0.01, 0.01]]])
    unsure = torch.tensor([[[0.34, 0.33, 0.33]]])
    for score in (score_max_prob, score_entropy):
        assert score(unsure) > score(confident)
    disagree = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    assert score_mutual_information(disagree) > score_mutual_information(unsure)


def test_metric_input_errors():
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        accuracy(torch.rand(3), torch.zeros(3).long())
    with pytest.raises(ValueError, match="labels must be"):
        nll(torch.rand(3, 2), torch.zeros(4).long())
