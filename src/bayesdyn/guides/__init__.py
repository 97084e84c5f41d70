"""Guides of the families. Each follows Pyro's autoguide contract (``median()``,
``quantiles()``, composable with ``AutoGuideList``)."""

from .depth import DepthGuide
from .empty import EmptyGuide
from .init import init_to_network, weight_autoguide
from .nested import NestedGuide

__all__ = ["DepthGuide", "EmptyGuide", "NestedGuide", "init_to_network", "weight_autoguide"]
from .exit_heads import ExitHeadsGuide  # noqa: E402
from .laplace import LaplaceWeights  # noqa: E402

__all__ += ["ExitHeadsGuide", "LaplaceWeights"]
