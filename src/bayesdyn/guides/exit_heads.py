"""Mean-field Gaussian guide over every exit head's weights of a ``BayesianExits`` model,
trained by SVI with the backbone frozen."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from ..params import RenamedOnCopy, give_unique_name


class ExitHeadsGuide(RenamedOnCopy, PyroModule):
    """``q(W~_k) = N(loc_k, diag(scale_k^2))`` for every exit ``k``, started at the trained
    weights (``loc``) with ``init_scale`` (``scale``). Sites as ``BayesianExits.model``."""

    def __init__(self, model, init_scale: float = 1e-2):
        super().__init__()
        give_unique_name(self)
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.sites = [f"exit{k + 1}.head.weight" for k in range(model.num_exits)]
        values = model.network_values()
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(values[s].clone()) for s in self.sites])
        self.scales = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full_like(values[s], _softplus_inverse(init_scale)))
             for s in self.sites])

    def distributions(self) -> list[dist.Distribution]:
        """``q`` of every exit's head weights (``Normal(...).to_event(2)``)."""
        return [dist.Normal(loc, F.softplus(raw)).to_event(2)
                for loc, raw in zip(self.locs, self.scales, strict=True)]

    def forward(self, x=None, y=None, dataset_size=None):
        for name, param in self.named_parameters():
            pyro.param(f"{self._pyro_name}$$${name}", param)
        return {s: pyro.sample(s, q) for s, q in zip(self.sites, self.distributions(), strict=True)}

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The posterior means (= medians) of every head."""
        return {s: loc.detach() for s, loc in zip(self.sites, self.locs, strict=True)}


def _softplus_inverse(y: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(y, dtype=torch.float64))))

