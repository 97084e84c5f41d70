"""Ordering distributions for nested (ordered) units: priors, variational families and the
Downhill relaxation. All are Pyro ``TorchDistribution``s."""

from .ordering import (
                       Downhill,
                       OrderingDistribution,
                       StickBreakingOrdering,
                       TruncatedGeometric,
                       ordering_from_probs,
)

__all__ = ["Downhill", "OrderingDistribution", "StickBreakingOrdering", "TruncatedGeometric",
           "ordering_from_probs"]
