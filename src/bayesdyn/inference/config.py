"""``FitConfig``: every training option of ``fit``, validated on construction (before any work)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class FitConfig:
    """Training options (validated on construction, before any work)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0  # on point-estimate weights only (never variational parameters)
    schedule: str | None = None  # None | cosine | multistep
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs` (multistep)
    gamma: float = 0.1
    clip_grad: float | None = None  # max gradient norm
    warmup_epochs: int = 0  # the structure posterior held at its init (DUN's q warm-up)
    early_stopping: int | None = None  # patience in epochs on validation NLL
    objective: str = "auto"  # auto | fast | pyro
    crop_padding: int = 0  # augmentation: random crop after zero padding (images)
    hflip: bool = False  # augmentation: random horizontal flip (images)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; likelihoods and KLs in fp32)
    channels_last: bool = False  # memory format of 4-D weights and inputs (conv nets, GPUs)
    streaming: str = "auto"  # auto | always | never: stream batches from host memory
    num_workers: int = 0  # DataLoader workers when streaming
    sync_batchnorm: bool = False  # BatchNorm statistics over all processes (torchrun)
    compile: bool = False  # torch.compile the objective
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        checks = {
            "epochs": (_is_int(self.epochs) and self.epochs >= 1, "an integer >= 1"),
            "batch_size": (_is_int(self.batch_size) and self.batch_size >= 1, "an integer >= 1"),
            "lr": (_finite(self.lr) and self.lr > 0, "a finite number > 0"),
            "optimizer": (self.optimizer in ("adam", "adamw", "sgd"), "adam, adamw or sgd"),
            "momentum": (_finite(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)"),
            "weight_decay": (_finite(self.weight_decay) and self.weight_decay >= 0,
                             "a finite number >= 0"),
            "schedule": (self.schedule in (None, "cosine", "multistep"), "None, cosine or multistep"),
            "milestones": (all(_finite(m) and 0 < m < 1 for m in self.milestones),
                           "fractions of the epochs in (0, 1)"),
            "gamma": (_finite(self.gamma) and 0 < self.gamma <= 1, "in (0, 1]"),
            "clip_grad": (self.clip_grad is None or (_finite(self.clip_grad) and self.clip_grad > 0),
                          "None or a finite number > 0 (the maximal gradient norm)"),
            "warmup_epochs": (_is_int(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
                              f"an integer in [0, epochs={self.epochs})"),
            "early_stopping": (self.early_stopping is None or (_is_int(self.early_stopping)
                                                               and self.early_stopping >= 1),
                               "None or a patience of >= 1 epochs"),
            "objective": (self.objective in ("auto", "fast", "pyro"), "auto, fast or pyro"),
            "crop_padding": (_is_int(self.crop_padding) and self.crop_padding >= 0,
                             "an integer >= 0 (pixels)"),
            "hflip": (isinstance(self.hflip, bool), "True or False"),
            "precision": (self.precision in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
            "channels_last": (isinstance(self.channels_last, bool), "True or False"),
            "streaming": (self.streaming in ("auto", "always", "never"), "auto, always or never"),
            "num_workers": (_is_int(self.num_workers) and self.num_workers >= 0, "an integer >= 0"),
            "sync_batchnorm": (isinstance(self.sync_batchnorm, bool), "True or False"),
            "compile": (isinstance(self.compile, bool), "True or False"),
            "seed": (_is_int(self.seed) and 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            "log_every": (_is_int(self.log_every) and self.log_every >= 1, "an integer >= 1"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
