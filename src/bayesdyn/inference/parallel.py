"""Scaling ``fit`` out and down: data parallelism with PyTorch's ``DistributedDataParallel``
(``torchrun`` or any initialised process group), streamed batches, mixed precision.

The objective stays the full-data ELBO. Each global minibatch of ``B`` examples is cut into one
part per process; process ``r`` computes its part's estimate ``L_r`` (likelihood scaled by
``N / b_r``, KL once) and back-propagates ``(b_r / B) L_r``; DDP sums those gradients over the
processes (it averages, so each loss is multiplied by the world size), which is exactly the
gradient of the one-process estimate on the whole global batch.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


class World:
    """This process's place in a process group (rank 0 of 1 without one)."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1

    @property
    def main(self) -> bool:
        """The process that writes checkpoints, logs and metrics."""
        return self.rank == 0

    def part(self, x: torch.Tensor, y: torch.Tensor):
        """This process's part of a global batch and its share ``b_r / B`` of it."""
        if self.size == 1:
            return x, y, 1.0
        xs, ys = x.tensor_split(self.size), y.tensor_split(self.size)
        return xs[self.rank], ys[self.rank], len(xs[self.rank]) / max(len(x), 1)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def from_main(self, obj):
        """``obj`` as process 0 has it (decisions every process must take alike)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class LossModule(nn.Module):
    """``forward(x, y) -> (neg_elbo, terms)``: the objective as a module holding the model and
    the guide, so ``DistributedDataParallel`` can reduce the gradients of both."""

    def __init__(self, model: nn.Module, guide: nn.Module, loss_fn):
        super().__init__()
        self.model, self.guide = model, guide
        self._loss_fn = (loss_fn,)  # a plain callable, not a submodule

    def forward(self, x, y):
        return self._loss_fn[0](x, y)


def data_parallel(module: LossModule, world: World, device: torch.device,
                  find_unused: bool = False) -> nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when there are several processes.
    ``find_unused``: some parameters get no gradient in some steps (a q(d) held by the warm-up)."""
    if world.size == 1:
        return module
    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                               find_unused_parameters=find_unused)


def init_from_environment() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment):
    NCCL on CUDA, gloo on CPU. Returns True when this call created the group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """Mixed precision for the forward pass (``fp32``: none). The families compute their
    log-likelihoods (log-softmax, log-sum-exp) in float32 and their KLs from float32
    parameters, so only the network's matrix products run in low precision."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
