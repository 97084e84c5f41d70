"""Early exiting that computes less: a batch runs block by block and the inputs whose confidence
passes an exit's threshold leave there, so later blocks and heads only see the inputs still
running (budgeted batch, MSDNet / methods.md §2.5; thresholds from the validation split).

The exits taken are those ``bayesdyn.evaluation.budgeted_batch`` assigns from the full set of
per-exit predictions (``apply_thresholds``): the first exit ``k`` with ``max_c p_k(c | x) >= t_k``.
Only the wall-clock cost differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluation.protocols import exit_proportions, select_thresholds, thresholds_per_level
from ..models.exits import check_multi_exit
from ..nn.multiexit import select
from .predict import _EvalMode


@dataclass
class EarlyExitPrediction:
    """``probs [N, C]``: each input's predictive at the exit it left at, ``exit_index [N]``
    (0-based), and the ``thresholds [K]`` used."""

    probs: torch.Tensor
    exit_index: torch.Tensor
    thresholds: torch.Tensor

    def exit_fractions(self) -> list[float]:
        """Share of the inputs leaving at each exit."""
        k = len(self.thresholds)
        return torch.bincount(self.exit_index, minlength=k).div(len(self.exit_index)).tolist()



@torch.no_grad()
def exit_confidences(model, x: torch.Tensor, batch_size: int = 2048,
                     calibration=None) -> torch.Tensor:
    """Top-1 confidences ``[K, N]`` of every exit's predictive (all exits, one pass per chunk);
    with ``calibration`` (an ``ExitCalibration``: Laplace / temperature / MIE) of its
    predictive."""
    check_multi_exit(model, "early exiting")
    device = next(model.parameters()).device
    chunks = []
    with _EvalMode(model):
        for xb in x.split(batch_size):
            if calibration is None:
                probs = torch.softmax(model.exit_logits(xb.to(device)), -1)
            else:
                from .exit_laplace import exit_features

                probs = calibration.probs(exit_features(model, xb, len(xb))).mean(1)
            chunks.append(probs.max(-1).values.float().cpu())
    return torch.cat(chunks, 1)


def fit_thresholds(model, x_val: torch.Tensor, level: int | None = None,
                   levels: int = 39, calibration=None) -> torch.Tensor:
    """MSDNet's thresholds from validation inputs: ``[levels, K]`` for every budget level, or
    ``[K]`` for one ``level`` in ``1..levels`` (confidences of ``calibration``'s predictive
    when given)."""
    conf = exit_confidences(model, x_val, calibration=calibration)
    if level is None:
        return thresholds_per_level(conf, levels)
    if not 1 <= level <= levels:
        raise ValueError(f"level must be in 1..{levels}, got {level}")
    return select_thresholds(conf, exit_proportions(level, conf.shape[0]))


@torch.no_grad()
def predict_early_exit(model, x: torch.Tensor, thresholds: torch.Tensor,
                       calibration=None) -> EarlyExitPrediction:
    """Run ``x [N, ...]`` block by block; after exit ``k`` the inputs with confidence
    ``>= thresholds[k]`` leave with exit ``k``'s predictive and the others go on (the last exit
    takes everyone left). Blocks and heads after an input's exit are never computed for it.
    ``calibration`` (an ``ExitCalibration``): its predictive (Laplace, temperature, MIE) gives
    the confidences and the probabilities."""
    check_multi_exit(model, "early exiting")
    backbone, combine = model.backbone, model.combine
    n_exits = backbone.num_exits
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    if thresholds.shape != (n_exits,):
        raise ValueError(f"thresholds must have shape [{n_exits}] (one per exit), got "
                         f"{tuple(thresholds.shape)}")
    device = next(model.parameters()).device
    x = x.to(device)
    n = x.shape[0]
    probs = None  # [N, C], allocated in the network's dtype
    exit_index = torch.full((n,), n_exits - 1, dtype=torch.long, device=device)
    running = torch.arange(n, device=device)
    with _EvalMode(model):
        state, _ = backbone.start(x)
        previous, seen = None, _Seen(calibration)
        for k in range(n_exits):
            state, f, phi = backbone.step(state, k)
            logits = combine.step(previous, f, k)
            p = seen.probs(k, logits, phi)
            if probs is None:
                probs = p.new_empty(n, p.shape[-1])
            if k == n_exits - 1:
                probs[running] = p
                break
            leave = p.max(-1).values.double() >= thresholds[k].item()
            probs[running[leave]] = p[leave]
            exit_index[running[leave]] = k
            stay = ~leave
            running = running[stay]
            if len(running) == 0:
                break
            state, previous = select(state, stay), logits[stay]
            seen.keep(stay)
    return EarlyExitPrediction(probs.cpu(), exit_index.cpu(), thresholds)


class _Seen:
    """What a calibrated predictive needs of the exits an input has passed (features and
    logits of exits ``<= k``, the running MIE sum), for the inputs still running."""

    def __init__(self, calibration):
        self.calibration, self.features, self.logits, self.mie_sum = calibration, [], [], None

    def probs(self, k, logits, phi):
        if self.calibration is None:
            return torch.softmax(logits, -1)
        from .exit_laplace import ExitFeatures

        cal = self.calibration
        self.features.append(phi)
        self.logits.append(logits)
        feats = ExitFeatures(self.features, torch.stack(self.logits), None)
        p = cal.exit_probs(*cal.moments(feats, k), cal.temperature[k]).mean(0)
        if not cal.mie:
            return p.to(logits.dtype)
        w = cal.weights[k]
        self.mie_sum = w * p if self.mie_sum is None else self.mie_sum + w * p
        return (self.mie_sum / cal.weights[: k + 1].sum()).to(logits.dtype)

    def keep(self, stay):
        self.features = [f[stay] for f in self.features]
        self.logits = [f[stay] for f in self.logits]
        if self.mie_sum is not None:
            self.mie_sum = self.mie_sum[stay]
