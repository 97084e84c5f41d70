"""Checks at the public boundary: bad input fails here with a message that names the fix."""

from __future__ import annotations

import math

import torch


def check_inputs(x, y=None, num_classes: int | None = None, input_shape=None, what: str = "x",
                 regression: bool = False):
    """Validate a batch: ``x`` a float tensor ``[B, *input_shape]`` without NaN/Inf, ``y`` integer
    labels ``[B]`` in ``[0, num_classes)`` (``regression``: real targets ``[B]``). Raises
    ``TypeError``/``ValueError``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}; "
                        f"convert with {what}.float()")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{what} has shape {tuple(x.shape)}, expected [batch, "
                         f"{', '.join(map(str, input_shape))}] (the shape the model was built for)")
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf values; clean or impute the inputs first")
    if y is None:
        return
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(y).__name__}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"labels have shape {tuple(y.shape)}, expected [{x.shape[0]}] "
                         f"(one label per row of {what})")
    if regression and not y.is_floating_point():
        raise TypeError(f"regression targets must be a floating-point tensor, got {y.dtype}; "
                        "convert with y.float()")
    if num_classes is None:
        return
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"classification labels must be an integer tensor, got {y.dtype}; "
                        "convert with y.long()")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][:5].tolist()
        raise ValueError(f"labels out of range: {bad} (valid: 0..{num_classes - 1}); the model "
                         f"was built for {num_classes} classes")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine "
                           "(torch.cuda.is_available() is False); use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA "
                           "device(s) exist")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    return dev


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int (not a bool or float), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None
                                                                 and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"invalid {name}={value!r}: expected an integer{bound}")
    return value


def check_real(name: str, value, low: float | None = None, high: float | None = None,
               open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite float in the interval given (``open_*``: the bound excluded)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok:
        interval = ("(" if open_low else "[") + ("-inf" if low is None else f"{low:g}") + ", " \
            + ("inf" if high is None else f"{high:g}") + (")" if open_high or high is None else "]")
        raise ValueError(f"invalid {name}={value!r}: expected a finite number in {interval}")
    return float(value)
