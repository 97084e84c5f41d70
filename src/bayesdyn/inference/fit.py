"""``fit``: the one training loop of every family.

The optimised quantity is the negative ELBO *per training example*: the minibatch estimate of the
full-data negative ELBO (likelihood scaled by N/B, KL counted once) divided by N. It comes from
the family's fast path when the model knows the guide, else from Pyro's own ELBO as an
``nn.Module``; both have the same value (tests check it).

A training step never synchronises with the device: the loss is accumulated on the device and
the first non-finite step is recorded there; both are read at logging points and epoch ends.

Parameters are told apart by role, not by the module that holds them: weight decay reaches only
point-estimate weights (never a guide's or a model-held variational parameter, see
``DynamicModel.variational_parameters``), and the warm-up holds only the structure posterior
(``DynamicModel.structure_parameters``: q(d), q(z)) at its initialisation.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..evaluation.metrics import regression_metrics
from ..validation import resolve_device
from .batches import augment, place, training_sources
from .checkpoint import (
    CHECKPOINT,
    atomic_save,
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
    write_json,
)
from .config import FitConfig
from .parallel import LossModule, World, autocast, data_parallel
from .predict import _EvalMode, predict, predict_normal
from .progress import Progress


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf."""


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    objective: str = ""
    stopped_early: bool = False

    def __getitem__(self, key):
        return [e[key] for e in self.epochs]


def fit(model, guide, data, *, val=None, device="auto", out=None, resume: bool = False,
        progress: bool | None = None, **config) -> History:
    """Train ``model``/``guide`` on ``data``, validating every epoch.

    Args:
        data: a ``DataSplits`` (trains on ``.train``, validates on ``.val``), an ``(x, y)`` pair
            of tensors, a ``TensorDataset`` or a ``DataLoader`` of ``(x, y)`` batches (its own
            batch size and order apply; exact resumption needs its shuffle to come from torch's
            global RNG or a seeded generator of its own).
        val: validation data of the same kinds (optional; not with a ``DataSplits``).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
        out: run folder for ``checkpoint.pt`` (written atomically every epoch and on Ctrl-C)
            and ``history.json``; ``resume=True`` continues from it up to ``epochs`` in total,
            reproducing the uninterrupted run.
        progress: ``True`` a bar, ``False`` silent, ``None`` a bar in a terminal or Jupyter and
            one line per epoch elsewhere (a piped log).
        **config: the ``FitConfig`` options (epochs, batch_size, lr, optimizer, weight_decay,
            warmup_epochs, crop_padding, hflip, ...).
    """
    trainer = Trainer(model, guide, data, val, FitConfig(**config), resolve_device(device), out,
                      progress, resume)
    if resume:
        trainer.restore()
    return trainer.run()


class Trainer:
    def __init__(self, model, guide, data, val, config: FitConfig, device, out, progress,
                 resume: bool = False):
        self.config, self.device, self.world = config, device, World()
        self.out = Path(out) if out is not None else None
        if self.out is not None and self.out.is_dir() and self.world.main:
            remove_stale_temporaries(self.out)  # left by a killed run
        train, val = training_sources(data, val)
        classes, shape = getattr(model, "num_classes", None), getattr(model, "input_shape", None)
        regression = getattr(model, "likelihood", "classification") == "regression"
        train.check(classes, shape, "training inputs", regression)
        if val is not None:
            val.check(classes, shape, "validation inputs", regression)
        _seed_everything(config.seed)
        self._find_structure(model, train, resume)
        if config.sync_batchnorm and self.world.size > 1:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        memory = torch.channels_last if config.channels_last else torch.preserve_format
        self.model, self.guide = model.to(device, memory_format=memory), guide.to(device)
        dtype = next(model.parameters()).dtype
        self.train_data = place(train, device, dtype, config.streaming, config.num_workers)
        self.val_data = None if val is None else place(val, device, dtype, config.streaming)
        self.n = len(train)
        loss_fn, objective = self._objective()
        self.loss = data_parallel(LossModule(self.model, self.guide, loss_fn), self.world, device,
                                  find_unused=config.warmup_epochs > 0)
        if config.compile:
            self.loss = torch.compile(self.loss)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        self.history = History(objective=objective)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        self.start_epoch, self.start_step, self.best = 0, 0, None
        self.progress = Progress(progress if self.world.main else False)
        self.interrupted = False

    # --- set-up -------------------------------------------------------------------------------
    def _objective(self):
        x, y = self.train_data.head(2)
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
        variational = {id(p) for p in self.guide.parameters()}
        variational |= {id(p) for p in self.model.variational_parameters()}
        decayed = [p for p in self.model.parameters() if p.requires_grad and id(p) not in variational]
        structure = {id(p) for p in self._structure()}  # trainable after the warm-up
        not_decayed = [p for p in {id(p): p for p in [*self.model.parameters(),
                                                      *self.guide.parameters()]}.values()
                       if id(p) in variational and (p.requires_grad or id(p) in structure)]
        groups = [{"params": decayed, "weight_decay": c.weight_decay},
                  {"params": not_decayed, "weight_decay": 0.0}]
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
        if self.out is None or not self.world.main:  # one process writes
            return
        atomic_save(self.state(epoch, step, running), self.out / CHECKPOINT)
        write_json(self.out / "history.json", asdict(self.history))

    def _checkpoint_path(self) -> Path:
        if self.out is None:
            raise ValueError("resume=True needs out= (the run folder holding checkpoint.pt)")
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {self.out}")
        return path

    def _find_structure(self, model, train, resume: bool) -> None:
        """A model whose structure comes from the training data (a structured ensemble's mask
        stage, ``model.prepare_training``) gets it before the optimiser sees its parameters:
        found on the training data, or read back from the checkpoint when resuming."""
        prepare = getattr(model, "prepare_training", None)
        if prepare is None:
            return
        if resume:
            model.load_state_dict(load_checkpoint(self._checkpoint_path(), map_location="cpu")["model"])
        elif hasattr(train, "x"):
            prepare(torch.utils.data.TensorDataset(train.x, train.y), self.device, self.config.seed)
        else:
            raise ValueError(f"{type(model).__name__} finds its structure from the training "
                             f"tensors before training: pass tensors, a TensorDataset or a "
                             f"DataSplits, not a DataLoader")

    def restore(self) -> None:
        ckpt = load_checkpoint(self._checkpoint_path(), map_location=self.device)
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

    def _structure(self) -> list:
        return list(self.model.structure_parameters(self.guide))

    def _train_epoch(self, epoch: int) -> bool:
        """One epoch; returns False when training should stop."""
        c, started = self.config, time.perf_counter()
        running = self._running_state(epoch)
        num_batches = self.train_data.num_batches(c.batch_size)
        batches = self.train_data.batches(epoch, c.seed, c.batch_size, self.start_step,
                                          running["epoch_rng"])
        for p in self._structure():  # DUN's warm-up: q(d) held, everything else trains
            p.requires_grad_(epoch >= c.warmup_epochs)
        self.model.train()
        self.guide.train()
        bar = self.progress.bar(num_batches, self.start_step, f"epoch {epoch + 1}/{c.epochs}")
        for step, (xb, yb) in enumerate(batches, start=self.start_step):
            if c.crop_padding or c.hflip:
                xb = self._augment(xb, epoch, step)
            xb, yb, share = self.world.part(xb, yb)  # this process's part of the global batch
            if c.channels_last and xb.dim() == 4:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with autocast(c.precision, self.device):
                loss, terms = self.loss(xb, yb)
            self._step(loss * (share * self.world.size / self.n))
            self._accumulate(running, loss * share, {k: v * share for k, v in terms.items()}, step)
            bar.update()
            if (step + 1) % c.log_every == 0 and self.progress.mode == "bar":
                bar.set_postfix(self._means(running, step + 1))
            if self.interrupted and self.world.size == 1:  # torchrun: at the epoch's end
                self._check_finite(running, epoch)
                self.save(epoch, step + 1, running)
                bar.close()
                return False
        bar.close()
        self.start_step = 0
        self._check_finite(running, epoch)
        return self._end_epoch(epoch, running, num_batches, time.perf_counter() - started)

    def _augment(self, x, epoch, step):
        if x.dim() != 4:
            raise ValueError(f"crop_padding/hflip augment images [B, C, H, W]; the inputs have "
                             f"shape {tuple(x.shape)}")
        seed = (self.config.seed * 100_003 + epoch) * 1_000_003 + step
        generator = torch.Generator(device=x.device).manual_seed(seed)
        return augment(x, generator, self.config.crop_padding, self.config.hflip)

    def _step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # DDP sums the processes' gradients here
        if self.config.clip_grad:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _running_state(self, epoch):
        running = getattr(self, "resume_running", None)
        self.resume_running = None
        if running is not None and self.start_step > 0:
            return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in running.items()}
        zero = torch.zeros((), device=self.device, dtype=torch.float64)
        return {"loss": zero.clone(), "terms": {},
                "bad_step": torch.full((), -1, device=self.device),
                "epoch_rng": rng_state()}  # a streamed epoch is replayed from it on resume

    def _accumulate(self, running, loss, terms, step):
        running["loss"] += loss.detach()
        for k, v in terms.items():
            running["terms"][k] = running["terms"].get(k, 0) + v.detach()
        bad = ~torch.isfinite(loss.detach())
        running["bad_step"] = torch.where(bad & (running["bad_step"] < 0), step,
                                          running["bad_step"])

    def _means(self, running, steps, reduce: bool = False) -> dict:
        """Per-example averages of the loss and its terms (a device sync: logging only);
        ``reduce``: summed over the processes' parts (the global batches' estimates)."""
        steps = max(steps, 1)
        total = lambda v: float(self.world.sum(v.detach().clone()) if reduce else v)  # noqa: E731
        out = {"loss": total(running["loss"]) / steps / self.n}
        out.update({k: total(v) / steps / self.n for k, v in running["terms"].items()})
        return {k: round(v, 4) for k, v in out.items()}

    def _check_finite(self, running, epoch):
        bad = int(self.world.max(running["bad_step"].clone()))
        if bad >= 0:
            kept = ""
            if self.out is not None and (self.out / CHECKPOINT).is_file():
                kept = f"; the last good checkpoint is kept in {self.out / CHECKPOINT}"
            elif self.out is not None:
                kept = f"; no checkpoint was written to {self.out} (it diverged in the first epoch)"
            raise TrainingDivergedError(
                f"loss became NaN/Inf at epoch {epoch + 1}, step {bad + 1}{kept}. Lower the "
                "learning rate, set clip_grad, or check the inputs for extreme values.")

    def _end_epoch(self, epoch, running, steps, seconds) -> bool:
        record = {"epoch": epoch + 1, **self._means(running, steps, reduce=True),
                  "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        record.update(self.world.from_main(self._validate() if self.world.main else None))
        self.history.epochs.append(record)
        if self.scheduler is not None:
            self.scheduler.step()
        stop = self._early_stopping(record)
        self.save(epoch + 1)
        self.progress.epoch_done(record)
        if self.world.size > 1:  # a Ctrl-C under torchrun stops every process here, saved
            flag = torch.tensor(float(self.interrupted), device=self.device)
            self.interrupted = bool(self.world.max(flag))
            if self.interrupted:
                return False
        return not stop

    def _validate(self) -> dict:
        """Validation accuracy and NLL (regression: RMSE and NLL), dataset-level, of the
        structure-marginalised predictive."""
        if self.val_data is None:
            return {}
        if getattr(self.model, "likelihood", "classification") == "regression":
            x, y = (torch.cat(parts) for parts in zip(*self.val_data.all_batches(2048),
                                                       strict=True))
            pred = predict_normal(self.model, self.guide, x)
            m = regression_metrics(pred.log_weights, pred.means, pred.scale, y.cpu())
            return {"val_rmse": m["rmse"], "val_nll": m["nll"]}  # standardised units
        hits, nll, n = 0.0, 0.0, 0
        for xb, yb in self.val_data.all_batches(2048):
            mean = predict(self.model, self.guide, xb, num_samples=4).mean
            yb = yb.cpu()
            hits += float((mean.argmax(-1) == yb).sum())
            nll -= float(mean.gather(-1, yb[:, None]).clamp_min(1e-12).log().sum())
            n += len(yb)
        return {"val_accuracy": hits / n, "val_nll": nll / n, **self._member_validation()}

    def _member_validation(self) -> dict:
        """The model's own extra validation metrics (ensembles: per member), when it has any:
        means over the validation set, computed chunk by chunk (bounded memory)."""
        hook = getattr(self.model, "member_validation", None)
        if hook is None:
            return {}
        totals, n = {}, 0
        with torch.no_grad(), _EvalMode(self.model, self.guide):
            for xb, yb in self.val_data.all_batches(2048):
                for key, value in hook(self.guide, xb, yb).items():
                    totals[key] = totals.get(key, 0.0) + value * len(yb)
                n += len(yb)
        return {key: total / n for key, total in totals.items()}

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
