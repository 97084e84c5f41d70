"""The ensemble methods' part of the recipes (``structured-ensemble``, ``ensemble``) and the
continual-learning run behind ``bayesdyn continual``."""

from __future__ import annotations

import math
import time

from .nn.members import PlainSpec, StackedNet
from .validation import check_int, check_real

ENSEMBLE_ARCHS = ("auto", "mlp", "conv")


def check_ensemble_options(recipe) -> None:
    """Every ensemble option of ``recipe`` checked (called by ``Recipe``)."""
    check_int("members", recipe.members, 1)
    check_real("prune", recipe.prune, 0, 1, open_high=True)
    check_real("divergence_weight", recipe.divergence_weight, 0)
    check_int("mask_epochs", recipe.mask_epochs, 0)
    if recipe.prune_scope not in ("global", "local"):
        raise ValueError(f"prune_scope must be 'global' or 'local', got {recipe.prune_scope!r}")
    if recipe.divergence not in ("gaussian", "official"):
        raise ValueError(f"divergence must be 'gaussian' or 'official', got {recipe.divergence!r}")
    if recipe.combine not in ("probs", "logits"):
        raise ValueError(f"combine must be 'probs' or 'logits', got {recipe.combine!r}")
    if recipe.method in ("structured-ensemble", "ensemble") and recipe.arch not in ENSEMBLE_ARCHS:
        raise ValueError(f"the ensemble methods take arch {', '.join(ENSEMBLE_ARCHS)}, not "
                         f"{recipe.arch!r}")


def plain_spec(recipe, input_shape, num_classes: int, batch_norm: bool = True) -> PlainSpec:
    """The plain backbone: an MLP of ``depth`` units of ``width`` (8x8 or vector inputs), else a
    VGG-like conv net: ``depth`` 3x3 units, widths ``width / 2`` doubling every two units
    (at most ``2 width``), a 2x2 max pool after every second unit while the image is >= 8
    pixels, global average pooling and a linear classifier."""
    arch = recipe.arch
    if arch == "auto":
        arch = "mlp" if len(input_shape) == 1 or math.prod(input_shape[1:]) <= 64 else "conv"
    if arch == "mlp":
        return PlainSpec(tuple(input_shape), (recipe.width,) * recipe.depth, num_classes,
                         batch_norm=batch_norm)
    if len(input_shape) != 3:
        raise ValueError(f"arch conv needs image inputs, got shape {tuple(input_shape)}")
    layers, size = [], input_shape[1]
    for i in range(recipe.depth):
        layers.append(max(recipe.width // 2 * 2 ** min(i // 2, 2), 1))
        if i % 2 == 1 and size >= 8:
            layers.append("M")
            size //= 2
    return PlainSpec(tuple(input_shape), tuple(layers), num_classes, conv=True,
                     batch_norm=batch_norm)


def build_ensemble(recipe, input_shape, num_classes: int | None):
    """``(model, guide)``: a ``DeepEnsemble`` of ``members`` plain nets, or a
    ``StructuredEnsemble`` whose mask stage runs on the training data before training
    (``StructuredEnsemble.prepare_training``, called by ``bayesdyn.runs.train_run``)."""
    from .models import DeepEnsemble, StructuredEnsemble

    if num_classes is None:
        raise ValueError(f"method {recipe.method!r} is for classification")
    spec = plain_spec(recipe, input_shape, num_classes)
    if recipe.method == "ensemble":
        # batched matmul / grouped conv: never slower than vmap in benchmarks/RESULTS.md
        model = DeepEnsemble(StackedNet(spec, recipe.members), input_shape=input_shape,
                             combine=recipe.combine)
    else:
        model = StructuredEnsemble.untrained(
            StackedNet(spec, 1), recipe.members, q=recipe.prune, scope=recipe.prune_scope,
            mask_epochs=recipe.mask_epochs, divergence=recipe.divergence,
            divergence_weight=recipe.divergence_weight, combine=recipe.combine)
    return model, model.default_guide()


def continual_run(dataset: str, method: str, out, *, data_root=None, seed: int = 0,
                  epochs: int = 10, prune: float = 0.5, mask_epochs: int = 2, width: int = 256,
                  depth: int = 2, batch_size: int = 128, lr: float = 1e-3,
                  early_stopping: int | None = None, train_subset: int | None = None,
                  device: str = "cpu") -> dict:
    """Split ``dataset`` into tasks of two classes and run ``method`` (``subnets``,
    ``finetune``, ``separate``) with an MLP backbone of ``depth`` x ``width`` (no BatchNorm:
    frozen channels must not see their statistics change); writes ``out/metrics.json``."""
    from pathlib import Path

    import torch
    from torch.utils.data import TensorDataset

    from .data import load
    from .inference.checkpoint import write_json
    from .inference.continual import CONTINUAL_METHODS, run_continual, split_tasks

    if method not in CONTINUAL_METHODS:
        raise ValueError(f"unknown continual method {method!r}; choose one of "
                         f"{', '.join(CONTINUAL_METHODS)}")
    check_int("epochs", epochs, 1)
    check_real("prune", prune, 0, 1, open_high=True)
    data = load(dataset, root=data_root, seed=0)
    if train_subset is not None:
        check_int("train_subset", train_subset, 2)
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(data.train), generator=g)[:train_subset]
        data.train = TensorDataset(*(t[keep] for t in data.train.tensors))
    spec = PlainSpec(data.input_shape, (width,) * depth, 2, batch_norm=False)
    started = time.perf_counter()
    result = run_continual(split_tasks(data), spec, method, q=prune, mask_epochs=mask_epochs,
                           seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
                           early_stopping=early_stopping, device=device)
    result.update({"dataset": dataset, "seed": seed, "epochs_per_task": epochs,
                   "train_seconds": round(time.perf_counter() - started, 3)})
    write_json(Path(out) / "metrics.json", result)
    return result
