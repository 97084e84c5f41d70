"""Evaluation written once against the budget interface: metrics, OOD, cost, protocols, plots."""

from . import plots
from .cost import forward_flops, marginal_cost, measure, parameter_count, prediction_flops
from .evaluate import evaluate
from .metrics import (
                      accuracy,
                      brier,
                      classification_metrics,
                      ece,
                      entropy,
                      mixture_moments,
                      nll,
                      regression_metrics,
                      reliability,
                      uncertainty,
)
from .ood import SCORES, ood_metrics
from .protocols import (
                        apply_thresholds,
                        budgeted_batch,
                        exit_proportions,
                        flat_curve,
                        pareto_front,
                        select_thresholds,
                        thresholds_per_level,
)

__all__ = ["SCORES", "accuracy", "apply_thresholds", "brier", "budgeted_batch",
           "classification_metrics", "ece", "entropy", "evaluate", "exit_proportions",
           "forward_flops", "marginal_cost", "measure", "mixture_moments", "nll", "ood_metrics",
           "parameter_count", "plots", "prediction_flops", "regression_metrics", "reliability",
           "select_thresholds", "uncertainty"]
__all__ += ["flat_curve", "pareto_front", "thresholds_per_level"]
