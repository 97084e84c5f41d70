"""Residual stacks whose one forward pass returns the output of every depth ``d = 0..D``.

``input block -> D residual blocks -> (per-depth adapter) -> shared output block``: the output
block is applied to all depths at once, as one batched call on the stacked activations, so the
``D + 1`` predictions cost one pass through the blocks plus ``D + 1`` light heads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..validation import check_int


class Residual(nn.Module):
    """``a + f(a)``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, a):
        return a + self.body(a)


class DepthBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm for a block shared by all depths that runs on the stacked activations of
    ``depth_groups`` depths at once (``[G * B, C, H, W]``, depth-major): in training, each depth
    is normalised with its own batch statistics and the running statistics take the ``G``
    updates in depth order, exactly as running the block once per depth does (DUN's code), in
    one call. In eval mode, and with ``depth_groups = 1``, it is ``nn.BatchNorm2d``."""

    depth_groups = 1

    def forward(self, x):
        g = self.depth_groups
        if not self.training or g == 1:
            return super().forward(x)
        xg = x.unflatten(0, (g, -1))  # [G, B, C, H, W]
        mean = xg.mean((1, 3, 4))
        var = xg.var((1, 3, 4), unbiased=False)
        shape = (g, 1, -1, 1, 1)
        y = (xg - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, 1, -1, 1, 1) + self.bias.view(1, 1, -1, 1, 1)
        if self.track_running_stats:
            n = xg[0].numel() / xg.shape[2]  # examples x positions per channel
            self._update_running(mean.detach(), var.detach() * n / max(n - 1, 1))
        return y.flatten(0, 1)

    @torch.no_grad()
    def _update_running(self, means, variances) -> None:
        """``G`` sequential updates in closed form: with momentum ``m`` the running value
        becomes ``(1-m)^G r + sum_g m (1-m)^(G-1-g) v_g``; with ``momentum=None`` (cumulative
        average) the ``G`` values join the average."""
        g, seen = means.shape[0], int(self.num_batches_tracked)
        self.num_batches_tracked += g
        if self.momentum is None:
            self.running_mean.mul_(seen).add_(means.sum(0)).div_(seen + g)
            self.running_var.mul_(seen).add_(variances.sum(0)).div_(seen + g)
            return
        keep = 1.0 - self.momentum
        weights = self.momentum * keep ** torch.arange(g - 1, -1, -1, dtype=means.dtype,
                                                       device=means.device)
        self.running_mean.mul_(keep**g).add_(weights @ means)
        self.running_var.mul_(keep**g).add_(weights @ variances)


def per_depth_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` replaced by a ``DepthBatchNorm2d`` (same state)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = DepthBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            per_depth_batch_norm(child)
    return module


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
        norms = [m for m in self.output_block.modules() if isinstance(m, DepthBatchNorm2d)]
        for m in norms:  # one call, each depth's own batch statistics (as one call per depth)
            m.depth_groups = stacked.shape[0]
        try:
            out = self.output_block(stacked.flatten(0, 1)).unflatten(0, stacked.shape[:2])
        finally:
            for m in norms:
                m.depth_groups = 1
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
                 input_shape: tuple[int, ...] | None = None, input_relu: bool = True,
                 residual: bool = True) -> DepthStack:
    """Fully connected net whose blocks are linear-ReLU-BatchNorm, with a linear output layer
    shared by all depths.

    - default: a ReLU after the input layer (depth 0 is a one-hidden-layer network);
    - ``input_relu=False``: DUN's fully connected residual network exactly (its regression
      nets): the input layer is linear, so depth 0 is a linear model;
    - ``residual=False``: without skip connections (DUN's "DUN (MLP)" variant).

    ``input_shape`` (e.g. ``(1, 8, 8)``) flattens image inputs first."""
    for name, value, low in (("in_features", in_features, 1), ("out_features", out_features, 1),
                             ("width", width, 1), ("depth", depth, 0)):
        check_int(name, value, low)
    flatten = [nn.Flatten()] if input_shape is not None and len(input_shape) > 1 else []
    input_block = nn.Sequential(*flatten, nn.Linear(in_features, width),
                                *([nn.ReLU()] if input_relu else []))
    body = lambda: nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.BatchNorm1d(width))  # noqa: E731
    blocks = [Residual(body()) if residual else body() for _ in range(depth)]
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
    for name, value, low in (("in_channels", in_channels, 1), ("num_classes", num_classes, 1),
                             ("depth", depth, 0), ("channels", channels, 1), ("hidden", hidden, 1)):
        check_int(name, value, low)
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
                 widths=(64, 128, 256, 512), block: str = "basic", shared_stages: int = 0,
                 adapters: str = "dun", head_statistics: str = "per-depth") -> DepthStack:
    """A ResNet DUN with a CIFAR stem (3x3 conv, no max-pool) for 28x28 and 32x32 images.

    Depth ``d`` = output after ``d`` residual blocks of the first ``len(stages) - shared_stages``
    stages (depth 0: the stem). An adapter brings each depth's activation to the input shape of
    the shared output block, which is the last ``shared_stages`` stages + global average pool +
    linear (as in DUN's ResNet-50, where stage 4 is shared: every depth then pays for it).

    Args:
        adapters: ``"dun"`` (DUN's code: one 1x1-conv adapter per stage transition, stride 2,
            channels doubled, BN, ReLU, shared by every depth of a stage and chained, so a
            stage-1 depth goes through the stage 1->2 and 2->3 adapters) or ``"per-depth"``
            (one 1x1-conv adapter per depth straight to the output block's input shape).
        head_statistics: with ``shared_stages > 0`` the output block holds BatchNorm:
            ``"per-depth"`` (DUN's code, which runs the output block once per depth: per-depth
            batch statistics, one running-average update per depth; here in one call, see
            ``DepthBatchNorm2d``) or ``"pooled"`` (statistics over all depths of a batch).

    ``resnet18_depth`` / ``resnet50_depth`` are the two standard settings."""
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {', '.join(BLOCKS)}, got {block!r}")
    check_int("in_channels", in_channels, 1), check_int("num_classes", num_classes, 1)
    for i, (n, w) in enumerate(zip(stages, widths, strict=False)):
        check_int(f"stages[{i}]", n, 1), check_int(f"widths[{i}]", w, 1)
    if len(stages) != len(widths) or not 0 <= shared_stages < len(stages):
        raise ValueError("need one width per stage and 0 <= shared_stages < number of stages")
    if adapters not in ("dun", "per-depth") or head_statistics not in ("per-depth", "pooled"):
        raise ValueError(f"adapters must be 'dun' or 'per-depth' (got {adapters!r}) and "
                         f"head_statistics 'per-depth' or 'pooled' (got {head_statistics!r})")
    block_cls = BLOCKS[block]
    stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                         nn.BatchNorm2d(widths[0]), nn.ReLU())
    stage_blocks, stage_of = [], [0]  # stage_of[d]: the stage whose output shape depth d has
    c_in = widths[0]
    for i, (n_blocks, width) in enumerate(zip(stages, widths, strict=True)):
        stage = []
        for j in range(n_blocks):
            stage.append(block_cls(c_in, width, 2 if (i > 0 and j == 0) else 1))
            c_in = width * block_cls.expansion
            stage_of.append(i)
        stage_blocks.append(stage)
    n_depth_stages = len(stages) - shared_stages
    blocks = [b for stage in stage_blocks[:n_depth_stages] for b in stage]
    shared = [b for stage in stage_blocks[n_depth_stages:] for b in stage]
    stage_of = stage_of[: len(blocks) + 1]
    channels = [w * block_cls.expansion for w in widths]  # each stage's output channels
    build = _dun_adapters if adapters == "dun" else _per_depth_adapters
    depth_adapters = build(stage_of, channels, widths[0], n_depth_stages - 1)
    head = nn.Sequential(*shared, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))
    if head_statistics == "per-depth":
        per_depth_batch_norm(head)
    return DepthStack(stem, blocks, head, adapters=depth_adapters)


def _transition(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


def _dun_adapters(stage_of, channels, stem_channels, last):
    """DUN's adapters: transitions stage s -> s + 1 shared by all depths and chained."""
    steps = [_transition(channels[s], channels[s + 1], 2) for s in range(last)]
    stem = ([] if stem_channels == channels[0]
            else [_transition(stem_channels, channels[0], 1)])  # a stem narrower than stage 1
    out = []
    for d, s in enumerate(stage_of):
        chain = (stem if d == 0 else []) + steps[s:]
        out.append(nn.Sequential(*chain) if chain else nn.Identity())
    return out


def _per_depth_adapters(stage_of, channels, stem_channels, last):
    """One 1x1-conv adapter per depth, straight to the last depth stage's shape."""
    out = []
    for d, s in enumerate(stage_of):
        c = stem_channels if d == 0 else channels[s]
        if s == last and c == channels[last]:
            out.append(nn.Identity())
        else:
            out.append(_transition(c, channels[last], 2 ** (last - s)))
    return out


def resnet18_depth(in_channels: int, num_classes: int, width: int = 64, **options) -> DepthStack:
    """ResNet-18-like DUN: basic blocks (2, 2, 2, 2), 8 depths + the stem, pool + linear head
    (``options``: those of ``resnet_depth``)."""
    return resnet_depth(in_channels, num_classes, (2, 2, 2, 2), _widths(width), **options)


def resnet50_depth(in_channels: int, num_classes: int, width: int = 64, **options) -> DepthStack:
    """DUN's ResNet-50: bottlenecks (3, 4, 6, 3); depths are the 13 blocks of stages 1-3 (and the
    stem); stage 4 + pool + linear is the shared output block, with DUN's adapters and per-depth
    BatchNorm statistics by default. DUN's code keeps only depths 2..13 (12 depths); here depths
    0 and 1 exist too and get prior mass like the others (``options``: those of
    ``resnet_depth``)."""
    return resnet_depth(in_channels, num_classes, (3, 4, 6, 3), _widths(width), "bottleneck",
                        shared_stages=1, **options)


def _widths(width: int) -> tuple[int, ...]:
    return (width, 2 * width, 4 * width, 8 * width)
