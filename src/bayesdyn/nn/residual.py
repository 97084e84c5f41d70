"""Residual stacks whose one forward pass returns the output of every depth ``d = 0..D``.

``input block -> D residual blocks -> (per-depth adapter) -> shared output block``: the output
block is applied to all depths at once, as one batched call on the stacked activations, so the
``D + 1`` predictions cost one pass through the blocks plus ``D + 1`` light heads.
"""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """``a + f(a)``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, a):
        return a + self.body(a)


class DepthStack(nn.Module):
    """A network that returns the output of every depth.

    Args:
        input_block: maps inputs ``[B, *input_shape]`` to the first activation (depth 0).
        blocks: ``D`` blocks, each mapping one activation to the next (each block carries its own
            skip connection).
        output_block: the head shared by all depths. It must treat examples independently (no
            BatchNorm), since all depths go through it as one batch.
        adapters: optional ``D + 1`` modules bringing each depth's activation to the output
            block's input shape (for nets whose stages change resolution, as in DUN).
        input_ndim: number of trailing input dims (3 for images, 1 for vectors); leading dims
            beyond the batch (e.g. Monte Carlo samples) are flattened and restored.
    """

    def __init__(self, input_block, blocks, output_block, adapters=None, input_ndim: int = 3):
        super().__init__()
        self.input_block = input_block
        self.blocks = nn.ModuleList(blocks)
        self.output_block = output_block
        self.adapters = nn.ModuleList(adapters) if adapters is not None else None
        if self.adapters is not None and len(self.adapters) != len(self.blocks) + 1:
            raise ValueError(f"need {len(self.blocks) + 1} adapters (one per depth), "
                             f"got {len(self.adapters)}")
        self.input_ndim = input_ndim

    @property
    def max_depth(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, output_params: dict | None = None) -> torch.Tensor:
        """Outputs of every depth, ``[D + 1, *lead, B, out]`` for ``x`` of shape ``[*lead, B, ...]``.

        ``output_params``: parameters for the shared output block instead of its own (sampled
        weights); with a leading sample dim ``[S, ...]`` the result is ``[S, D + 1, B, out]``."""
        if output_params is not None:
            return self._forward_with_output_params(x, output_params)
        lead = x.shape[: x.ndim - self.input_ndim]
        stacked = self.features(x.reshape(-1, *x.shape[len(lead):]))  # [D+1, B', ...]
        out = self.output_block(stacked.flatten(0, 1)).unflatten(0, stacked.shape[:2])
        return out.reshape(stacked.shape[0], *lead, out.shape[-1])

    def _forward_with_output_params(self, x, params):
        from torch.func import functional_call, vmap

        feats = self.features(x)  # [D+1, B, ...]
        flat = feats.flatten(0, 1)
        apply = lambda p: functional_call(self.output_block, p, (flat,))  # noqa: E731
        name, ref = next(iter(params.items()))
        if ref.dim() > dict(self.output_block.named_parameters())[name].dim():  # sample dim
            out = vmap(apply)(params)
            return out.unflatten(1, feats.shape[:2])
        return apply(params).unflatten(0, feats.shape[:2])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The output block's inputs for every depth, ``[D + 1, B, ...]`` (x is ``[B, ...]``)."""
        h = self.input_block(x)
        acts = [h]
        for block in self.blocks:
            h = block(h)
            acts.append(h)
        if self.adapters is not None:
            acts = [adapt(a) for adapt, a in zip(self.adapters, acts, strict=True)]
        return torch.stack(acts)

    def truncated(self, depth: int) -> nn.Sequential:
        """The plain network of depth ``depth`` (shares weights with this stack)."""
        if not 0 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in 0..{self.max_depth}, got {depth}")
        parts = [self.input_block, *self.blocks[:depth]]
        if self.adapters is not None:
            parts.append(self.adapters[depth])
        return nn.Sequential(*parts, self.output_block)


def residual_mlp(in_features: int, out_features: int, width: int = 100, depth: int = 5,
                 input_shape: tuple[int, ...] | None = None) -> DepthStack:
    """Fully connected residual net (DUN's regression nets): blocks linear-ReLU-BN.

    ``input_shape`` (e.g. ``(1, 8, 8)``) flattens image inputs first."""
    flatten = [nn.Flatten()] if input_shape is not None and len(input_shape) > 1 else []
    input_block = nn.Sequential(*flatten, nn.Linear(in_features, width), nn.ReLU())
    blocks = [Residual(nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.BatchNorm1d(width)))
              for _ in range(depth)]
    return DepthStack(input_block, blocks, nn.Linear(width, out_features),
                      input_ndim=len(input_shape) if input_shape else 1)


def _bottleneck(channels: int, hidden: int) -> Residual:
    """VDS's pre-activation bottleneck: BN-ReLU-1x1, BN-ReLU-3x3, BN-ReLU-1x1, added to the skip."""
    return Residual(nn.Sequential(
        nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, hidden, 1, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
        nn.BatchNorm2d(hidden), nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False),
    ))


def vds_convnet(in_channels: int, num_classes: int, depth: int = 10, channels: int = 64,
                hidden: int = 32) -> DepthStack:
    """VDS's image net: 5x5 conv + 2x2 average pool, ``depth`` bottleneck blocks at one
    resolution, global mean pool + linear shared by all depths. (VDS's output block also has a
    residual MLP block with BatchNorm; it is left out so the shared head is example-wise.)"""
    input_block = nn.Sequential(nn.Conv2d(in_channels, channels, 5, padding=2), nn.AvgPool2d(2))
    blocks = [_bottleneck(channels, hidden) for _ in range(depth)]
    # Each depth's final BN-ReLU is its own adapter, so the shared head has no BatchNorm.
    adapters = [nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) for _ in range(depth + 1)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return DepthStack(input_block, blocks, head, adapters=adapters)


class _ResNetBlock(nn.Module):
    """``relu(shortcut(a) + body(a))``, the body's last BatchNorm zero-initialised so blocks start
    as identities; a projection shortcut where the shape changes."""

    expansion = 1

    def __init__(self, body: nn.Sequential, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = body
        nn.init.zeros_(self.body[-1].weight)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU()

    def forward(self, a):
        return self.act(self.shortcut(a) + self.body(a))


class BasicBlock(_ResNetBlock):
    """ResNet-18's basic block: two 3x3 convs."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        body = nn.Sequential(
            nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        super().__init__(body, c_in, width, stride)


class Bottleneck(_ResNetBlock):
    """ResNet-50's bottleneck: 1x1 (width), 3x3 (width, stride), 1x1 (4 x width)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        c_out = width * self.expansion
        body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        super().__init__(body, c_in, c_out, stride)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def resnet_depth(in_channels: int, num_classes: int, stages=(2, 2, 2, 2),
                 widths=(64, 128, 256, 512), block: str = "basic",
                 shared_stages: int = 0) -> DepthStack:
    """A ResNet DUN with a CIFAR stem (3x3 conv, no max-pool) for 28x28 and 32x32 images.

    Depth ``d`` = output after ``d`` residual blocks of the first ``len(stages) - shared_stages``
    stages; each depth has a 1x1-conv adapter (stride, channels, BN, ReLU; identity where the
    shape already matches) to the input shape of the shared output block, which is the last
    ``shared_stages`` stages + global average pool + linear (as in DUN's ResNet-50, where stage 4
    is shared: every depth then pays for it). With ``shared_stages > 0`` the output block holds
    BatchNorm, whose training statistics pool all depths of a batch (as DUN's code does).
    ``resnet18_depth`` / ``resnet50_depth`` are the two standard settings."""
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
    if len(stages) != len(widths) or not 0 <= shared_stages < len(stages):
        raise ValueError("need one width per stage and 0 <= shared_stages < number of stages")
    block_cls = BLOCKS[block]
    stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                         nn.BatchNorm2d(widths[0]), nn.ReLU())
    stage_blocks, shapes = [], [(widths[0], 1)]  # (channels, cumulative stride) after each depth
    c_in, stride_total = widths[0], 1
    for i, (n_blocks, width) in enumerate(zip(stages, widths, strict=True)):
        stage = []
        for j in range(n_blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            stage.append(block_cls(c_in, width, stride))
            c_in, stride_total = width * block_cls.expansion, stride_total * stride
            shapes.append((c_in, stride_total))
        stage_blocks.append(stage)
    n_depth_stages = len(stages) - shared_stages
    blocks = [b for stage in stage_blocks[:n_depth_stages] for b in stage]
    shared = [b for stage in stage_blocks[n_depth_stages:] for b in stage]
    shapes = shapes[: len(blocks) + 1]
    final_c, final_stride = shapes[-1]
    adapters = []
    for c, s in shapes:
        if (c, s) == (final_c, final_stride):
            adapters.append(nn.Identity())
        else:
            adapters.append(nn.Sequential(
                nn.Conv2d(c, final_c, 1, final_stride // s, bias=False),
                nn.BatchNorm2d(final_c), nn.ReLU()))
    head = nn.Sequential(*shared, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    return DepthStack(stem, blocks, head, adapters=adapters)


def resnet18_depth(in_channels: int, num_classes: int, width: int = 64) -> DepthStack:
    """ResNet-18-like DUN: basic blocks (2, 2, 2, 2), 8 depths + the stem, pool + linear head."""
    return resnet_depth(in_channels, num_classes, (2, 2, 2, 2), _widths(width))


def resnet50_depth(in_channels: int, num_classes: int, width: int = 64) -> DepthStack:
    """DUN's ResNet-50: bottlenecks (3, 4, 6, 3); depths are the 13 blocks of stages 1-3 (and the
    stem); stage 4 + pool + linear is the shared output block. DUN's code keeps only depths 2..13
    (12 depths); here depths 0 and 1 exist too and get prior mass like the others."""
    return resnet_depth(in_channels, num_classes, (3, 4, 6, 3), _widths(width), "bottleneck",
                        shared_stages=1)


def _widths(width: int) -> tuple[int, ...]:
    return (width, 2 * width, 4 * width, 8 * width)
