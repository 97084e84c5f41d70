"""One Pyro model per family, plus deterministic baselines. Priors are constructor arguments."""

from .base import Budget, DynamicModel, PredictiveSamples
from .depth import DepthNet, depth_prior
from .deterministic import DeterministicNet
from .ensemble import DeepEnsemble, MemberGuide, StructuredEnsemble
from .exits import BoostedExits, MultiExitNet
from .nested import NestedNet

__all__ = ["Budget", "DepthNet", "DeterministicNet", "DynamicModel", "NestedNet", "PredictiveSamples",
           "depth_prior"]
__all__ += ["BoostedExits", "MultiExitNet"]
__all__ += ["DeepEnsemble", "MemberGuide", "StructuredEnsemble"]

from .bayesian_exits import BayesianExits  # noqa: E402

__all__ += ["BayesianExits"]
