"""Guides of the families. Each follows Pyro's autoguide contract (``median()``,
``quantiles()``, composable with ``AutoGuideList``)."""

from .depth import DepthGuide
from .empty import EmptyGuide
from .nested import NestedGuide

__all__ = ["DepthGuide", "EmptyGuide", "NestedGuide"]
