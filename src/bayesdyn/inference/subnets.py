"""Structured sub-networks from one untrained network (Structured Ensembles, methods.md §5.2).

1. **Mask stage** (``MaskSearch``, trained by ``fit``): the untrained weights ``W0`` are frozen;
   each member ``m`` has a trainable scale ``s_{l,m}`` per channel of every unit ``l``. A batch
   is cut into ``M`` chunks, member ``m`` processes chunk ``m`` (one vectorised forward), and the
   loss is ``CE + w / (sum_l sum_{m<m'} D(s_{l,m}, s_{l,m'}) + 1e-12)``.
2. **Importance** (``channel_importance``): the mean over minibatches of ``|dL/ds|`` with every
   member given the whole batch and ``L = CE(y, mean_m logits_m)``, BatchNorm on the batch's
   statistics per member (the official code ran it on freshly reset running statistics, §5.7
   bug 4).
3. **Pruning** (``prune``): global (one ranking over a member's channels, importances normalised
   by their sum) or local (per unit), a fraction ``q`` pruned, at least one channel per unit.
4. **Extraction** (``structured_subnetworks``): each member becomes a physically smaller dense
   ``StackedNet`` with weights copied from ``W0`` (or re-initialised).

The scale multiplies a unit's channels *after* BatchNorm: before it, batch statistics would
divide the scale out again and it could not tell channels apart.
"""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import DynamicModel
from ..nn.members import StackedNet, extract, stack_members

DIVERGENCES = ("gaussian", "official")
MASK_PARAMETRISATIONS = ("weights", "normal")


def official_mmd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The released code's discrepancy of two mask vectors (methods.md §5.2, §5.7 bug 8):
    ``mean k(a, a) + mean k(b, b) - 2 mean k(a, b)`` with the vector "kernel"
    ``k(a, b)_i = exp(-mean_j (a_i - b_j)^2 / len(a))`` (the mean inside the exponential).
    Asymmetric and possibly negative."""

    def k(u, v):
        return torch.exp(-(u[:, None] - v[None, :]).pow(2).mean(1) / u.shape[0]).mean()

    return k(a, a) + k(b, b) - 2 * k(a, b)


def gaussian_mmd(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 1.0) -> torch.Tensor:
    """The standard (biased, V-statistic) squared MMD between the empirical distributions of the
    entries of ``a`` and ``b`` under ``k(u, v) = exp(-(u - v)^2 / (2 bandwidth^2))``: symmetric
    and >= 0."""

    def k(u, v):
        return torch.exp(-(u[:, None] - v[None, :]).pow(2) / (2 * bandwidth ** 2)).mean()

    return k(a, a) + k(b, b) - 2 * k(a, b)


def total_divergence(scales, kind: str = "gaussian", bandwidth: float = 1.0) -> torch.Tensor:
    """``sum_l sum_{m < m'} D(s_{l,m}, s_{l,m'})`` over the units' scales ``[M, C_l]``."""
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    total = scales[0].new_zeros(())
    for s in scales:
        for m in range(s.shape[0]):
            for n in range(m + 1, s.shape[0]):
                total = total + (official_mmd(s[m], s[n]) if kind == "official"
                                 else gaussian_mmd(s[m], s[n], bandwidth))
    return total


class MaskSearch(DynamicModel):
    """Stage 1 as a Pyro model that ``fit`` trains: ``M`` copies of the frozen untrained network
    with trainable channel scales; ``y`` of chunk ``m`` ~ ``Categorical(member m's logits)`` and
    ``pyro.factor`` adds ``-w N / (divergence + 1e-12)`` (``N``: the dataset size, so that per
    example it is the paper's ``w / (...)``).

    Args:
        base: the untrained network (a one-member ``StackedNet``).
        members: ``M``.
        divergence: ``"gaussian"`` (default: the standard Gaussian-kernel MMD, symmetric and >= 0,
            so the inverse is a bounded push apart) or ``"official"`` (the released code's
            discrepancy, which can be negative and make ``1 / D`` blow up).
        divergence_weight: ``w`` (paper: 0.01); 0 turns the diversity term off.
        parametrisation: ``"weights"`` (plain scalars, N(0, 1) init, the released configs) or
            ``"normal"`` (reparameterised ``s = mu + sigma eps`` per step; ``mu`` N(0, 1) init).
    """

    def __init__(self, base: StackedNet, members: int, divergence: str = "gaussian",
                 divergence_weight: float = 0.01, parametrisation: str = "weights",
                 bandwidth: float = 1.0):
        super().__init__()
        if base.members != 1:
            raise ValueError("base must be a one-member StackedNet (the untrained network)")
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be an integer >= 1, got {members}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        if parametrisation not in MASK_PARAMETRISATIONS:
            raise ValueError(f"parametrisation must be one of {MASK_PARAMETRISATIONS}, got "
                             f"{parametrisation!r}")
        if not math.isfinite(divergence_weight) or divergence_weight < 0:
            raise ValueError(f"divergence_weight must be finite and >= 0, got {divergence_weight}")
        self.net = stack_members([base] * members)
        self.net.requires_grad_(False)  # W0 (and BatchNorm's affine) stay as initialised
        self.num_members, self.num_classes = members, base.spec.num_classes
        self.input_shape = tuple(base.spec.input_shape)
        self.divergence, self.divergence_weight = divergence, float(divergence_weight)
        self.parametrisation, self.bandwidth = parametrisation, bandwidth
        device = base.classifier_bias.device
        self.loc = nn.ParameterList([nn.Parameter(torch.randn(members, w, device=device))
                                     for w in base.spec.widths])
        if parametrisation == "normal":
            self.log_scale = nn.ParameterList([nn.Parameter(torch.full((members, w), -2.0,
                                                                       device=device))
                                               for w in base.spec.widths])

    def scales(self, sample: bool = True) -> list[torch.Tensor]:
        """The channel scales ``[M, C_l]`` per unit (``sample=False``: the means)."""
        if self.parametrisation == "weights" or not sample:
            return list(self.loc)
        return [mu + ls.exp() * torch.randn_like(mu) for mu, ls in zip(self.loc, self.log_scale,
                                                                       strict=True)]

    def chunks(self, x, y):
        """Member ``m`` gets rows ``[m b, (m + 1) b)``, ``b = B // M``; the ``B mod M`` rows left
        over are dropped from this step (the official code gave them member 0's masks, and
        failed for ``B < M``; here a batch smaller than ``M`` gives member ``m`` row
        ``m mod B``)."""
        m = self.num_members
        if x.shape[0] < m:
            index = torch.arange(m, device=x.device) % x.shape[0]
            return x[index].unsqueeze(1), y[index].unsqueeze(1)
        b = x.shape[0] // m
        return x[: m * b].reshape(m, b, *x.shape[1:]), y[: m * b].reshape(m, b)

    def _terms(self, x, y, dataset_size):
        xs, ys = self.chunks(x, y)
        scales = self.scales()
        logits = self.net(xs, scales)  # [M, b, C]: one vectorised forward
        penalty = logits.new_zeros(())
        if self.num_members > 1 and self.divergence_weight > 0:  # one member: no pair, no term
            penalty = self.divergence_weight / (total_divergence(scales, self.divergence,
                                                                 self.bandwidth) + 1e-12)
        return logits, ys, penalty * (dataset_size or x.shape[0])

    def model(self, x, y=None, dataset_size=None):
        if y is None:
            raise ValueError("the mask stage needs labels")
        logits, ys, penalty = self._terms(x, y, dataset_size)
        pyro.factor("diversity", -penalty)
        rows = ys.numel()
        scaled = rows if dataset_size is None else dataset_size
        with pyro.plate("data", scaled, subsample=torch.arange(rows, device=x.device)):
            return pyro.sample("y", dist.Categorical(logits=logits.flatten(0, 1)),
                               obs=ys.flatten())

    def default_guide(self):
        from ..guides.empty import EmptyGuide

        return EmptyGuide(self)

    def fast_loss(self, guide, x, y, dataset_size):
        """The negative of the model's log joint (Trace_ELBO with the empty guide)."""
        from ..guides.empty import EmptyGuide

        if type(guide) is not EmptyGuide:
            return NotImplemented
        logits, ys, penalty = self._terms(x, y, dataset_size)
        nll = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum")
        nll = nll * (dataset_size / ys.numel())
        return nll + penalty, {"nll": nll, "diversity": penalty}

    def predict_probs(self, guide, x, budget=None, num_samples=1):
        raise NotImplementedError("MaskSearch is the mask stage, not a predictive model")


def channel_importance(search: MaskSearch, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int = 256) -> list[torch.Tensor]:
    """Mean over minibatches of ``|dL/ds_{l,m}|`` at the trained scales, ``[M, C_l]`` per unit,
    with every member given the whole minibatch and ``L = CE(y, mean_m logits_m)``. BatchNorm
    uses each member's batch statistics (on a copy of the network: nothing is changed)."""
    net = copy.deepcopy(search.net).train()
    scales = [s.detach().clone().requires_grad_() for s in search.scales(sample=False)]
    totals = [torch.zeros_like(s) for s in scales]
    batches = 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if len(xb) < 2 and batches:  # BatchNorm needs two rows; a last single row is skipped
            continue
        loss = F.cross_entropy(net(xb, scales).mean(0), yb)
        for total, grad in zip(totals, torch.autograd.grad(loss, scales), strict=True):
            total += grad.abs()
        batches += 1
    return [t / batches for t in totals]


def prune(importances, q: float, scope: str = "global") -> list[torch.Tensor]:
    """One member's kept channels (sorted ``LongTensor`` per unit) from its importances
    (``[C_l]`` per unit): the fraction ``q`` with the lowest importance is pruned, globally
    (importances divided by their sum, one ranking over all units) or locally (per unit,
    ``round(q C_l)`` each); every unit keeps at least its most important channel."""
    if not 0 <= q < 1:
        raise ValueError(f"the pruned fraction q must be in [0, 1), got {q}")
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    keep = []
    if scope == "local":
        for imp in importances:
            n = imp.numel()
            drop = min(round(q * n), n - 1)
            keep.append(torch.argsort(imp, stable=True)[drop:].sort().values)
        return keep
    flat = torch.cat([imp.flatten() for imp in importances])
    flat = flat / flat.sum().clamp_min(torch.finfo(flat.dtype).tiny)
    kept = torch.ones_like(flat, dtype=torch.bool)
    kept[torch.argsort(flat, stable=True)[: round(q * flat.numel())]] = False
    start = 0
    for imp in importances:
        part = kept[start:start + imp.numel()]
        if not part.any():
            part[imp.argmax()] = True
        keep.append(part.nonzero().flatten())
        start += imp.numel()
    return keep


def structured_subnetworks(base: StackedNet, x: torch.Tensor, y: torch.Tensor, members: int = 3,
                           q: float = 0.5, scope: str = "global", mask_epochs: int = 10,
                           reinit: bool = False, batch_size: int = 128, lr: float = 1e-3,
                           seed: int = 0, device="cpu", **mask_options):
    """Stages 1-4 on training data ``x, y``: returns ``(members, report)`` with ``members`` the
    extracted one-member ``StackedNet``s (weights copied from ``base``, or re-initialised with
    ``reinit``) and ``report`` holding ``scales``, ``importances`` (``[M, C_l]`` per unit),
    ``kept`` (per member, per unit) and the mask stage's ``history``. ``mask_options`` go to
    ``MaskSearch`` (divergence, divergence_weight, parametrisation, bandwidth)."""
    from .fit import fit

    search = MaskSearch(base, members, **mask_options)
    history = None
    if mask_epochs > 0:
        history = fit(search, search.default_guide(), (x, y), epochs=mask_epochs,
                      batch_size=batch_size, lr=lr, seed=seed, device=device, progress=False)
    search = search.cpu() if x.device.type == "cpu" else search
    importances = channel_importance(search, x.to(search.loc[0].device),
                                     y.to(search.loc[0].device))
    kept = [prune([imp[m] for imp in importances], q, scope) for m in range(members)]
    source = base
    if reinit:
        source = StackedNet(base.spec, 1).to(base.classifier_bias.device)
    nets = [extract(source, k) for k in kept]
    report = {"scales": [s.detach().cpu() for s in search.scales(sample=False)],
              "importances": [i.cpu() for i in importances],
              "kept": [[k.cpu() for k in member] for member in kept],
              "history": history.epochs if history is not None else []}
    return nets, report
