"""q(d): a categorical posterior over depth, enumerated exactly."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoGuide
from torch import nn

from ..params import RenamedOnCopy, give_unique_name


class DepthGuide(RenamedOnCopy, AutoGuide):
    """``q(d) = Categorical(logits=alpha)`` over ``d = 0..D``.

    The site is marked for parallel enumeration, so ``TraceEnum_ELBO`` computes the expectation
    over ``d`` and ``KL(q || p)`` exactly; ``Predictive`` draws ``d`` from ``q``. Compose it with
    Pyro autoguides for weight sites through ``AutoGuideList``.

    Args:
        model: the ``DepthNet`` (or a ``poutine.block``-ed view of it exposing ``"depth"``).
        num_depths: ``D + 1``; read from the model when it is a ``DepthNet``.
        init_logits: initial ``alpha`` (default zeros: uniform, as in VDS/DUN).
    """

    site = "depth"

    def __init__(self, model, num_depths: int | None = None, init_logits=None):
        super().__init__(model)
        give_unique_name(self)  # its own prefix in Pyro's param store
        if num_depths is None:
            num_depths = getattr(model, "num_depths", None)
        if num_depths is None:
            raise ValueError("DepthGuide needs num_depths when the model is not a DepthNet")
        init = torch.zeros(num_depths) if init_logits is None else torch.as_tensor(init_logits)
        if init.shape != (num_depths,):
            raise ValueError(f"init_logits must have shape [{num_depths}], got {tuple(init.shape)}")
        self.logits = nn.Parameter(init.clone().to(torch.get_default_dtype()))

    def forward(self, *args, **kwargs):
        d = pyro.sample(self.site, dist.Categorical(logits=self.logits),
                        infer={"enumerate": "parallel"})
        return {self.site: d}

    def log_probs(self) -> torch.Tensor:
        """``log q(d)``, ``[D + 1]``."""
        return torch.log_softmax(self.logits, -1)

    def probs(self) -> torch.Tensor:
        """``q(d)``, ``[D + 1]``."""
        return torch.softmax(self.logits, -1)

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The posterior median depth (smallest ``d`` with ``q(D <= d) >= 0.5``)."""
        return {self.site: self.quantiles([0.5])[self.site][0]}

    @torch.no_grad()
    def quantiles(self, quantiles, *args, **kwargs) -> dict[str, torch.Tensor]:
        cdf = self.probs().cumsum(-1)
        qs = torch.as_tensor(quantiles, dtype=cdf.dtype, device=cdf.device)
        return {self.site: torch.searchsorted(cdf, qs.clamp(max=1 - 1e-6))}

    def mode(self) -> int:
        return int(self.logits.argmax())
