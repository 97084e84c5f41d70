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
    """The model's budgets with ``flops`` and ``params`` filled in from their sub-networks."""
    budgets = model.budgets(guide) if budgets is None else budgets
    out = []
    for b in budgets:
        sub = model.budget_module(b, guide)
        out.append(dataclasses.replace(b, flops=forward_flops(sub, input_shape),
                                       params=parameter_count(sub)))
    return out


def marginal_cost(model, input_shape, guide=None) -> tuple[int, int]:
    """(flops, params) of the structure-marginalised model (``budget_module(None)``)."""
    sub = model.budget_module(None, guide)
    return forward_flops(sub, input_shape), parameter_count(sub)
