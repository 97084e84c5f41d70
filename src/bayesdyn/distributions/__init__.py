"""Ordering distributions for nested (ordered) units: priors, variational families and the
Downhill relaxation (all Pyro ``TorchDistribution``s); priors over Bayesian layers' weights."""

from .ordering import (
                       Downhill,
                       OrderingDistribution,
                       StickBreakingOrdering,
                       TruncatedGeometric,
                       ordering_from_probs,
)
from .weight_priors import (
                            ARDPrior,
                            GaussianPrior,
                            LogUniformPrior,
                            SymmetricLogUniform,
                            WeightPrior,
                            weight_prior,
)

__all__ = ["ARDPrior", "Downhill", "GaussianPrior", "LogUniformPrior", "OrderingDistribution",
           "StickBreakingOrdering", "SymmetricLogUniform", "TruncatedGeometric", "WeightPrior",
           "ordering_from_probs", "weight_prior"]
