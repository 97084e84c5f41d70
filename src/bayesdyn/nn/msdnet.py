"""MSDNet, the multi-scale dense network (Huang et al., ICLR 2018), CIFAR variant, as a
``MultiExitStack`` (methods.md §2.2, §3.5).

The network keeps ``S = len(gr_factor)`` feature maps, fine to coarse (each coarser one at half
the resolution). Every layer adds new channels at each scale, concatenated after its input
(dense connectivity): a 3x3 conv of the same-scale map and, where a finer map exists, a strided
3x3 conv of it (half the growth each). As the network deepens the finest scales are dropped
(``prune``), with a 1x1 transition that compresses the channels (``reduction``) where that
happens. Exit ``k`` follows block ``k`` (``base`` layers for the first block, then ``step`` or
``step * k + 1`` layers) and reads the coarsest scale: two 3x3 stride-2 conv-BN-ReLU layers of
``head_channels``, average pooling (``phi``, the feature vector), a linear layer.

Written from the paper's and methods.md's description; MSDNet-PyTorch (kalviny) was read to
check the layer schedule, nothing is copied. The pooling is global (``AdaptiveAvgPool2d``):
identical to MSDNet's 2x2 average pool on 32x32 and 28x28 inputs, where the map is 2x2 there, and
defined for smaller inputs too.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .multiexit import ExitHead, MultiExitStack

# The CIFAR configurations (methods.md §2.2 and §3.5); the rest of the arguments are CIFAR_COMMON.
MSDNET_CIFAR = {
    "small": dict(num_blocks=4, step_mode="lin_grow", step=1, base=1),   # Meronen et al.
    "medium": dict(num_blocks=6, step_mode="lin_grow", step=1, base=1),
    "large": dict(num_blocks=8, step_mode="lin_grow", step=1, base=1),
    "boostnet-anytime": dict(num_blocks=10, step_mode="even", step=2, base=4),  # BoostNet
    "boostnet-budgeted": dict(num_blocks=6, step_mode="even", step=2, base=4),
}
CIFAR_COMMON = dict(channels=16, growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4),
                    bottleneck=True, prune="max", reduction=0.5)


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


def conv_unit(c_in: int, c_out: int, stride: int, bottleneck: bool, bn_factor: int) -> nn.Sequential:
    """An optional 1x1 bottleneck to ``min(c_in, bn_factor * c_out)`` channels, then a 3x3 conv."""
    layers = []
    if bottleneck:
        inner = min(c_in, bn_factor * c_out)
        layers.append(conv_bn_relu(c_in, inner, 1))
        c_in = inner
    layers.append(conv_bn_relu(c_in, c_out, 3, stride))
    return nn.Sequential(*layers)


class ScaleUnit(nn.Module):
    """One scale of one layer: ``[same, down(finer), conv(same)]`` concatenated on channels, or
    ``[same, conv(same)]`` where no finer map feeds this scale."""

    def __init__(self, c_same: int, c_finer: int | None, growth: int, bottleneck: bool,
                 bn_same: int, bn_finer: int | None):
        super().__init__()
        if c_finer is None:
            self.down = None
            self.same = conv_unit(c_same, growth, 1, bottleneck, bn_same)
        else:
            self.down = conv_unit(c_finer, growth // 2, 2, bottleneck, bn_finer)
            self.same = conv_unit(c_same, growth // 2, 1, bottleneck, bn_same)

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([same, self.same(same)], 1)
        return torch.cat([same, self.down(finer), self.same(same)], 1)


class MSDLayer(nn.Module):
    """A layer across scales: takes the ``in_scales`` coarsest maps, returns the
    ``out_scales <= in_scales`` coarsest (the finest input then only feeds the next scale)."""

    def __init__(self, channels: int, growth_rate: int, gr_factor, bn_factor, bottleneck: bool,
                 in_scales: int, out_scales: int):
        super().__init__()
        n_scales = len(gr_factor)
        self.discard = in_scales - out_scales
        units = []
        for j, s in enumerate(range(n_scales - out_scales, n_scales)):
            has_finer = j + self.discard > 0
            units.append(ScaleUnit(channels * gr_factor[s],
                                   channels * gr_factor[s - 1] if has_finer else None,
                                   growth_rate * gr_factor[s], bottleneck, bn_factor[s],
                                   bn_factor[s - 1] if has_finer else None))
        self.units = nn.ModuleList(units)

    def forward(self, maps: list) -> list:
        out = []
        for j, unit in enumerate(self.units):
            i = j + self.discard  # this scale's position among the inputs
            out.append(unit(maps[i], maps[i - 1] if i > 0 else None))
        return out


class PerScale(nn.ModuleList):
    """Applies module ``i`` to map ``i`` (a transition: one 1x1 conv per scale)."""

    def forward(self, maps: list) -> list:
        return [m(x) for m, x in zip(self, maps, strict=True)]


class Stem(nn.Module):
    """The first layer: a 3x3 conv at full resolution, then one stride-2 3x3 conv per coarser scale."""

    def __init__(self, in_channels: int, channels: int, gr_factor):
        super().__init__()
        convs, c_in = [], in_channels
        for s, factor in enumerate(gr_factor):
            convs.append(conv_bn_relu(c_in, channels * factor, 3, 1 if s == 0 else 2))
            c_in = channels * factor
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> list:
        maps = []
        for conv in self.convs:
            x = conv(x)
            maps.append(x)
        return maps


def block_steps(num_blocks: int, step: int, base: int, step_mode: str) -> list[int]:
    """Layers per block: ``base`` first, then ``step`` each (``even``) or ``step * k + 1``
    (``lin_grow``)."""
    return [base] + [step if step_mode == "even" else step * k + 1 for k in range(1, num_blocks)]


def scales_at(layer: int, total: int, n_scales: int, prune: str) -> tuple[int, int]:
    """``(in_scales, out_scales)`` of layer ``layer`` (1-based) of ``total``."""
    if prune == "max":  # drop a scale every ceil(total / S) layers
        interval = math.ceil(total / n_scales)
        return (n_scales - max(0, layer - 2) // interval, n_scales - (layer - 1) // interval)
    return min(n_scales, total - layer + 2), min(n_scales, total - layer + 1)  # "min"


def _check(num_blocks, step, base, step_mode, growth_rate, gr_factor, bn_factor, prune, reduction):
    if step_mode not in ("even", "lin_grow"):
        raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
    if prune not in ("max", "min"):
        raise ValueError(f"prune must be 'max' or 'min', got {prune!r}")
    if num_blocks < 1 or base < 1 or step < (1 if step_mode == "even" else 0):
        raise ValueError(f"need num_blocks >= 1, base >= 1 and a positive step, got "
                         f"{num_blocks}, {base}, {step}")
    if len(bn_factor) != len(gr_factor) or not gr_factor:
        raise ValueError(f"bn_factor needs one entry per scale like gr_factor, got {bn_factor} "
                         f"and {gr_factor}")
    if growth_rate < 2 or growth_rate % 2:
        raise ValueError(f"growth_rate must be even (two convs share it), got {growth_rate}")
    if not 0 <= reduction <= 1:
        raise ValueError(f"reduction must be in [0, 1], got {reduction}")


def msdnet(in_channels: int, num_classes: int, *, num_blocks: int = 10, step: int = 2,
           base: int = 4, step_mode: str = "even", channels: int = 16, growth_rate: int = 6,
           gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), bottleneck: bool = True,
           prune: str = "max", reduction: float = 0.5, head_channels: int = 128,
           gradient_equilibrium: bool = False) -> MultiExitStack:
    """MSDNet for 32x32 / 28x28 images (CIFAR layout) with ``num_blocks`` exits.

    The defaults are BoostNet's CIFAR-100 anytime network; ``MSDNET_CIFAR[name]`` holds the
    other configurations (``msdnet(3, 100, **MSDNET_CIFAR["small"])``). MSDNet-PyTorch's names:
    nBlocks, step, base, stepmode, nChannels, growthRate, grFactor, bnFactor, bottleneck, prune,
    reduction. ``gradient_equilibrium=True`` is BoostNet's ``msdnet_ge``."""
    _check(num_blocks, step, base, step_mode, growth_rate, gr_factor, bn_factor, prune, reduction)
    n_scales = len(gr_factor)
    steps = block_steps(num_blocks, step, base, step_mode)
    total, layer = sum(steps), 0
    blocks, heads, c = [], [], channels
    for n_layers in steps:
        layers = []
        for _ in range(n_layers):
            layer += 1
            in_s, out_s = scales_at(layer, total, n_scales, prune)
            layers.append(MSDLayer(c, growth_rate, gr_factor, bn_factor, bottleneck, in_s, out_s))
            c += growth_rate
            transition = (in_s > out_s) if prune == "max" else layer in (total // 3, 2 * total // 3)
            if transition and reduction > 0:
                c_out = math.floor(reduction * c)
                layers.append(PerScale(conv_bn_relu(c * gr_factor[s], c_out * gr_factor[s], 1)
                                       for s in range(n_scales - out_s, n_scales)))
                c = c_out
        blocks.append(nn.Sequential(*layers))
        features = nn.Sequential(conv_bn_relu(c * gr_factor[-1], head_channels, 3, 2),
                                 conv_bn_relu(head_channels, head_channels, 3, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        heads.append(ExitHead(features, nn.Linear(head_channels, num_classes)))
    net = MultiExitStack(Stem(in_channels, channels, gr_factor), blocks, heads,
                         gradient_equilibrium=gradient_equilibrium)
    _initialise(net)
    return net


def _initialise(net: nn.Module) -> None:
    """MSDNet's initialisation: He-normal convs (fan-out), unit BatchNorm, zero linear biases."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
