"""Out-of-distribution test sets matched to an in-distribution dataset.

Every OOD set is brought to the in-distribution input shape (resized, channels repeated or
averaged) and normalised with the *in-distribution* statistics, as a deployed model would see it.

Pairs:
- another dataset by name, e.g. ``fashion-mnist`` vs ``digits`` (resized to 28x28), ``digits`` vs
  ``fashion-mnist`` (resized to 8x8), ``mnist`` vs ``kmnist``;
- ``rotated``: the in-distribution test set rotated by 90 degrees (a shifted distribution);
- ``inverted``: the in-distribution test set with intensities inverted (1 - x);
- ``noise``: 2,000 smooth random images (uniform pixels, 3x3 box blur, fixed seed): out of
  distribution by construction, for any dataset, with nothing to install.

``default_ood(name)`` is the set ``evaluate`` uses unless told otherwise. For digits it is
Fashion-MNIST reduced to 8x8 when installed, else ``noise``: a rotated digit is often another
plausible digit (6/9, 2/5...), so "rotated" measured familiarity more than novelty.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from .datasets import DATASETS, DataSplits, raw_images, resize

SHIFTS = ("rotated", "inverted")
SYNTHETIC = ("noise",)
DEFAULT_OOD = {"fashion-mnist": "digits", "mnist": "fashion-mnist", "kmnist": "mnist",
               "cifar10": "svhn", "cifar100": "svhn", "svhn": "cifar10"}
NOISE_SIZE = 2000


def ood_names() -> tuple[str, ...]:
    return (*SHIFTS, *SYNTHETIC, *DATASETS)


def default_ood(name: str, root=None) -> str | None:
    """The OOD set ``evaluate`` uses for dataset ``name`` by default (None: none known)."""
    if name == "digits":
        return "fashion-mnist" if fashion_available(root) else "noise"
    return DEFAULT_OOD.get(name)


def fashion_available(root=None) -> bool:
    from .datasets import FASHION_FILES, _find_idx, fashion_search_dirs

    return any(all(_find_idx(folder, stem) for stem in FASHION_FILES.values())
               for folder in fashion_search_dirs(root))


def noise_images(shape: tuple[int, ...], n: int = NOISE_SIZE, seed: int = 0) -> torch.Tensor:
    """Smooth random images ``[n, *shape]`` in [0, 1]: uniform pixels blurred by a 3x3 box."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def load_ood(in_data: DataSplits, name: str, root=None, download: bool = False) -> TensorDataset:
    """OOD inputs ``[N, *in_data.input_shape]`` with labels ``-1`` (they belong to no class)."""
    key = name.lower()
    if key.startswith(f"{in_data.name}-"):  # accept "fashion-mnist-rotated" as well as "rotated"
        key = key[len(in_data.name) + 1 :]
    if key not in ood_names():
        raise ValueError(f"unknown OOD set {name!r}; choose one of {', '.join(ood_names())}")
    if key == in_data.name:
        raise ValueError(f"OOD set {name!r} is the in-distribution dataset itself")
    x_test = in_data.test.tensors[0]
    mean = torch.tensor(in_data.mean, device=x_test.device)[:, None, None]
    std = torch.tensor(in_data.std, device=x_test.device)[:, None, None]
    if key in SHIFTS:
        raw = x_test * std + mean
        x = torch.rot90(raw, 1, dims=(-2, -1)) if key == "rotated" else 1.0 - raw
    elif key == "noise":
        x = noise_images(in_data.input_shape).to(x_test.device)
    else:
        x, _ = raw_images(key, root=root, download=download)
        x = match_shape(x.to(x_test.device), in_data.input_shape)
    x = (x - mean) / std
    return TensorDataset(x, torch.full((len(x),), -1, dtype=torch.int64, device=x.device))


def match_shape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Bring ``[N, C, H, W]`` images in [0, 1] to ``shape = (C', H', W')``."""
    channels, height, _ = shape
    x = resize(x, height)
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    return x.expand(-1, channels, -1, -1).contiguous()
