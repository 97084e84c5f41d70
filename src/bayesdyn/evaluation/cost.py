"""Forward FLOPs and parameter counts, measured on the actual sub-network.

FLOPs come from PyTorch's ``FlopCounterMode`` (multiply-add = 2 FLOPs; elementwise ops, BN and
activations are not counted, as in most papers' conventions) on a batch of one example.
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


def measure(model, input_shape, guide=None, budgets=None) -> list:
    """The model's budgets with ``flops`` and ``params`` of their sub-networks, and
    ``info["cumulative_flops"]``: the cost of trying budgets cheapest-first up to this one (for
    budgeted batch), reusing shared computation where ``model.head_module`` says it can."""
    budgets = model.budgets(guide) if budgets is None else budgets
    out, spent = [], 0  # FLOPs of earlier budgets that the next one does not reuse
    for b in budgets:
        sub = model.budget_module(b, guide)
        flops = forward_flops(sub, input_shape)
        out.append(dataclasses.replace(b, flops=flops, params=parameter_count(sub),
                                       info={**b.info, "cumulative_flops": spent + flops}))
        head = model.head_module(b, guide)
        spent += flops if head is None else _head_flops(model, b, head, input_shape, guide)
    return out


def _head_flops(model, budget, head, input_shape, guide) -> int:
    """FLOPs of a head, measured on the activation that feeds it (captured with a hook)."""
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


def marginal_cost(model, input_shape, guide=None) -> tuple[int, int]:
    """(flops, params) of the structure-marginalised model (``budget_module(None)``)."""
    sub = model.budget_module(None, guide)
    return forward_flops(sub, input_shape), parameter_count(sub)
