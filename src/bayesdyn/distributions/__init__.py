"""Ordering distributions for nested (ordered) units: priors, variational families and the
Downhill relaxation (all Pyro ``TorchDistribution``s); priors over Bayesian layers' weights."""

from .ordering import (
                       CategoricalOrdering,
                       Downhill,
                       OrderingDistribution,
                       ProbsAsLogitsDownhill,
                       StickBreakingOrdering,
                       TruncatedGeometric,
                       ordering_from_probs,
)
from .weight_priors import (
                            ARDPrior,
                            GaussianPrior,
                            LogUniformPrior,
                            SurvivalWeighted,
                            SymmetricLogUniform,
                            WeightPrior,
                            weight_prior,
)

__all__ = ["ARDPrior", "CategoricalOrdering", "Downhill", "GaussianPrior", "LogUniformPrior",
           "OrderingDistribution",
           "ProbsAsLogitsDownhill", "StickBreakingOrdering", "SurvivalWeighted",
           "SymmetricLogUniform", "TruncatedGeometric", "WeightPrior", "ordering_from_probs",
           "weight_prior"]
