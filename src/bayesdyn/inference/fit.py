"""``fit``: the one training loop of every family.

The optimised quantity is the negative ELBO *per training example*: the minibatch estimate of the
full-data negative ELBO (likelihood scaled by N/B, KL counted once) divided by N. It comes from
the family's fast path when the model knows the guide, else from Pyro's own ELBO as an
``nn.Module``; both have the same value (tests check it).

A training step never synchronises with the device: the loss is accumulated on the device and
the first non-finite step is recorded there; both are read at logging points and epoch ends.
"""

from __future__ import annotations

import copy
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..validation import check_inputs, resolve_device
from .checkpoint import CHECKPOINT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .predict import _EvalMode, predict


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclass
class FitConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0  # on model parameters only, never on variational parameters
    schedule: str | None = None  # None | cosine | multistep
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of `epochs` (multistep)
    gamma: float = 0.1
    clip_grad: float | None = None
    warmup_epochs: int = 0  # guide parameters frozen for the first epochs (DUN's q warm-up)
    early_stopping: int | None = None  # patience in epochs on validation NLL
    objective: str = "auto"  # auto | fast | pyro
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1,
                  "lr": self.lr > 0, "optimizer": self.optimizer in ("adam", "adamw", "sgd"),
                  "schedule": self.schedule in (None, "cosine", "multistep"),
                  "objective": self.objective in ("auto", "fast", "pyro"),
                  "warmup_epochs": self.warmup_epochs >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}")


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    objective: str = ""
    stopped_early: bool = False

    def __getitem__(self, key):
        return [e[key] for e in self.epochs]


def fit(model, guide, data, *, device="auto", out=None, resume: bool = False,
        progress: bool | None = None, **config) -> History:
    """Train ``model``/``guide`` on ``data.train`` (``DataSplits``), validating every epoch.

    Keyword arguments are those of ``FitConfig`` (epochs, batch_size, lr, optimizer, ...).
    ``out``: run folder for ``checkpoint.pt`` (written atomically every epoch and on Ctrl-C) and
    ``history.json``; ``resume=True`` continues from it up to ``epochs`` in total, reproducing
    the uninterrupted run. ``progress``: tqdm bar (default: only on a terminal).
    """
    trainer = Trainer(model, guide, data, FitConfig(**config), resolve_device(device), out,
                      progress)
    if resume:
        trainer.restore()
    return trainer.run()


class Trainer:
    def __init__(self, model, guide, data, config: FitConfig, device, out, progress):
        self.config, self.device = config, device
        self.out = Path(out) if out is not None else None
        x, y = data.train.tensors
        classes, shape = getattr(model, "num_classes", None), getattr(model, "input_shape", None)
        check_inputs(x, y, classes, shape, what="training inputs")
        check_inputs(*data.val.tensors, classes, shape, what="validation inputs")
        _seed_everything(config.seed)
        self.model, self.guide = model.to(device), guide.to(device)
        self.data = data.to(device)
        self.n = len(x)
        self.loss_fn, objective = self._objective()
        self.history = History(objective=objective)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.start_epoch, self.start_step, self.best = 0, 0, None
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.interrupted = False

    # --- set-up -------------------------------------------------------------------------------
    def _objective(self):
        x, y = (t[: min(2, self.n)] for t in self.data.train.tensors)
        # eval mode: the probes must not touch BatchNorm statistics
        with torch.no_grad(), _EvalMode(self.model, self.guide):
            self.guide(x, y, dataset_size=self.n)  # lazy autoguides create their parameters
            probe = NotImplemented if self.config.objective == "pyro" else \
                self.model.fast_loss(self.guide, x, y, self.n)
        if probe is not NotImplemented:
            return lambda xb, yb: self.model.fast_loss(self.guide, xb, yb, self.n), "fast"
        if self.config.objective == "fast":
            raise ValueError(f"{type(self.model).__name__} has no fast path for "
                             f"{type(self.guide).__name__}; use objective='pyro' or 'auto'")
        elbo = self.model.reference_loss()(self.model, self.guide)
        return lambda xb, yb: (elbo(xb, yb, dataset_size=self.n), {}), "pyro"

    def _optimizer(self):
        c = self.config
        guide_ids = {id(p) for p in self.guide.parameters()}
        model_params = [p for p in self.model.parameters() if id(p) not in guide_ids]
        groups = [{"params": [p for p in model_params if p.requires_grad],
                   "weight_decay": c.weight_decay},
                  {"params": list(self.guide.parameters()), "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum)
        cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return cls(groups, lr=c.lr)

    def _scheduler(self):
        c = self.config
        if c.schedule == "cosine":
            fn = lambda e: 0.5 * (1 + math.cos(math.pi * e / c.epochs))  # noqa: E731
        elif c.schedule == "multistep":
            steps = [round(m * c.epochs) for m in c.milestones]
            fn = lambda e: c.gamma ** sum(e >= s for s in steps)  # noqa: E731
        else:
            return None
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, fn)

    # --- checkpoints --------------------------------------------------------------------------
    def state(self, epoch: int, step: int, running: dict | None) -> dict:
        return {"model": self.model.state_dict(), "guide": self.guide.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "epoch": epoch, "step": step, "running": running, "rng": rng_state(),
                "history": self.history.epochs, "best": self.best,
                "config": asdict(self.config)}

    def save(self, epoch: int, step: int = 0, running: dict | None = None) -> None:
        if self.out is None:
            return
        atomic_save(self.state(epoch, step, running), self.out / CHECKPOINT)
        tmp = self.out / ".history.json.tmp"
        tmp.write_text(json.dumps(asdict(self.history), indent=1))
        tmp.replace(self.out / "history.json")

    def restore(self) -> None:
        if self.out is None:
            raise ValueError("resume=True needs out= (the run folder holding checkpoint.pt)")
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {self.out}")
        ckpt = load_checkpoint(path, map_location=self.device)
        self.model.load_state_dict(ckpt["model"])
        self.guide.load_state_dict(ckpt["guide"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        self.history.epochs = list(ckpt["history"])
        self.best = ckpt["best"]
        self.start_epoch, self.start_step = ckpt["epoch"], ckpt["step"]
        self.resume_running = ckpt["running"]

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> History:
        c = self.config
        previous = signal.getsignal(signal.SIGINT)
        if _in_main_thread():
            signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            for epoch in range(self.start_epoch, c.epochs):
                if not self._train_epoch(epoch):
                    break
        finally:
            if _in_main_thread():
                signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            raise KeyboardInterrupt(f"training interrupted; state saved in {self.out}")
        if self.best is not None and c.early_stopping:
            self.model.load_state_dict(self.best["model"])
            self.guide.load_state_dict(self.best["guide"])
        return self.history

    def _on_interrupt(self, signum, frame):
        if self.interrupted:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.interrupted = True

    def _train_epoch(self, epoch: int) -> bool:
        """One epoch; returns False when training should stop."""
        c, started = self.config, time.perf_counter()
        x, y = self.data.train.tensors
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(c.seed * 100_003 + epoch))
        batches = order.to(self.device).split(c.batch_size)
        running = self._running_state(epoch)
        self.guide.requires_grad_(epoch >= c.warmup_epochs)
        self.model.train()
        self.guide.train()
        bar = tqdm(total=len(batches), initial=self.start_step, desc=f"epoch {epoch + 1}/{c.epochs}",
                   disable=not self.progress, leave=False)
        for step in range(self.start_step, len(batches)):
            loss, terms = self.loss_fn(x[batches[step]], y[batches[step]])
            self._step(loss / self.n)
            self._accumulate(running, loss, terms, step)
            bar.update()
            if self.progress and (step + 1) % c.log_every == 0:
                bar.set_postfix(self._means(running, step + 1))
            if self.interrupted:
                self._check_finite(running, epoch)
                self.save(epoch, step + 1, running)
                bar.close()
                return False
        bar.close()
        self.start_step = 0
        self._check_finite(running, epoch)
        return self._end_epoch(epoch, running, len(batches), time.perf_counter() - started)

    def _step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        self.optimizer.step()

    def _running_state(self, epoch):
        running = getattr(self, "resume_running", None)
        self.resume_running = None
        if running is not None and self.start_step > 0:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in running.items()}
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        return {"loss": zero.clone(), "terms": {},
                "bad_step": torch.full((), -1, device=self.device)}

    def _accumulate(self, running, loss, terms, step):
        running["loss"] += loss.detach()
        for k, v in terms.items():
            running["terms"][k] = running["terms"].get(k, 0) + v.detach()
        bad = ~torch.isfinite(loss.detach())
        running["bad_step"] = torch.where(bad & (running["bad_step"] < 0), step,
                                          running["bad_step"])

    def _means(self, running, steps) -> dict:
        """Per-example averages of the loss and its terms (a device sync: logging only)."""
        steps = max(steps, 1)
        out = {"loss": running["loss"].item() / steps / self.n}
        out.update({k: v.item() / steps / self.n for k, v in running["terms"].items()})
        return {k: round(v, 4) for k, v in out.items()}

    def _check_finite(self, running, epoch):
        bad = int(running["bad_step"])
        if bad >= 0:
            kept = f"; the last good checkpoint is kept in {self.out}" if self.out else ""
            raise TrainingDivergedError(
                f"loss became NaN/Inf at epoch {epoch + 1}, step {bad + 1}{kept}. Lower the "
                "learning rate, set clip_grad, or check the inputs for extreme values.")

    def _end_epoch(self, epoch, running, steps, seconds) -> bool:
        x_val, y_val = self.data.val.tensors
        record = {"epoch": epoch + 1, **self._means(running, steps),
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        if len(x_val):
            pred = predict(self.model, self.guide, x_val, num_samples=4)
            p_true = pred.mean.gather(-1, y_val.cpu()[:, None]).clamp_min(1e-12)
            record["val_accuracy"] = float((pred.mean.argmax(-1) == y_val.cpu()).float().mean())
            record["val_nll"] = float(-p_true.log().mean())
        self.history.epochs.append(record)
        if self.scheduler is not None:
            self.scheduler.step()
        stop = self._early_stopping(record)
        self.save(epoch + 1)
        if not self.progress:
            return not stop
        tqdm.write(" ".join(f"{k}={v}" for k, v in record.items()))
        return not stop

    def _early_stopping(self, record) -> bool:
        c = self.config
        if not c.early_stopping or "val_nll" not in record:
            return False
        if self.best is None or record["val_nll"] < self.best["val_nll"]:
            self.best = {"val_nll": record["val_nll"], "epoch": record["epoch"],
                         "model": copy.deepcopy(self.model.state_dict()),
                         "guide": copy.deepcopy(self.guide.state_dict())}
            return False
        if record["epoch"] - self.best["epoch"] >= c.early_stopping:
            self.history.stopped_early = True
            return True
        return False


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
