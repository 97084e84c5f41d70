"""Run directories: train a recipe end to end, or re-evaluate a finished run.

A run directory holds ``config.json`` (written first), ``checkpoint.pt``, ``history.json``,
``metrics.json``, ``plots/*.png`` and ``posterior.nc`` (ArviZ DataTree).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import recipes
from .data import load
from .evaluation import evaluate
from .evaluation.evaluate import write_json
from .inference import fit, load_checkpoint, resolve_device
from .inference.checkpoint import CHECKPOINT

SPLIT_SEED = 0  # the train/val split is the same for every training seed
LOO_SIZE = 1000  # training examples whose log-likelihood posterior.nc holds (LOO of the fit)
PROBE_SIZE = 200  # test inputs whose per-draw class probabilities go into posterior.nc


def train_run(recipe: recipes.Recipe, dataset: str, out, *, data_root=None, download=False,
              epochs=10, batch_size=128, lr=1e-3, device="auto", seed=0, resume=False,
              ood="default", progress=None, posterior_samples: int = 100) -> dict:
    """Train ``recipe`` on ``dataset`` into ``out`` and evaluate it; returns metrics.json."""
    out = Path(out)
    device = resolve_device(device)
    config = {"recipe": recipe.to_dict(), "dataset": dataset, "data_root": data_root,
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "split_seed": SPLIT_SEED, "ood": ood}
    _check_run_dir(out, config, resume)
    data = load(dataset, root=data_root, download=download, seed=SPLIT_SEED)
    write_json(out / "config.json", config)
    torch.manual_seed(seed)  # initial weights depend on the seed only
    model, guide = recipes.build(recipe, data.input_shape, data.num_classes)
    history = fit(model, guide, data, device=device, out=out, resume=resume, progress=progress,
                  epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    train_seconds = round(sum(e["seconds"] for e in history.epochs), 3)
    metrics = evaluate(model, guide, data, ood=ood, out=out, method=recipe.method, seed=seed,
                       train_seconds=train_seconds, data_root=data_root)
    write_posterior([(model, guide)], data, out / "posterior.nc", posterior_samples, seed,
                    [history])
    return metrics


@dataclass
class Run:
    """A finished run rebuilt from its directory."""

    model: object
    guide: object
    data: object
    config: dict
    history: list


def load_run(run_dir, device="cpu") -> Run:
    """Rebuild a run's model and guide from ``config.json`` + ``checkpoint.pt``, with its data
    split and training history."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    config = json.loads(config_path.read_text())
    data = load(config["dataset"], root=config["data_root"], seed=config["split_seed"])
    model, guide = recipes.build(recipes.Recipe(**config["recipe"]), data.input_shape,
                                 data.num_classes)
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    model.load_state_dict(ckpt["model"])
    guide.load_state_dict(ckpt["guide"])
    device = resolve_device(device)
    model.to(device), guide.to(device)
    history = json.loads((run_dir / "history.json").read_text())["epochs"]
    return Run(model, guide, data, config, history)


def evaluate_run(run_dir: Path, ood=None, num_samples: int = 8, device="auto") -> dict:
    """Rebuild a run's model from config.json + checkpoint and evaluate it again."""
    run = load_run(run_dir, device)
    config = run.config
    return evaluate(run.model, run.guide, run.data.to(next(run.model.parameters()).device),
                    ood=ood or config["ood"], out=run_dir, method=config["recipe"]["method"],
                    seed=config["seed"], num_samples=num_samples, data_root=config["data_root"],
                    train_seconds=round(sum(e["seconds"] for e in run.history), 3))


def posterior_tree(pairs, data, num_samples: int = 200, seed: int = 0, histories=None):
    """The ArviZ DataTree of trained ``(model, guide)`` pairs, one chain each: log-likelihood of
    the first ``LOO_SIZE`` training examples (the same for every run of a dataset, so
    ``arviz.compare`` lines them up), class probabilities of the first ``PROBE_SIZE`` test
    inputs."""
    from .inference.datatree import to_datatree

    x, y = (t[:LOO_SIZE] for t in data.train.tensors)
    attrs = {"dataset": data.name,
             "log_likelihood_data": f"first {len(x)} training examples, split seed {SPLIT_SEED}"}
    return to_datatree(*pairs[0], x, y, num_samples=num_samples, runs=pairs[1:], seed=seed,
                       attrs=attrs, predict_x=data.test.tensors[0][:PROBE_SIZE],
                       histories=histories)


def runs_to_datatree(run_dirs, num_samples: int = 200, seed: int = 0):
    """Several run directories of one recipe and dataset (e.g. CLI runs with different seeds)
    as the chains of one DataTree, so ``arviz.rhat``/``arviz.ess`` across runs are one call."""
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ValueError("pass at least one run directory")
    keys = {(json.dumps(r.config["recipe"], sort_keys=True), r.config["dataset"]) for r in runs}
    if len(keys) > 1:
        raise ValueError("these run directories hold different recipes or datasets; chains of "
                         "one DataTree must be runs of the same model")
    return posterior_tree([(r.model, r.guide) for r in runs], runs[0].data, num_samples, seed,
                          [r.history for r in runs])


def write_posterior(pairs, data, path: Path, num_samples: int, seed: int, histories=None) -> None:
    tree = posterior_tree(pairs, data, num_samples, seed, histories)
    tmp = path.with_name(f".{path.name}.tmp")
    tree.to_netcdf(tmp, engine="h5netcdf")
    tmp.replace(path)


def _check_run_dir(out: Path, config: dict, resume: bool) -> None:
    existing = out / "config.json"
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
        old = json.loads(existing.read_text())
        for key in ("recipe", "dataset", "batch_size", "lr", "seed"):
            if old.get(key) != config[key]:
                raise ValueError(f"--resume: {key} differs from the run in {out} "
                                 f"({old.get(key)!r} there, {config[key]!r} now)")
    elif (out / CHECKPOINT).exists():
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                              "choose another --out")
