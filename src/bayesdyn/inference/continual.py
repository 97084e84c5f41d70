"""Task-incremental continual learning with structured sub-networks (methods.md §5.3).

One shared backbone (a plain network, ``StackedNet`` with one member) and one head per task.
For task ``t``: channel scales are trained on task ``t`` (the mask stage, ``MaskSearch`` with one
member), importances are computed, and task ``t`` takes the fraction ``1 - q`` most important
of the channels *no earlier task owns*. Task ``t``'s network is the union of the channels of tasks
``0..t``: earlier tasks' channels are reused, and their weights (their rows of each layer) are
frozen while task ``t`` trains, so earlier tasks' predictions cannot change.

Baselines: ``finetune`` (the whole backbone trained on each task in turn, heads per task) and
``separate`` (one network per task). ``run_continual`` returns the task accuracy matrix
``R[i, j]`` (accuracy on task ``j`` after training task ``i``), the average accuracy
``mean_j R[T-1, j]``, backward transfer ``mean_{j<T-1} (R[T-1, j] - R[j, j])`` and the parameters
in use after each task.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..nn.members import PlainSpec, StackedNet
from .subnets import MaskSearch, channel_importance

CONTINUAL_METHODS = ("subnets", "finetune", "separate")


def split_tasks(data, classes_per_task: int = 2) -> list[dict]:
    """A ``DataSplits`` cut into tasks of consecutive classes (``(0, 1), (2, 3), ...``), labels
    renumbered ``0..classes_per_task - 1``: a list of ``{"train", "val", "test"}`` datasets."""
    if data.num_classes % classes_per_task:
        raise ValueError(f"{data.num_classes} classes cannot be cut into tasks of "
                         f"{classes_per_task}")
    tasks = []
    for t in range(data.num_classes // classes_per_task):
        low = t * classes_per_task
        task = {}
        for name in ("train", "val", "test"):
            x, y = getattr(data, name).tensors
            keep = (y >= low) & (y < low + classes_per_task)
            task[name] = TensorDataset(x[keep], y[keep] - low)
        tasks.append(task)
    return tasks


class _Head(nn.Sequential):
    """A task's head: ``in -> in / 2 -> classes`` (the paper's heads are small MLPs)."""

    def __init__(self, features: int, classes: int):
        hidden = max(features // 2, 1)
        super().__init__(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class ContinualSubnets(nn.Module):
    """The shared backbone, the owners of its channels and the task heads.

    Args:
        spec: the backbone (``spec.num_classes`` is ignored: heads are per task).
        tasks, classes_per_task: the task sequence.
    """

    def __init__(self, spec: PlainSpec, tasks: int, classes_per_task: int):
        super().__init__()
        self.backbone = StackedNet(spec, 1)
        self.heads = nn.ModuleList(_Head(spec.widths[-1], classes_per_task) for _ in range(tasks))
        for unit, width in enumerate(spec.widths):  # owner task of each channel, -1: free
            self.register_buffer(f"owner{unit}", torch.full((width,), -1, dtype=torch.long))

    def owners(self) -> list[torch.Tensor]:
        """The owner task of every channel, ``[C_l]`` per unit (-1: free)."""
        return [getattr(self, f"owner{u}") for u in range(len(self.backbone.spec.widths))]

    def masks(self, task: int) -> list[torch.Tensor]:
        """Task ``task``'s channels (owned by tasks ``0..task``) as binary scales ``[1, C_l]``."""
        return [((o >= 0) & (o <= task)).to(self.backbone.classifier_bias.dtype)[None]
                for o in self.owners()]

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s logits ``[B, classes]``."""
        return self.heads[task](self.backbone.features(x, self.masks(task))[0])

    def used_parameters(self, task: int) -> int:
        """Backbone parameters of the channels of tasks ``0..task`` plus heads ``0..task``."""
        count, fan = 0, None
        for o in self.owners():
            own = int(((o >= 0) & (o <= task)).sum())
            inputs = self.backbone.weights[0][0].shape[1:].numel() if fan is None else fan
            count += own * inputs + own
            fan = own
        return count + sum(sum(p.numel() for p in h.parameters()) for h in self.heads[:task + 1])

    def freeze_hooks(self, task: int) -> list:
        """Gradient hooks that zero the rows of channels earlier tasks own (returned so the
        caller removes them after training)."""
        hooks = []
        for unit, owner in enumerate(self.owners()):
            frozen = (owner >= 0) & (owner < task)
            for p in (self.backbone.weights[unit], self.backbone.biases[unit]):
                keep = (~frozen).to(p.dtype).view(1, -1, *([1] * (p.dim() - 2)))
                hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
        return hooks

    def claim(self, task: int, importances, q: float) -> None:
        """Task ``task`` takes the ``1 - q`` most important free channels of each unit (at least
        one while any is free)."""
        for owner, imp in zip(self.owners(), importances, strict=True):
            free = (owner < 0).nonzero().flatten()
            if free.numel() == 0:
                continue
            take = max(free.numel() - round(q * free.numel()), 1)
            best = free[torch.argsort(imp[free], descending=True, stable=True)[:take]]
            owner[best] = task


class _TaskView(nn.Module):
    def __init__(self, net: ContinualSubnets, task: int):
        super().__init__()
        self.net, self.task = net, task

    def forward(self, x):
        return self.net(x, self.task)


def _train(net, task: int, data: dict, fit_options: dict):
    from ..guides.empty import EmptyGuide
    from ..models.deterministic import DeterministicNet
    from .fit import fit

    classes = net.heads[task][-1].out_features
    model = DeterministicNet(_TaskView(net, task), classes)
    fit(model, EmptyGuide(model), data["train"], val=data["val"], progress=False, **fit_options)


@torch.no_grad()
def _accuracy(net, task: int, data: TensorDataset) -> float:
    net.eval()
    x, y = data.tensors
    return float((net(x, task).argmax(-1) == y).float().mean())


def run_continual(tasks: list[dict], spec: PlainSpec, method: str = "subnets", q: float = 0.5,
                  mask_epochs: int = 2, seed: int = 0, **fit_options) -> dict:
    """Train ``method`` on the task sequence (``split_tasks``) and measure it.

    Returns ``{"accuracy_matrix" [T][T], "average_accuracy", "backward_transfer", "parameters"
    [T] (in use after each task)}``; ``fit_options`` go to ``fit`` for every task (epochs, lr,
    early_stopping, ...)."""
    if method not in CONTINUAL_METHODS:
        raise ValueError(f"method must be one of {CONTINUAL_METHODS}, got {method!r}")
    torch.manual_seed(seed)
    classes = int(max(int(t["train"].tensors[1].max()) for t in tasks)) + 1
    count = len(tasks)
    nets = [ContinualSubnets(spec, count, classes)]
    if method == "separate":  # one network per task, each its own initialisation
        nets += [ContinualSubnets(spec, count, classes) for _ in range(count - 1)]
    matrix = [[0.0] * count for _ in range(count)]
    params = []
    for t, data in enumerate(tasks):
        net = nets[t] if method == "separate" else nets[0]
        hooks = []
        if method == "subnets":
            _claim_channels(net, t, data["train"], q, mask_epochs, seed, fit_options)
            hooks = net.freeze_hooks(t)
        else:
            for owner in net.owners():
                owner.fill_(0)  # every channel in use by every task
        try:
            _train(net, t, data, {"seed": seed, **fit_options})
        finally:
            for h in hooks:
                h.remove()
        for j in range(t + 1):
            matrix[t][j] = _accuracy(nets[j] if method == "separate" else net, j, tasks[j]["test"])
        params.append(sum(n.used_parameters(t if method != "separate" else 0)
                          for n in nets[: t + 1]) if method == "separate"
                      else net.used_parameters(t))
    final = matrix[-1]
    bwt = [final[j] - matrix[j][j] for j in range(count - 1)]
    return {"method": method, "accuracy_matrix": matrix,
            "average_accuracy": sum(final) / count,
            "backward_transfer": sum(bwt) / len(bwt) if bwt else 0.0, "parameters": params}


def _claim_channels(net: ContinualSubnets, task: int, train: TensorDataset, q: float,
                    mask_epochs: int, seed: int, fit_options: dict) -> None:
    """The mask stage on task ``task`` (one member, a copy of the backbone with this task's
    head as classifier), then the task claims free channels by importance."""
    from .fit import fit

    classes = net.heads[task][-1].out_features
    if net.backbone.spec.num_classes != classes:
        raise ValueError("the backbone spec's num_classes must equal the classes per task")
    base = copy.deepcopy(net.backbone)  # its own (untrained) classifier scores the masks
    search = MaskSearch(base, 1, divergence_weight=0.0)
    if mask_epochs > 0:
        options = {k: v for k, v in fit_options.items() if k in ("batch_size", "lr", "device")}
        fit(search, search.default_guide(), train.tensors, epochs=mask_epochs, seed=seed,
            progress=False, **options)
    importances = channel_importance(search.cpu(), *train.tensors)
    net.claim(task, [imp[0] for imp in importances], q)
