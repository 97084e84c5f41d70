"""Multi-exit backbones: one forward pass returns the logits of every exit and the feature vector
each exit's final linear layer reads.

``stem -> block_1 -> exit 1 -> block_2 -> exit 2 -> ... -> block_K -> exit K``

An exit head is ``features`` (the head's layers up to its last linear layer, giving
``phi_k [B, D_k]``) followed by ``linear`` (a plain ``nn.Linear``, ``phi_k -> logits``), so a
Laplace approximation of the last layer can cache ``phi_k`` and read or swap the linear layer.
A block's state is a tensor, or a list of tensors ordered fine to coarse (MSDNet's scales); the
exit reads the last (coarsest) one.

Gradient equilibrium (IMTA, Li et al. 2019; BoostNet's ``msdnet_ge``, methods.md §3.3) is a
switch: an identity whose backward pass makes the gradient reaching the output of block ``i``
(0-based, ``N`` blocks) ``(g_head_i + (N - i - 1) g_later) / (N - i)``. Only the tensor the exit
reads is rescaled; gradients later blocks send back through the other scales are not.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .residual import BasicBlock


class ScaleGradient(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` unchanged, its gradient multiplied by ``scale`` (skipped when nothing needs it)."""
    if scale == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return ScaleGradient.apply(x, scale)


def gradient_equilibrium(x: torch.Tensor, block: int, num_blocks: int):
    """``(to_head, to_later)``: two identities of ``x``, the output of block ``block`` (0-based)
    of ``num_blocks``, whose gradients are scaled by ``1 / (N - i)`` and ``(N - i - 1) / (N - i)``,
    so the gradient at ``x`` is ``(g_head + (N - i - 1) g_later) / (N - i)``."""
    remaining = num_blocks - block
    return scale_gradient(x, 1.0 / remaining), scale_gradient(x, (remaining - 1) / remaining)


class ExitHead(nn.Module):
    """An exit: ``features`` (activation -> ``phi [B, D]``) then ``linear`` (``phi`` -> logits)."""

    def __init__(self, features: nn.Module, linear: nn.Linear):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"an exit's final layer must be an nn.Linear, got {type(linear).__name__}")
        self.features = features
        self.linear = linear

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(h))


class ExitOutputs(NamedTuple):
    """``logits [K, *lead, B, C]`` of exits ``1..K`` and ``features``: ``K`` tensors
    ``[*lead, B, D_k]``, what each exit's final linear layer reads."""

    logits: torch.Tensor
    features: tuple[torch.Tensor, ...]


def coarsest(state):
    """The tensor an exit reads from a block's state (a tensor or a fine-to-coarse list)."""
    return state[-1] if isinstance(state, list) else state


def select(state, index: torch.Tensor):
    """The rows ``index`` of a block's state (for dropping inputs that have exited)."""
    if isinstance(state, list):
        return [s[index] for s in state]
    return state[index]


class MultiExitStack(nn.Module):
    """A network with an exit after each block.

    Args:
        stem: maps inputs ``[B, *input_shape]`` to the first block's state.
        blocks: ``K`` modules, each mapping a state to the next.
        heads: ``K`` ``ExitHead``s; head ``k`` reads the coarsest tensor of block ``k``'s output.
        input_ndim: trailing input dims (3 for images, 1 for vectors); leading dims beyond the
            batch (Monte Carlo samples) are flattened into the batch and restored.
        gradient_equilibrium: rescale gradients between exits and later blocks (see the module
            docstring); the forward pass is unchanged.
    """

    def __init__(self, stem: nn.Module, blocks, heads, input_ndim: int = 3,
                 gradient_equilibrium: bool = False):
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        if len(self.blocks) != len(self.heads) or not self.blocks:
            raise ValueError(f"need one head per block and at least one block, got "
                             f"{len(self.blocks)} blocks and {len(self.heads)} heads")
        if not all(isinstance(h, ExitHead) for h in self.heads):
            raise TypeError("heads must be bayesdyn.nn.ExitHead modules (features + nn.Linear)")
        self.input_ndim = input_ndim
        self.gradient_equilibrium = gradient_equilibrium

    @property
    def num_exits(self) -> int:
        return len(self.blocks)

    def check_exit(self, k: int) -> int:
        """``k`` when it is an exit of this stack (0-based), else a clear error."""
        if not 0 <= k < self.num_exits:
            raise ValueError(f"exit index must be in 0..{self.num_exits - 1} (0-based), got {k}")
        return k

    def start(self, x: torch.Tensor):
        """``(state, lead)``: the stem's output for ``x [*lead, B, ...]`` with the leading and batch
        dims flattened into one, and those dims ``lead + (B,)`` to restore."""
        lead = x.shape[: x.ndim - self.input_ndim]
        return self.stem(x.reshape(-1, *x.shape[len(lead):])), lead

    def step(self, state, k: int):
        """Run block ``k`` and its exit: ``(state for block k + 1, logits [B, C], phi [B, D])``."""
        state = self.blocks[k](state)
        to_head = coarsest(state)
        if self.gradient_equilibrium:
            to_head, to_later = gradient_equilibrium(to_head, k, self.num_exits)
            state = [*state[:-1], to_later] if isinstance(state, list) else to_later
        phi = self.heads[k].features(to_head)
        return state, self.heads[k].linear(phi), phi

    def forward(self, x: torch.Tensor, until: int | None = None) -> ExitOutputs:
        """Exits ``0..until`` (default: all) from one pass: blocks and heads after ``until`` are
        not run. ``logits [until + 1, *lead, B, C]``, features ``[*lead, B, D_k]`` each."""
        until = self.num_exits - 1 if until is None else self.check_exit(until)
        state, lead = self.start(x)
        logits, features = [], []
        for k in range(until + 1):
            state, f, phi = self.step(state, k)
            logits.append(f.reshape(*lead, *f.shape[1:]))
            features.append(phi.reshape(*lead, *phi.shape[1:]))
        return ExitOutputs(torch.stack(logits), tuple(features))

    def truncated(self, k: int) -> nn.Module:
        """The plain network of exit ``k`` alone (stem, blocks ``0..k``, head ``k``; shares weights)."""
        return TruncatedExit(self, self.check_exit(k))


class TruncatedExit(nn.Module):
    """Exit ``k``'s network on its own: ``x -> logits [*lead, B, C]`` without the other heads."""

    def __init__(self, stack: MultiExitStack, k: int):
        super().__init__()
        self.stem, self.k = stack.stem, k
        self.blocks = nn.ModuleList(stack.blocks[: k + 1])
        self.head = stack.heads[k]
        self.input_ndim = stack.input_ndim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.ndim - self.input_ndim]
        state = self.stem(x.reshape(-1, *x.shape[len(lead):]))
        for block in self.blocks:
            state = block(state)
        f = self.head(coarsest(state))
        return f.reshape(*lead, *f.shape[1:])


def multiexit_mlp(in_features: int, num_classes: int, width: int = 64, exits: int = 4,
                  input_shape: tuple[int, ...] | None = None,
                  gradient_equilibrium: bool = False) -> MultiExitStack:
    """A fully connected net with an exit after each hidden layer (``Linear-BN-ReLU``); each
    exit is ``Linear(width, num_classes)`` on the hidden activation (``phi`` = the activation).
    ``input_shape`` (e.g. ``(1, 8, 8)``) flattens image inputs first."""
    if exits < 1 or width < 1:
        raise ValueError(f"exits and width must be >= 1, got {exits}, {width}")
    image = input_shape is not None and len(input_shape) > 1
    stem = nn.Flatten() if image else nn.Identity()

    def layer(n_in):
        return nn.Sequential(nn.Linear(n_in, width), nn.BatchNorm1d(width), nn.ReLU())

    blocks = [layer(in_features if k == 0 else width) for k in range(exits)]
    heads = [ExitHead(nn.Identity(), nn.Linear(width, num_classes)) for _ in range(exits)]
    return MultiExitStack(stem, blocks, heads, input_ndim=len(input_shape) if input_shape else 1,
                          gradient_equilibrium=gradient_equilibrium)


def multiexit_resnet(in_channels: int, num_classes: int, stages=(2, 2, 2), widths=(16, 32, 64),
                     exits_after=None, gradient_equilibrium: bool = False) -> MultiExitStack:
    """A CIFAR-style ResNet (3x3 stem, no max-pool; basic blocks; stride 2 at the start of each
    stage after the first) with exits after the chosen residual blocks.

    ``exits_after``: 1-based indices of the residual blocks followed by an exit (default: the
    last block of every stage); the last block always has one. Each exit is global average
    pooling (``phi`` = the pooled channels) and a linear layer."""
    if len(stages) != len(widths) or not stages or min(stages) < 1:
        raise ValueError("need one width per stage and at least one block per stage")
    residual, channels, c_in = [], [], widths[0]
    for i, (n, width) in enumerate(zip(stages, widths, strict=True)):
        for j in range(n):
            residual.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1))
            c_in = width
            channels.append(width)
    total = len(residual)
    if exits_after is None:
        exits_after = [sum(stages[: i + 1]) for i in range(len(stages))]
    exits_after = sorted(set(exits_after) | {total})
    if exits_after[0] < 1 or exits_after[-1] > total:
        raise ValueError(f"exits_after must hold block indices in 1..{total}, got {exits_after}")
    stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                         nn.BatchNorm2d(widths[0]), nn.ReLU())
    blocks, heads, start = [], [], 0
    for end in exits_after:
        blocks.append(nn.Sequential(*residual[start:end]))
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        heads.append(ExitHead(pool, nn.Linear(channels[end - 1], num_classes)))
        start = end
    return MultiExitStack(stem, blocks, heads, gradient_equilibrium=gradient_equilibrium)


def evenly_spaced_exits(num_blocks: int, exits: int) -> list[int]:
    """1-based block indices of ``exits`` exits spread evenly over ``num_blocks`` blocks, the last
    at the end."""
    if not 1 <= exits <= num_blocks:
        raise ValueError(f"need 1 <= exits <= {num_blocks} (the number of blocks), got {exits}")
    return sorted({round(num_blocks * (k + 1) / exits) for k in range(exits)})
