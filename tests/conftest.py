import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def float64():
    """Run a test in double precision (exact comparisons of values and gradients)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def fashion_available() -> bool:
    return os.path.isdir(FASHION) or bool(os.environ.get("BAYESDYN_DATA"))


# Fashion-MNIST is a hard requirement in CI (.ci/run installs it): skip outside CI only.
needs_fashion = pytest.mark.skipif(
    not fashion_available() and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def digits():
    from bayesdyn.data import load

    return load("digits")
