"""Training (``fit``), prediction (``predict``), checkpoints and ArviZ export."""

from ..validation import check_inputs, resolve_device
from .checkpoint import atomic_save, load_checkpoint
from .continual import ContinualSubnets, run_continual, split_tasks
from .dynamic import EarlyExitPrediction, exit_confidences, fit_thresholds, predict_early_exit
from .fit import FitConfig, History, TrainingDivergedError, fit
from .predict import NormalMixture, Prediction, predict, predict_normal
from .subnets import (
    MaskSearch,
    channel_importance,
    gaussian_mmd,
    official_mmd,
    prune,
    structured_subnetworks,
    total_divergence,
)

__all__ = ["FitConfig", "History", "NormalMixture", "Prediction", "TrainingDivergedError", "atomic_save",
           "check_inputs", "fit", "load_checkpoint", "loo", "predict", "predict_normal", "resolve_device",
           "to_datatree"]
__all__ += ["EarlyExitPrediction", "exit_confidences", "fit_thresholds", "predict_early_exit"]
__all__ += ["ContinualSubnets", "MaskSearch", "channel_importance", "gaussian_mmd", "official_mmd",
            "prune", "run_continual", "split_tasks", "structured_subnetworks", "total_divergence"]

from .exit_laplace import ExitCalibration, calibrate_variants, laplace  # noqa: E402
from .lastlayer import HeadLaplace  # noqa: E402

__all__ += ["ExitCalibration", "HeadLaplace", "calibrate_variants", "laplace"]


def __getattr__(name):  # ArviZ is imported only when the export is used
    if name == "to_datatree":
        from .datatree import to_datatree

        return to_datatree
    if name == "loo":
        from .model_comparison import loo

        return loo
    raise AttributeError(name)
