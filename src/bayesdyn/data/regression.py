"""Regression datasets: scikit-learn's bundled diabetes data and a 1-D toy set, both offline.

Inputs are standardised per feature and targets per dataset, with the training split's
statistics; ``DataSplits.target_mean``/``target_std`` undo the target scaling, so metrics can be
reported in the original units (as DUN's tables do).
"""

from __future__ import annotations

import torch

REGRESSION = ("diabetes", "toy-1d")


def regression_arrays(name: str, seed: int, test_fraction: float = 0.2):
    """``((x_train, y_train), (x_test, y_test))``, unscaled; the test split depends on ``seed``
    (one seed, one of the standard random splits)."""
    if name == "diabetes":
        from sklearn.datasets import load_diabetes

        bunch = load_diabetes(scaled=False)
        x = torch.tensor(bunch.data, dtype=torch.float32)
        y = torch.tensor(bunch.target, dtype=torch.float32)
    elif name == "toy-1d":
        x, y = toy_1d(600, seed=1234)  # the same data for every split seed
    else:
        raise ValueError(f"unknown regression dataset {name!r}; choose one of {REGRESSION}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(20_000 + seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def toy_1d(n: int, seed: int = 0, noise: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~ U([-3, -1] ∪ [1, 3])`` (a gap in the middle, where a good predictive should widen),
    ``y = x sin(x) + noise``: ``x [n, 1]``, ``y [n]``."""
    g = torch.Generator().manual_seed(seed)
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = side * (1 + 2 * torch.rand(n, generator=g))
    y = toy_1d_mean(x) + noise * torch.randn(n, generator=g)
    return x[:, None], y


def toy_1d_mean(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sin(x)
