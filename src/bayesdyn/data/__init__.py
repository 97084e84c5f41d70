"""Datasets (``load``) and out-of-distribution pairs (``load_ood``)."""

from .datasets import DATASETS, DataNotFoundError, DataSplits, load, read_idx, resize
from .ood import DEFAULT_OOD, default_ood, load_ood, ood_names

__all__ = ["DATASETS", "DEFAULT_OOD", "DataNotFoundError", "DataSplits", "default_ood", "load",
           "load_ood",
           "ood_names", "read_idx", "resize"]
