"""Forward FLOPs and parameter counts, measured on what actually runs.

FLOPs come from PyTorch's ``FlopCounterMode`` (multiply-add = 2 FLOPs; elementwise ops, BN and
activations are not counted, as in most papers' conventions) on a batch of one example. The cost
reported next to a budget's metrics is that of the predictive that produced them: the model's
``predict_probs`` at that budget with the same number of samples, so Monte Carlo predictives pay
per sample and a marginal pays for every structure it averages.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_flops(module: nn.Module, input_shape: tuple[int, ...], device=None) -> int:
    """Forward FLOPs per example of ``module`` on one input ``[1, *input_shape]`` (eval mode)."""
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            module(torch.zeros(1, *input_shape, device=device))
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def parameter_count(module: nn.Module) -> int:
    """Number of parameters the module holds (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@torch.no_grad()
def prediction_flops(model, input_shape, guide=None, budget=None, num_samples: int = 8) -> int:
    """Forward FLOPs per example of ``model.predict_probs(guide, x, budget, num_samples)``: the
    whole predictive at ``budget`` (``None``: the structure-marginalised one), in eval mode."""
    from ..inference.predict import _EvalMode  # inference imports evaluation

    guide = model.default_guide() if guide is None else guide
    x = torch.zeros(1, *input_shape, device=_device(model))
    counter = FlopCounterMode(display=False)
    with _EvalMode(model, guide), counter:
        if getattr(model, "likelihood", "classification") == "regression":
            model.regression_mixture(guide, x, budget)
        else:
            model.predict_probs(guide, x, budget=budget, num_samples=num_samples)
    return int(counter.get_total_flops())


def measure(model, input_shape, guide=None, budgets=None, num_samples: int = 8) -> list:
    """The model's budgets with ``flops`` (of the predictive at that budget with
    ``num_samples`` draws), ``params`` (of its sub-network) and ``info["cumulative_flops"]``: the
    cost of trying budgets cheapest-first up to this one (for budgeted batch), reusing shared
    computation where ``model.head_module`` says it can."""
    guide = model.default_guide() if guide is None else guide
    budgets = model.budgets(guide) if budgets is None else budgets
    out, spent = [], 0  # FLOPs of earlier budgets that the next one does not reuse
    for b in budgets:
        flops = prediction_flops(model, input_shape, guide, b, num_samples)
        params = parameter_count(model.budget_module(b, guide))
        out.append(dataclasses.replace(b, flops=flops, params=params,
                                       info={**b.info, "cumulative_flops": spent + flops}))
        head = model.head_module(b, guide)
        spent += flops if head is None else _head_flops(model, b, head, input_shape, guide)
    return out


def _device(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _head_flops(model, budget, head, input_shape, guide) -> int:
    """FLOPs of a head, measured on the activation that feeds it (captured with a hook). An empty
    ``nn.Sequential`` is a head that costs nothing extra (a deeper budget reuses all of this one's
    work, as in multi-exit nets whose exit cost already counts the earlier heads)."""
    if isinstance(head, torch.nn.Sequential) and len(head) == 0:
        return 0
    captured = {}
    first = head[0] if isinstance(head, torch.nn.Sequential) else head  # a module the net calls
    hook = first.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            sub = model.budget_module(budget, guide)
            was_training = sub.training
            sub.eval()
            sub(torch.zeros(1, *input_shape, device=next(sub.parameters()).device))
            sub.train(was_training)
    finally:
        hook.remove()
    return forward_flops(head, tuple(captured["x"].shape[1:]))


def marginal_cost(model, input_shape, guide=None, num_samples: int = 8) -> tuple[int, int]:
    """(flops, params) of the structure-marginalised predictive with ``num_samples`` draws
    (params: of ``budget_module(None)``, the network it needs)."""
    guide = model.default_guide() if guide is None else guide
    flops = prediction_flops(model, input_shape, guide, None, num_samples)
    return flops, parameter_count(model.budget_module(None, guide))
