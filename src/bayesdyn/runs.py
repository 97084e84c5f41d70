"""Run directories: train a recipe end to end, or re-evaluate a finished run.

A run directory holds ``config.json``, ``checkpoint.pt``, ``history.json``, ``metrics.json``,
``plots/*.png`` and ``posterior.nc`` (ArviZ DataTree). Every option is validated before any data
is loaded or anything is written, so a bad option (or a refused ``--resume``) leaves the run
directory as it was.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import recipes
from .data import DATASETS, load, ood_names
from .data.regression import REGRESSION
from .evaluation import evaluate
from .inference import fit, load_checkpoint, resolve_device
from .inference.checkpoint import CHECKPOINT, atomic_write_bytes, read_json, write_json
from .inference.fit import FitConfig
from .inference.parallel import World

SPLIT_SEED = 0  # the train/val split is the same for every training seed
LOO_SIZE = 1000  # training examples whose log-likelihood posterior.nc holds (LOO of the fit)
PROBE_SIZE = 200  # test inputs whose per-draw class probabilities go into posterior.nc
# options that may differ when a run is resumed (the rest must match the checkpoint's run)
RESUMABLE = ("epochs", "ood", "num_samples", "data_root")


def train_run(recipe: recipes.Recipe, dataset: str, out, *, data_root=None, download=False,
              device="auto", seed: int = 0, resume: bool = False, ood="default", progress=None,
              posterior_samples: int = 100, num_samples: int = 8, **fit_options) -> dict:
    """Train ``recipe`` on ``dataset`` into ``out``, evaluate it, export the posterior; returns
    metrics.json. ``fit_options`` are ``FitConfig``'s (epochs, batch_size, lr, optimizer,
    weight_decay, schedule, warmup_epochs, crop_padding, hflip, ...); ``num_samples`` the Monte
    Carlo draws per input in evaluation. Under ``torchrun`` every process trains its share of
    each batch; process 0 writes the run and returns the metrics, the others return None."""
    out = Path(out)
    config = run_config(recipe, dataset, data_root, seed, ood, num_samples, posterior_samples,
                        fit_options)
    device = resolve_device(device)
    check_run_dir(out, config, resume)
    data = load(dataset, root=data_root, download=download, seed=SPLIT_SEED)
    torch.manual_seed(seed)  # initial weights depend on the seed only
    model, guide = recipes.build(recipe, data.input_shape, data.num_classes)
    world = World()  # under torchrun: every process trains, one writes and evaluates
    if world.main:
        write_json(out / "config.json", config)
    history = fit(model, guide, data, device=device, out=out, resume=resume, progress=progress,
                  seed=seed, **fit_options)
    if world.active:  # every process has finished training before any leaves the group
        torch.distributed.barrier()
    if not world.main:
        return None
    train_seconds = round(sum(e["seconds"] for e in history.epochs), 3)
    metrics = evaluate(model, guide, data, ood=ood, out=out, method=recipe.method, seed=seed,
                       train_seconds=train_seconds, data_root=data_root, num_samples=num_samples)
    write_posterior([(model, guide)], data, out / "posterior.nc", posterior_samples, seed,
                    [history])
    return metrics


def run_config(recipe, dataset, data_root, seed, ood, num_samples, posterior_samples,
               fit_options) -> dict:
    """The run's config.json, every option checked (nothing is loaded or written here)."""
    if not isinstance(recipe, recipes.Recipe):
        raise TypeError(f"recipe must be a bayesdyn.recipes.Recipe, got {type(recipe).__name__}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset in REGRESSION and recipe.method not in recipes.REGRESSION_METHODS:
        raise ValueError(f"{dataset} is a regression dataset and method {recipe.method!r} is for "
                         f"classification; use one of {', '.join(recipes.REGRESSION_METHODS)}")
    if ood not in (None, "default") and (ood not in ood_names() or ood == dataset):
        raise ValueError(f"unknown OOD set {ood!r} for {dataset}; use 'default', 'none' or one "
                         f"of {', '.join(n for n in ood_names() if n != dataset)}")
    for name, value in (("num_samples", num_samples), ("posterior_samples", posterior_samples)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"invalid {name}={value!r}: expected an integer >= 1")
    options = asdict(FitConfig(seed=seed, **fit_options))  # validates every training option
    options.pop("seed")
    config = {"recipe": recipe.to_dict(), "dataset": dataset, "data_root": data_root,
              "seed": seed, "split_seed": SPLIT_SEED, "ood": ood, "num_samples": num_samples,
              "posterior_samples": posterior_samples, **options}
    return json.loads(json.dumps(config))  # as config.json will hold it (tuples are lists)


def check_run_dir(out: Path, config: dict, resume: bool) -> None:
    """``out`` can hold this run: writable, and either new or (``resume``) holding a checkpoint
    of the same run with no more epochs than asked for. Reads only."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a folder for the run")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the run to {out}: {existing} is not writable")
    checkpoint = out / CHECKPOINT
    if not resume:
        if checkpoint.exists():
            raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or "
                                  "choose another --out")
        return
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}")
    old = read_json(out / "config.json")
    for key, value in config.items():
        if key not in RESUMABLE and old.get(key) != value:
            raise ValueError(f"--resume: {key} differs from the run in {out} "
                             f"({old.get(key)!r} there, {value!r} now)")
    done = load_checkpoint(checkpoint)["epoch"]
    if config["epochs"] < done:
        raise ValueError(f"--resume: the run in {out} has already trained {done} epochs; "
                         f"--epochs is the total, so pass --epochs {done} or more")


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
    config = read_json(config_path)
    ckpt = load_checkpoint(run_dir / CHECKPOINT)
    history = read_json(run_dir / "history.json")["epochs"]
    data = load(config["dataset"], root=config["data_root"], seed=config["split_seed"])
    model, guide = recipes.build(recipes.Recipe(**config["recipe"]), data.input_shape,
                                 data.num_classes)
    model.load_state_dict(ckpt["model"])
    guide.load_state_dict(ckpt["guide"])
    device = resolve_device(device)
    model.to(device), guide.to(device)
    return Run(model, guide, data, config, history)


def evaluate_run(run_dir: Path, ood=None, num_samples: int | None = None,
                 device="auto") -> dict:
    """Rebuild a run's model from config.json + checkpoint and evaluate it again (``ood`` and
    ``num_samples`` default to the run's)."""
    run_dir = Path(run_dir)
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    ood = config.get("ood") if ood is None else (None if ood == "none" else ood)
    if ood not in (None, "default") and ood not in ood_names():
        raise ValueError(f"unknown OOD set {ood!r}; use 'default', 'none' or one of "
                         f"{', '.join(ood_names())}")
    run = load_run(run_dir, device)
    num_samples = run.config.get("num_samples", 8) if num_samples is None else num_samples
    return evaluate(run.model, run.guide, run.data.to(next(run.model.parameters()).device),
                    ood=ood, out=run_dir, method=run.config["recipe"]["method"],
                    seed=run.config["seed"], num_samples=num_samples,
                    data_root=run.config["data_root"],
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
    keys = {(str(sorted(r.config["recipe"].items())), r.config["dataset"]) for r in runs}
    if len(keys) > 1:
        raise ValueError("these run directories hold different recipes or datasets; chains of "
                         "one DataTree must be runs of the same model")
    return posterior_tree([(r.model, r.guide) for r in runs], runs[0].data, num_samples, seed,
                          [r.history for r in runs])


def write_posterior(pairs, data, path: Path, num_samples: int, seed: int, histories=None) -> None:
    """posterior.nc, made in memory and written atomically (a full disk is one clear error)."""
    tree = posterior_tree(pairs, data, num_samples, seed, histories)
    buffer = io.BytesIO()
    tree.to_netcdf(buffer, engine="h5netcdf")
    atomic_write_bytes(path, buffer.getvalue())
