"""Several plain networks run as one: every parameter carries a leading member dimension ``[M, ...]``.

A *plain* network (``PlainSpec``) is a stack of units ``layer -> BatchNorm -> scale -> ReLU``
(``layer`` a 3x3 convolution or a linear map; ``"M"`` entries are 2x2 max pools) followed by a
linear classifier (after global average pooling for conv nets). Each unit's output channels are
the prunable channels of the structured ensemble (methods.md §5.2): a channel scale ``s [M, C]``
multiplies them, and pruning a channel removes its row of the layer, its BatchNorm entries and its
column of the next layer.

``StackedNet`` computes M such networks of equal widths in one pass without ``vmap``: linear
layers are one batched matmul (``baddbmm``), convolutions one grouped convolution (``groups=M``,
members side by side in the channel dimension), BatchNorm one ``BatchNorm(M * C)`` over that
layout, so each member keeps its own batch statistics and running averages. Members may see the
same inputs ``[B, ...]`` or their own ``[M, B, ...]`` (the mask stage's batch chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PlainSpec:
    """Architecture of a plain network.

    Args:
        input_shape: one input, ``(C, H, W)`` for conv nets, any shape for MLPs (flattened).
        layers: widths of the units in order; conv nets may put ``"M"`` (2x2 max pool) between.
        num_classes: outputs of the classifier.
        conv: 3x3 convolutions (``True``) or linear units on the flattened input.
        batch_norm: BatchNorm after every unit's layer.
    """

    input_shape: tuple
    layers: tuple
    num_classes: int
    conv: bool = False
    batch_norm: bool = True

    def __post_init__(self):
        widths = self.widths
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"layers must hold widths >= 1 (and 'M' pools for conv nets), got "
                             f"{self.layers}")
        if not self.conv and "M" in self.layers:
            raise ValueError("max pools ('M') need conv=True")
        if self.conv and len(self.input_shape) != 3:
            raise ValueError(f"conv nets take (C, H, W) inputs, got {self.input_shape}")
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {self.num_classes}")

    @property
    def widths(self) -> tuple[int, ...]:
        """Widths of the prunable units (the pools left out)."""
        return tuple(w for w in self.layers if w != "M")

    def with_widths(self, widths) -> PlainSpec:
        """The same layout with other unit widths (an extracted member)."""
        widths = iter(int(w) for w in widths)
        layers = tuple("M" if w == "M" else next(widths) for w in self.layers)
        return PlainSpec(tuple(self.input_shape), layers, self.num_classes, self.conv,
                         self.batch_norm)


def _init_uniform_(tensor: torch.Tensor, fan_in: int) -> None:
    """PyTorch's default init of Linear/Conv2d weights and biases (U(-1/sqrt(fan_in), ..))."""
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(tensor, -bound, bound)


class StackedNet(nn.Module):
    """``M`` plain networks of one ``spec`` as one module: ``forward(x) -> logits [M, B, C]``.

    ``x`` is ``[B, *input_shape]`` (every member sees it) or ``[M, B, *input_shape]`` (member
    ``m`` sees ``x[m]``). ``scales`` (a list, one ``[M, C_l]`` per unit) multiply each unit's
    channels after BatchNorm; binary scales give the masked network. ``members=k`` runs only the
    first ``k`` members (their parameters sliced, so FLOPs are those of ``k`` members).
    """

    def __init__(self, spec: PlainSpec, members: int = 1):
        super().__init__()
        if not isinstance(members, int) or members < 1:
            raise ValueError(f"members must be an integer >= 1, got {members}")
        self.spec, self.members = spec, members
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.norms = nn.ModuleList()
        fan = spec.input_shape[0] if spec.conv else math.prod(spec.input_shape)
        for width in spec.widths:
            shape = (members, width, fan, 3, 3) if spec.conv else (members, width, fan)
            self.weights.append(nn.Parameter(torch.empty(shape)))
            self.biases.append(nn.Parameter(torch.empty(members, width)))
            fan_in = fan * 9 if spec.conv else fan
            _init_uniform_(self.weights[-1].data, fan_in)
            _init_uniform_(self.biases[-1].data, fan_in)
            if spec.batch_norm:
                norm = nn.BatchNorm2d if spec.conv else nn.BatchNorm1d
                self.norms.append(norm(members * width))
            fan = width
        self.classifier_weight = nn.Parameter(torch.empty(members, spec.num_classes, fan))
        self.classifier_bias = nn.Parameter(torch.empty(members, spec.num_classes))
        _init_uniform_(self.classifier_weight.data, fan)
        _init_uniform_(self.classifier_bias.data, fan)

    def forward(self, x: torch.Tensor, scales=None, members: int | None = None) -> torch.Tensor:
        k = self.members if members is None else members
        h = self.features(x, scales, k)
        return torch.baddbmm(self.classifier_bias[:k].unsqueeze(1), h,
                             self.classifier_weight[:k].transpose(1, 2))

    def features(self, x: torch.Tensor, scales=None, members: int | None = None) -> torch.Tensor:
        """The classifier's inputs ``[k, B, C_last]`` (after global pooling for conv nets)."""
        k = self.members if members is None else members
        if not 1 <= k <= self.members:
            raise ValueError(f"members must be in 1..{self.members}, got {k}")
        shared = x.dim() == len(self.spec.input_shape) + 1
        if not shared and x.shape[0] != k:
            raise ValueError(f"per-member inputs need a leading dimension of {k}, got "
                             f"{tuple(x.shape)}")
        if scales is not None and len(scales) != len(self.spec.widths):
            raise ValueError(f"pass one scale per unit ({len(self.spec.widths)}), got {len(scales)}")
        return self._conv_units(x, shared, k, scales) if self.spec.conv else \
            self._linear_units(x, shared, k, scales)

    def _norm(self, i: int, h: torch.Tensor, k: int) -> torch.Tensor:
        """BatchNorm of unit ``i`` on the grouped layout ``[B, k * C, ...]``: the first ``k``
        members' channels of the ``BatchNorm(M * C)``."""
        if not self.spec.batch_norm:
            return h
        norm = self.norms[i]
        n = h.shape[1]
        running = norm.running_mean is not None
        train_stats = norm.training or not running
        momentum = 0.1 if norm.momentum is None else norm.momentum
        if norm.training and running:
            norm.num_batches_tracked.add_(1)
        return F.batch_norm(h, norm.running_mean[:n] if running else None,
                            norm.running_var[:n] if running else None, norm.weight[:n],
                            norm.bias[:n], train_stats, momentum, norm.eps)

    def _linear_units(self, x, shared, k, scales):
        batch = x.shape[0] if shared else x.shape[1]
        h = x.reshape(batch, -1) if shared else x.reshape(k, batch, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            width = w.shape[1]
            if h.dim() == 2:  # the shared input: one matmul for every member, [B, k * C]
                h = torch.addmm(b[:k].flatten(), h, w[:k].flatten(0, 1).T)
            else:
                h = torch.baddbmm(b[:k].unsqueeze(1), h, w[:k].transpose(1, 2))
                h = h.transpose(0, 1).reshape(batch, k * width)
            h = self._norm(i, h, k)
            h = h.view(batch, k, width).transpose(0, 1)  # [k, B, C]
            if scales is not None:
                h = h * scales[i][:k, None, :]
            h = torch.relu(h)
        return h

    def _conv_units(self, x, shared, k, scales):
        # members side by side in the channels: the grouped layout [B, k * C, H, W]
        h = x if shared else x.transpose(0, 1).flatten(1, 2)
        batch, unit = h.shape[0], 0
        for entry in self.spec.layers:
            if entry == "M":
                h = F.max_pool2d(h, 2)
                continue
            w, b = self.weights[unit][:k], self.biases[unit][:k]
            # a shared input meets every member's first filters in one dense convolution
            groups = 1 if shared and unit == 0 else k
            h = F.conv2d(h, w.flatten(0, 1), b.flatten(), padding=1, groups=groups)
            h = self._norm(unit, h, k)
            if scales is not None:
                h = h * scales[unit][:k].reshape(1, -1, 1, 1)
            h = torch.relu(h)
            unit += 1
        return h.mean((2, 3)).view(batch, k, -1).transpose(0, 1)  # global average pool


def _copy_member(dst: StackedNet, i: int, src: StackedNet, j: int, kept=None) -> None:
    """Member ``i`` of ``dst`` <- member ``j`` of ``src``, keeping the channels ``kept[l]`` of
    each unit (``None``: all)."""
    kept = kept or [torch.arange(w) for w in src.spec.widths]
    previous = None  # input channels kept (None: the network's input, all kept)
    with torch.no_grad():
        for unit, index in enumerate(kept):
            w = src.weights[unit][j].index_select(0, index)
            if previous is not None:
                w = w.index_select(1, previous)
            dst.weights[unit][i].copy_(w)
            dst.biases[unit][i].copy_(src.biases[unit][j].index_select(0, index))
            if src.spec.batch_norm:
                s_norm, d_norm = src.norms[unit], dst.norms[unit]
                s_width, d_width = src.spec.widths[unit], dst.spec.widths[unit]
                rows = index + j * s_width
                for name in ("weight", "bias", "running_mean", "running_var"):
                    source = getattr(s_norm, name)
                    if source is not None:
                        getattr(d_norm, name)[i * d_width:(i + 1) * d_width].copy_(source[rows])
            previous = index
        dst.classifier_weight[i].copy_(src.classifier_weight[j].index_select(1, previous))
        dst.classifier_bias[i].copy_(src.classifier_bias[j])


def extract(net: StackedNet, kept, member: int = 0) -> StackedNet:
    """Member ``member`` of ``net`` with only the channels ``kept[l]`` (sorted indices, one
    ``LongTensor`` per unit) of each unit: a physically smaller dense network whose weights are
    copies of ``net``'s (rows of the unit, columns of the next layer, BatchNorm entries)."""
    if len(kept) != len(net.spec.widths):
        raise ValueError(f"kept needs one index tensor per unit ({len(net.spec.widths)})")
    kept = [torch.as_tensor(k, dtype=torch.long, device=net.classifier_bias.device).sort().values
            for k in kept]
    for index, width in zip(kept, net.spec.widths, strict=True):
        if index.numel() == 0 or index.min() < 0 or index.max() >= width:
            raise ValueError(f"every unit keeps at least one channel, indices in 0..{width - 1}")
    spec = net.spec.with_widths(len(k) for k in kept)
    out = StackedNet(spec, 1).to(net.classifier_bias.device)
    _copy_member(out, 0, net, member, kept)
    return out.train(net.training)


def stack_members(nets) -> StackedNet:
    """One ``StackedNet`` holding the members of ``nets`` (equal specs) in order."""
    nets = list(nets)
    spec = nets[0].spec
    if any(n.spec != spec for n in nets):
        raise ValueError("only networks of one spec (equal widths) can be stacked")
    out = StackedNet(spec, sum(n.members for n in nets)).to(nets[0].classifier_bias.device)
    i = 0
    for net in nets:
        for j in range(net.members):
            _copy_member(out, i, net, j)
            i += 1
    return out.train(nets[0].training)


def member_of(net: StackedNet, member: int) -> StackedNet:
    """A one-member copy of member ``member``."""
    return extract(net, [torch.arange(w) for w in net.spec.widths], member)


def to_sequential(net: StackedNet, member: int = 0) -> nn.Sequential:
    """Member ``member`` as an ordinary ``nn.Sequential`` of ``Conv2d``/``Linear``,
    ``BatchNorm``, ``ReLU``, pools and the classifier (the same function, weights copied)."""
    spec, layers, unit = net.spec, [], 0
    fan = spec.input_shape[0] if spec.conv else math.prod(spec.input_shape)
    if not spec.conv:
        layers.append(nn.Flatten())
    with torch.no_grad():
        for entry in spec.layers:
            if entry == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layer = nn.Conv2d(fan, entry, 3, padding=1) if spec.conv else nn.Linear(fan, entry)
            layer.weight.copy_(net.weights[unit][member])
            layer.bias.copy_(net.biases[unit][member])
            layers.append(layer)
            if spec.batch_norm:
                norm = (nn.BatchNorm2d if spec.conv else nn.BatchNorm1d)(entry)
                rows = slice(member * entry, (member + 1) * entry)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(norm, name).copy_(getattr(net.norms[unit], name)[rows])
                layers.append(norm)
            layers.append(nn.ReLU())
            fan, unit = entry, unit + 1
        if spec.conv:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        classifier = nn.Linear(fan, spec.num_classes)
        classifier.weight.copy_(net.classifier_weight[member])
        classifier.bias.copy_(net.classifier_bias[member])
    return nn.Sequential(*layers, classifier).to(net.classifier_bias.device).train(net.training)
