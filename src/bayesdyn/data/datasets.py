"""Datasets as in-memory tensors with a fixed, seeded train/val/test split.

Small image datasets are held as normalised float tensors (``TensorDataset``), so a training
loop indexes them directly (on the GPU when training there) instead of re-reading them through a
DataLoader every step.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .regression import REGRESSION, regression_arrays

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
# torchvision datasets that need a download; (class name, constructor style, channels, size).
TORCHVISION = {
    "mnist": ("MNIST", "train", 1, 28),
    "kmnist": ("KMNIST", "train", 1, 28),
    "cifar10": ("CIFAR10", "train", 3, 32),
    "cifar100": ("CIFAR100", "train", 3, 32),
    "svhn": ("SVHN", "split", 3, 32),
}
DATASETS = ("digits", "fashion-mnist", *TORCHVISION, *REGRESSION)


class DataNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are not where we looked; the message says how to get them."""


@dataclass
class DataSplits:
    """A dataset split three ways. ``x`` tensors are float32, ``[N, C, H, W]`` images normalised
    per channel or ``[N, D]`` vectors standardised per feature (``mean``/``std`` of the training
    split). Classification: ``y`` is ``[N]`` int64 and ``num_classes`` its count. Regression
    (``num_classes`` None): ``y`` is ``[N]`` float32, standardised; ``target_mean`` and
    ``target_std`` give back the original units."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int | None
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def task(self) -> str:
        return "classification" if self.num_classes is not None else "regression"

    def to(self, device: torch.device | str) -> DataSplits:
        """The same splits with every tensor moved to ``device``."""
        move = lambda ds: TensorDataset(*(t.to(device) for t in ds.tensors))  # noqa: E731
        return replace(self, train=move(self.train), val=move(self.val), test=move(self.test))

    def __repr__(self) -> str:
        sizes = f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)}"
        kind = f"classes={self.num_classes}" if self.num_classes else "regression"
        return f"DataSplits({self.name!r}, {sizes}, {kind}, shape={self.input_shape})"


def load(
    name: str,
    root: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    image_size: int | None = None,
) -> DataSplits:
    """Load ``name`` with a seeded train/val split of the training data.

    Args:
        name: one of ``DATASETS``: ``digits`` (scikit-learn's bundled 8x8 digits, the offline
            default), ``fashion-mnist`` (IDX files), a torchvision dataset (``mnist``,
            ``kmnist``, ``cifar10``, ``cifar100``, ``svhn``) that needs ``download=True`` once,
            or a regression set (``diabetes``: scikit-learn's bundled 442 patients x 10
            features; ``toy-1d``: a 1-D curve with a gap), with a seeded 20 % test split.
        root: folder with the files. Fashion-MNIST is looked for in ``root``, else
            ``$BAYESDYN_DATA``, else ``/usr/share/datasets/fashion-mnist`` (Debian package
            ``dataset-fashion-mnist``).
        val_fraction: share of the training data held out for validation (0 <= f < 1).
        seed: seed of the split permutations (the same seed, the same split; for digits and
            the regression sets it also picks the test split).
        download: allow torchvision to download into ``root`` (default ``~/.cache/bayesdyn``).
        image_size: resize images to ``image_size`` x ``image_size`` (e.g. 28 for digits next to
            MNIST-shaped data).
    """
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if key in REGRESSION:
        (x_tr, y_tr), (x_te, y_te) = regression_arrays(key, seed)
        return _split_and_standardise(key, x_tr, y_tr, x_te, y_te, val_fraction, seed)
    if key == "digits":
        (x_tr, y_tr), (x_te, y_te) = _digits_arrays(seed)
    elif key == "fashion-mnist":
        (x_tr, y_tr), (x_te, y_te) = _fashion_arrays(root)
    else:
        (x_tr, y_tr), (x_te, y_te) = _torchvision_arrays(key, root, download)
    return _split_and_normalise(key, x_tr, y_tr, x_te, y_te, val_fraction, seed, image_size)


def raw_images(name: str, root=None, download: bool = False, seed: int = 0) -> tuple:
    """Unnormalised ``(x [N, C, H, W] in [0, 1], y)`` test images of a dataset, for OOD sets."""
    key = name.lower()
    if key == "digits":  # all 1,797 images: the digits are never in-distribution when used here
        (x_tr, y_tr), (x_te, y_te) = _digits_arrays(seed)
        return torch.cat([x_tr, x_te]), torch.cat([y_tr, y_te])
    if key == "fashion-mnist":
        return _fashion_arrays(root)[1]
    if key in TORCHVISION:
        return _torchvision_arrays(key, root, download)[1]
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _split_and_normalise(name, x_tr, y_tr, x_te, y_te, val_fraction, seed, image_size):
    if image_size is not None:
        x_tr, x_te = resize(x_tr, image_size), resize(x_te, image_size)
    perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(x_tr)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    train_x = x_tr[train_idx]
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    norm = lambda x: (x - mean[:, None, None]) / std[:, None, None]  # noqa: E731
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return DataSplits(
        name=name,
        train=TensorDataset(norm(train_x), y_tr[train_idx]),
        val=TensorDataset(norm(x_tr[val_idx]), y_tr[val_idx]),
        test=TensorDataset(norm(x_te), y_te),
        num_classes=num_classes,
        input_shape=tuple(x_tr.shape[1:]),
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
    )


def _split_and_standardise(name, x_tr, y_tr, x_te, y_te, val_fraction, seed):
    """Vector inputs and real targets: features and targets standardised on the training split."""
    perm = torch.randperm(len(x_tr), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(x_tr)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_mean, x_std = x_tr[train_idx].mean(0), x_tr[train_idx].std(0).clamp_min(1e-6)
    y_mean, y_std = float(y_tr[train_idx].mean()), float(y_tr[train_idx].std().clamp_min(1e-6))
    pair = lambda x, y: TensorDataset((x - x_mean) / x_std, (y - y_mean) / y_std)  # noqa: E731
    return DataSplits(name=name, train=pair(x_tr[train_idx], y_tr[train_idx]),
                      val=pair(x_tr[val_idx], y_tr[val_idx]), test=pair(x_te, y_te),
                      num_classes=None, input_shape=tuple(x_tr.shape[1:]),
                      mean=tuple(x_mean.tolist()), std=tuple(x_std.tolist()),
                      target_mean=y_mean, target_std=y_std)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``[N, C, H, W]`` images to ``size`` x ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _digits_arrays(seed: int, test_fraction: float = 0.2):
    """scikit-learn's 1,797 digits as ``[N, 1, 8, 8]`` in [0, 1]; a seeded 20 % test split
    (the dataset ships without one)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # A different stream from the train/val split's, so changing val_fraction keeps the test set.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(10_000 + seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def fashion_search_dirs(root=None) -> list[Path]:
    """Folders searched for the Fashion-MNIST IDX files, in order."""
    dirs = [Path(root)] if root is not None else []
    if os.environ.get("BAYESDYN_DATA"):
        env = Path(os.environ["BAYESDYN_DATA"])
        dirs += [env / "fashion-mnist", env]
    if root is None:
        dirs.append(FASHION_SYSTEM_DIR)
    return dirs


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / "raw" / stem,
                      folder / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_arrays(root):
    searched = fashion_search_dirs(root)
    for folder in searched:
        paths = {k: _find_idx(folder, stem) for k, stem in FASHION_FILES.items()}
        if all(paths.values()):
            x_tr = torch.from_numpy(read_idx(paths["train_x"])).float().div_(255).unsqueeze(1)
            x_te = torch.from_numpy(read_idx(paths["test_x"])).float().div_(255).unsqueeze(1)
            y_tr = torch.from_numpy(read_idx(paths["train_y"]).astype(np.int64))
            y_te = torch.from_numpy(read_idx(paths["test_y"]).astype(np.int64))
            return (x_tr, y_tr), (x_te, y_te)
    looked = "\n  ".join(str(p) for p in searched)
    files = ", ".join(f"{s}[.gz]" for s in FASHION_FILES.values())
    raise DataNotFoundError(
        f"Fashion-MNIST not found. Looked for {files} in:\n  {looked}\n"
        "Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four "
        "files from https://github.com/zalandoresearch/fashion-mnist into a folder and pass "
        "--data-root FOLDER (or set BAYESDYN_DATA)."
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain): magic, dims as big-endian int32, then uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(f"{path} is truncated: {len(data) - offset} bytes of data, {expected} expected")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(tuple(dims)).copy()


def default_download_root() -> Path:
    return Path(os.environ.get("BAYESDYN_DATA", Path.home() / ".cache" / "bayesdyn"))


def _torchvision_arrays(name, root, download):
    import torchvision

    cls_name, style, _, _ = TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    folder = Path(root) if root is not None else default_download_root()

    def get(train: bool):
        kwargs = {"train": train} if style == "train" else {"split": "train" if train else "test"}
        try:
            return cls(str(folder), download=download, **kwargs)
        except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True"
            raise DataNotFoundError(
                f"{name} not found under {folder} ({err}). Pass --download (download=True) to fetch "
                f"it, or --data-root pointing at a folder that holds torchvision's {cls_name} files."
            ) from err
        except OSError as err:  # download attempted without a network
            raise DataNotFoundError(
                f"could not download {name} into {folder}: {err}. Check the network, or copy "
                f"torchvision's {cls_name} files there and run without --download."
            ) from err

    return _torchvision_to_tensors(get(True)), _torchvision_to_tensors(get(False))


def _torchvision_to_tensors(ds):
    data = ds.data
    data = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    x = torch.from_numpy(data).float().div_(255)
    if x.ndim == 3:  # MNIST-like [N, H, W]
        x = x.unsqueeze(1)
    elif x.shape[-1] == 3:  # CIFAR [N, H, W, C]; SVHN is already [N, C, H, W]
        x = x.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return x.contiguous(), y
