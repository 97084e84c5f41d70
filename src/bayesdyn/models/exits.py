"""Early-exit networks: ``MultiExitNet`` (every exit trained with its own cross-entropy, as
MSDNet) and ``BoostedExits`` (BoostNet, methods.md §3: the exits form an additive model).

With ``f_k`` the logits of exit head ``k`` (k = 1..K) and ``F_k`` exit ``k``'s prediction:

    MultiExitNet:  F_k = f_k
    BoostedExits:  F_k = f_k + sg(gamma_k F_{k-1}),  F_0 = 0      (sg: optional stop-gradient)
    y ~ Categorical(logits = F_k)   observed once per exit

so the negative log-likelihood is ``sum_k CE(y, F_k)``: for BoostedExits this is BoostNet's
``sum_k CE(y, f_k + sg(E_k))`` with ``E_k = gamma_k F_{k-1}``, i.e. ``E_{k+1} = gamma (f_k + E_k)``.
The same ``gamma_k`` builds the history in training and the prediction in evaluation (the
official code shifts the index by one when gamma varies per exit, methods.md §3.8).

Heads and backbone are point estimates (``EmptyGuide``; part 2 makes the heads Bayesian).
Exit ``k`` is budget ``k``: its prediction runs blocks ``1..k`` and heads ``1..k`` (MSDNet's
op-counter convention: an anytime run has computed the earlier exits on its way, and BoostNet's
``F_k`` needs them).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ..guides.empty import EmptyGuide
from ..nn.multiexit import MultiExitStack
from .base import Budget, DynamicModel, PredictiveSamples, classes_of, data_plate


def exit_site(k: int, num_exits: int, kind: str = "y") -> str:
    """Pyro site name of exit ``k`` (0-based): ``y_exit1``, ``y_exit2``, ... and plain ``y`` for
    the last exit (the full network's prediction, which other tools read as the model's ``y``);
    ``kind="probs"`` gives the matching ``pyro.deterministic`` site."""
    return kind if k == num_exits - 1 else f"{kind}_exit{k + 1}"


def check_multi_exit(model, purpose: str) -> None:
    """A clear error when ``model`` is not a ``MultiExitNet`` / ``BoostedExits``."""
    if not isinstance(model, MultiExitNet):
        raise TypeError(f"{purpose} needs a MultiExitNet or BoostedExits, got "
                        f"{type(model).__name__}")


def observe_exits(logits: torch.Tensor, x, y, dataset_size):
    """The exits' likelihood sites: every exit's class probabilities and its ``Categorical``
    observation of ``y`` (``logits [K, B, C]``); returns the last exit's sample."""
    num_exits = len(logits)
    with data_plate(x, dataset_size):
        for k in range(num_exits):
            pyro.deterministic(exit_site(k, num_exits, "probs"), torch.softmax(logits[k], -1),
                               event_dim=1)
            last = pyro.sample(exit_site(k, num_exits), dist.Categorical(logits=logits[k]), obs=y)
    return last


class IndependentExits(nn.Module):
    """``F_k = f_k``: each exit predicts on its own."""

    def step(self, previous: torch.Tensor | None, f: torch.Tensor, k: int) -> torch.Tensor:
        """Exit ``k``'s prediction logits from its head's ``f`` and exit ``k - 1``'s prediction."""
        return f

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Predictions ``[K, ..., C]`` of all exits from the heads' logits ``[K, ..., C]``."""
        out, previous = [], None
        for k in range(f.shape[0]):
            previous = self.step(previous, f[k], k)
            out.append(previous)
        return torch.stack(out)


class BoostedEnsemble(IndependentExits):
    """``F_k = f_k + sg(gamma_k F_{k-1})`` (BoostNet's additive model in logit space)."""

    def __init__(self, gamma: torch.Tensor, stop_gradient: bool = True):
        super().__init__()
        self.register_buffer("gamma", gamma)  # [K - 1]: gamma_k for exits 2..K
        self.stop_gradient = stop_gradient

    def step(self, previous, f, k):
        if k == 0:
            return f
        history = self.gamma[k - 1] * previous
        return f + (history.detach() if self.stop_gradient else history)


class ExitBudget(nn.Module):
    """What exit ``k``'s prediction computes: blocks and heads ``1..k`` -> ``F_k [*lead, B, C]``
    (its parameters are exactly those, for parameter counts)."""

    def __init__(self, backbone: MultiExitStack, combine: IndependentExits, k: int):
        super().__init__()
        self.stack = MultiExitStack(backbone.stem, backbone.blocks[: k + 1],
                                    backbone.heads[: k + 1], backbone.input_ndim)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.stack(x).logits)[-1]


class MultiExitNet(DynamicModel):
    """Pyro model of an early-exit network trained with the sum over exits of cross-entropy
    (the standard training both papers compare against).

    Args:
        backbone: a ``MultiExitStack`` (``bayesdyn.nn.msdnet``, ``multiexit_resnet``,
            ``multiexit_mlp``); its ``gradient_equilibrium`` switch is independent of the family.
        num_classes: number of classes (default: read off the exit heads; checked against them).
        input_shape: shape of one input, e.g. ``(1, 28, 28)``; inputs are checked against it.

    The marginal (``budget=None``) is the last exit. Nothing is latent about the exit here: an
    exit is chosen by the compute budget, not inferred, so there is no posterior over exits to
    average with; the last exit is the full network's prediction (and, for BoostedExits, already
    the ensemble of every head). Averaging exits (Meronen et al.'s model-internal ensemble)
    belongs with the Bayesian heads of part 2.
    """

    def __init__(self, backbone: MultiExitStack, num_classes: int | None = None,
                 input_shape=None):
        super().__init__()
        if not isinstance(backbone, MultiExitStack):
            raise TypeError("backbone must be a bayesdyn.nn.MultiExitStack (msdnet, "
                            "multiexit_resnet or multiexit_mlp)")
        for k, head in enumerate(backbone.heads):  # every exit must predict num_classes
            num_classes = classes_of(head, num_classes, f"head of exit {k + 1}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.combine = IndependentExits()

    @property
    def num_exits(self) -> int:
        return self.backbone.num_exits

    def default_guide(self) -> EmptyGuide:
        return EmptyGuide(self)

    def exit_logits(self, x: torch.Tensor, until: int | None = None) -> torch.Tensor:
        """Predictions ``F_k`` of exits ``0..until`` (default all), ``[until + 1, *lead, B, C]``."""
        return self.combine(self.backbone(x, until).logits)

    # --- Pyro model ---------------------------------------------------------------------------
    def model(self, x, y=None, dataset_size=None):
        return observe_exits(self.exit_logits(x), x, y, dataset_size)

    def fast_loss(self, guide, x, y, dataset_size):
        """``sum_k CE(y, F_k)`` over the batch, scaled by ``N / B`` (Trace_ELBO with the empty
        guide); terms: each exit's share, ``nll_exit{k}``."""
        if type(guide) is not EmptyGuide:
            return NotImplemented
        logits = self.exit_logits(x)  # [K, B, C]
        per_exit = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_exits),
                                   reduction="none").view(self.num_exits, -1).sum(1)
        per_exit = per_exit * (dataset_size / x.shape[0])
        return per_exit.sum(), {f"nll_exit{k + 1}": v for k, v in enumerate(per_exit)}

    # --- budgets and prediction ---------------------------------------------------------------
    def budgets(self, guide=None) -> list[Budget]:
        return [Budget(f"exit {k + 1}", k) for k in range(self.num_exits)]

    def _exit_index(self, budget: Budget | None) -> int:
        if budget is None:
            return self.num_exits - 1
        setting = budget.setting if isinstance(budget, Budget) else budget
        if not isinstance(setting, int) or not 0 <= setting < self.num_exits:
            raise ValueError(f"budget must be one of model.budgets() (exits 0..{self.num_exits - 1}),"
                             f" got {budget!r}")
        return setting

    def budget_module(self, budget: Budget | None, guide=None) -> nn.Module:
        return ExitBudget(self.backbone, self.combine, self._exit_index(budget))

    def head_module(self, budget: Budget, guide=None) -> nn.Module:
        """Empty: a deeper exit reuses everything exit ``k`` computed (its heads included, by
        MSDNet's convention), so budgeted batch charges nothing extra for stopping later."""
        return nn.Sequential()

    @torch.no_grad()
    def component_log_likelihood(self, guide, x, y):
        """The marginal (the last exit) is one point-estimate component: ``log p(y_n | x_n)``
        ``[1, N]`` with log-weight 0, for an exact leave-one-out."""
        loglik = -F.cross_entropy(self.exit_logits(x)[-1], y, reduction="none")
        return loglik.new_zeros(1), loglik[None]

    def predict_probs(self, guide, x, budget=None, num_samples=1) -> PredictiveSamples:
        """Exit ``k``'s ``softmax(F_k)`` (``budget=None``: the last exit), ``[1, B, C]``; runs
        blocks and heads ``1..k`` only. Point estimates: one sample whatever ``num_samples``."""
        k = self._exit_index(budget)
        return PredictiveSamples.equal(torch.softmax(self.exit_logits(x, k)[k], -1)[None])


class BoostedExits(MultiExitNet):
    """BoostNet (Yu et al., AAAI 2023): exit ``k`` predicts ``F_k = f_k + gamma_k F_{k-1}``,
    trained with ``sum_k CE(y, f_k + sg(gamma_k F_{k-1}))`` in one joint step.

    Args:
        backbone, num_classes, input_shape: as ``MultiExitNet``. BoostNet uses gradient
            equilibrium (``msdnet(..., gradient_equilibrium=True)``); it is the backbone's switch.
        gamma: weight of the previous ensemble at each exit, a float (BoostNet: 0.5 everywhere)
            or ``K - 1`` values for exits ``2..K``; ``1 / gamma`` is the paper's temperature.
        stop_gradient: detach the history, so exit ``k``'s loss trains only head ``k`` (and the
            backbone through it), as in gradient boosting; ``False`` lets it reach heads ``< k``.
    """

    def __init__(self, backbone: MultiExitStack, num_classes: int | None = None, gamma=0.5,
                 stop_gradient: bool = True, input_shape=None):
        super().__init__(backbone, num_classes, input_shape)
        self.combine = BoostedEnsemble(self._check_gamma(gamma), bool(stop_gradient))

    def _check_gamma(self, gamma) -> torch.Tensor:
        k = self.num_exits
        gamma = torch.as_tensor(gamma, dtype=torch.get_default_dtype()).detach()
        if gamma.dim() == 0:
            gamma = gamma.expand(max(k - 1, 0)).clone()
        if gamma.shape != (max(k - 1, 0),):
            raise ValueError(f"gamma must be a float or {k - 1} values (exits 2..{k}), got shape "
                             f"{tuple(gamma.shape)}")
        if not torch.isfinite(gamma).all() or (gamma < 0).any():
            raise ValueError(f"gamma must be finite and >= 0, got {gamma.tolist()}")
        return gamma

    @property
    def gamma(self) -> torch.Tensor:
        return self.combine.gamma

    @property
    def stop_gradient(self) -> bool:
        return self.combine.stop_gradient
