"""Ordered (nested) Bayesian layers: output units in ``G`` contiguous groups, the first ``F``
always on, the rest switched off from the back by an ordering mask.

Inside the network every activation carries a leading sample dim: ``[S, B, ...]``. A layer runs
in one of three modes:
- local reparameterisation (training, Bayesian prediction): pre-activations are sampled from
  ``N(conv(x, mu), conv(x^2, sigma^2))``, independently per example and sample;
- mean weights (deterministic prediction, or a point-estimate layer);
- explicit weights ``[S, out, ...]`` drawn elsewhere (the Pyro model), applied per sample with a
  grouped convolution / batched matmul.
A *width* slices the weights to the first ``n`` output units and to the active inputs, so a
narrower network really computes less.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_int


class GaussianPreactivation(torch.autograd.Function):
    """``mean + sqrt(var) * eps``, ``eps ~ N(0, 1)``: the local reparameterisation draw.

    Written out by hand because the activations are the largest tensors of a step and autograd's
    version makes five extra passes over them (clamp, sqrt and their backward); this one keeps
    ``eps / (2 sqrt(var))``, the whole derivative with respect to ``var``."""

    @staticmethod
    def forward(ctx, mean, var):
        eps = torch.randn_like(mean)
        std = var.clamp_min(1e-16).sqrt_()  # var >= 0 up to rounding
        out = torch.addcmul(mean, std, eps)
        ctx.save_for_backward(eps.div_(std.mul_(2)))
        return out

    @staticmethod
    def backward(ctx, grad):
        (dvar,) = ctx.saved_tensors
        return grad, grad * dvar


class BayesLayer(nn.Module):
    """Base of ``BayesLinear`` / ``BayesConv2d``: mean-field Gaussian weights (point weights when
    ``bayesian=False``) and a deterministic bias."""

    def __init__(self, weight_shape, bayesian: bool = True, bias: bool = True,
                 init_log_sigma: float = -5.0):
        super().__init__()
        fan_in = math.prod(weight_shape[1:])
        self.weight_mu = nn.Parameter(torch.empty(weight_shape).uniform_(-1, 1) / math.sqrt(fan_in))
        self.bayesian = bayesian
        if bayesian:
            self.weight_log_sigma = nn.Parameter(torch.full(weight_shape, init_log_sigma))
        self.bias = nn.Parameter(torch.zeros(weight_shape[0])) if bias else None

    @property
    def out_units(self) -> int:
        return self.weight_mu.shape[0]

    def weight_sigma(self) -> torch.Tensor:
        return self.weight_log_sigma.exp()

    def _op(self, x, weight, bias):  # x [N, in, ...] -> [N, out, ...]
        raise NotImplementedError

    def _per_sample_op(self, x, weight, bias):  # x [S, B, ...], weight [S, out, ...]
        raise NotImplementedError

    def forward(self, x: torch.Tensor, n_out: int | None = None, sample: bool = True,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """``x [S, B, in, ...] -> [S, B, n_out, ...]`` (``n_out`` defaults to all units)."""
        n_out = self.out_units if n_out is None else n_out
        n_in = x.shape[2]
        bias = None if self.bias is None else self.bias[:n_out]
        if weight is not None:  # explicit draws [S, out, in, ...] from the Pyro model
            w = weight[:, :n_out, :n_in]
            samples = max(x.shape[0], w.shape[0])
            x = x.expand(samples, *x.shape[1:])
            return self._per_sample_op(x, w.expand(samples, *w.shape[1:]), bias)
        flat = x.reshape(-1, *x.shape[2:])
        mu = self.weight_mu[:n_out, :n_in]
        mean = self._op(flat, mu, bias)
        if sample and self.bayesian:
            var = self._op(flat * flat, (2 * self.weight_log_sigma[:n_out, :n_in]).exp(), None)
            mean = GaussianPreactivation.apply(mean, var)
        return mean.reshape(*x.shape[:2], *mean.shape[1:])

    def kl_per_unit(self, prior) -> torch.Tensor:
        """``KL(q(w) || prior)`` summed over each output unit's weights, ``[out]`` (``prior``: a
        ``bayesdyn.distributions.WeightPrior``)."""
        if not self.bayesian:
            return torch.zeros(self.out_units, device=self.weight_mu.device)
        return prior.kl(self.weight_mu, self.weight_sigma()).flatten(1).sum(-1)


class BayesLinear(BayesLayer):
    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__((out_features, in_features), **kwargs)

    def _op(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _per_sample_op(self, x, weight, bias):
        out = torch.einsum("sbi,soi->sbo", x, weight)
        return out if bias is None else out + bias


class BayesConv2d(BayesLayer):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 padding: int = 1, **kwargs):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size), **kwargs)
        self.padding = padding

    def _op(self, x, weight, bias):
        return F.conv2d(x, weight, bias, padding=self.padding)

    def _per_sample_op(self, x, weight, bias):
        s, b, c, h, w = x.shape  # one grouped convolution: sample s convolves with weight[s]
        grouped = x.transpose(0, 1).reshape(b, s * c, h, w)
        out = F.conv2d(grouped, weight.reshape(-1, *weight.shape[2:]), None, padding=self.padding,
                       groups=s)
        out = out.reshape(b, s, -1, *out.shape[-2:]).transpose(0, 1)
        return out if bias is None else out + bias[:, None, None]


class OrderedBlock(nn.Module):
    """``layer -> BatchNorm -> ReLU -> (pool) -> ordering mask``. The mask multiplies the block's
    output units group by group after the nonlinearity, so a switched-off group is exactly zero
    (a mask before BatchNorm would leak BN's bias)."""

    def __init__(self, layer: BayesLayer, groups: int, frozen: int, pool: bool = False):
        super().__init__()
        if layer.out_units % groups:
            raise ValueError(f"{layer.out_units} units cannot be cut into {groups} equal groups")
        if not 0 < frozen < groups:
            raise ValueError(f"frozen groups must be in 1..{groups - 1}, got {frozen}")
        self.layer, self.groups, self.frozen = layer, groups, frozen
        self.group_size = layer.out_units // groups
        conv = isinstance(layer, BayesConv2d)
        self.bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(layer.out_units)
        self.pool = nn.MaxPool2d(2) if pool else None

    @property
    def num_orderable(self) -> int:
        """``K``: the groups an ordering can switch off."""
        return self.groups - self.frozen

    def unit_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """``[S, K]`` ordering mask -> ``[S, units]`` (frozen groups always 1)."""
        ones = torch.ones(*mask.shape[:-1], self.frozen, dtype=mask.dtype, device=mask.device)
        return torch.cat([ones, mask], -1).repeat_interleave(self.group_size, -1)

    def forward(self, x, mask=None, n_groups=None, sample=True, weight=None):
        n_out = None if n_groups is None else n_groups * self.group_size
        h = self.layer(x, n_out, sample, weight)  # [S, B, n, ...]
        n = h.shape[2]
        bn = self.bn
        momentum = bn.momentum
        if self.training and momentum is None:  # cumulative average, as nn.BatchNorm does
            bn.num_batches_tracked += 1
            momentum = 1.0 / float(bn.num_batches_tracked)
        flat = F.batch_norm(h.flatten(0, 1), bn.running_mean[:n], bn.running_var[:n],
                            bn.weight[:n], bn.bias[:n], self.training, momentum or 0.0, bn.eps)
        h = torch.relu(flat).unflatten(0, h.shape[:2])
        if self.pool is not None:  # max-pool commutes with a non-negative channel mask: mask less
            h = self.pool(h.flatten(0, 1)).unflatten(0, h.shape[:2])
        if mask is not None:
            m = self.unit_mask(mask)[..., :n]
            h = h * m.reshape(*m.shape[:-1], 1, n, *([1] * (h.dim() - 3)))
        return h


class OrderedNet(nn.Module):
    """Ordered blocks then a (Bayesian) linear head; conv features are averaged over space.

    ``forward(x, masks, n_groups, sample, weights, num_samples)``:
        x: ``[B, *input_shape]``; returns logits ``[S, B, C]``.
        masks: per ordered block ``[S, K]`` (or ``[K]``) ordering masks, or None (all on).
        n_groups: per block the number of groups kept (a width: weights are sliced), or None.
        weights: explicit weight draws by layer name ``[S, ...]`` (the Pyro model), or None.
    """

    def __init__(self, blocks: list[OrderedBlock], head: BayesLayer, input_ndim: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_ndim = input_ndim

    @property
    def bayesian(self) -> bool:
        return self.head.bayesian

    def bayes_layers(self) -> dict[str, BayesLayer]:
        layers = {f"blocks.{i}.layer": b.layer for i, b in enumerate(self.blocks)}
        layers["head"] = self.head
        return layers

    def forward(self, x, masks=None, n_groups=None, sample=True, weights=None, num_samples=1):
        h = x.reshape(1, *x.shape).expand(num_samples, *x.shape)
        if self.input_ndim == 3 and not isinstance(self.blocks[0].layer, BayesConv2d):
            h = h.flatten(2)
        weights = weights or {}
        for i, block in enumerate(self.blocks):
            mask = None if masks is None else masks[i].reshape(-1, masks[i].shape[-1])
            h = block(h, mask, None if n_groups is None else n_groups[i], sample,
                      weights.get(f"blocks.{i}.layer"))
        if h.dim() > 3:
            h = h.mean((-2, -1))
        return self.head(h, None, sample, weights.get("head"))

    @torch.no_grad()
    def sliced(self, n_groups) -> OrderedNet:
        """A standalone copy holding only the first ``n_groups[i]`` groups of each block (for
        parameter counts and FLOPs of a width)."""
        import copy

        net = copy.deepcopy(self)
        n_in = None
        for block, n in zip(net.blocks, n_groups, strict=True):
            n_out = n * block.group_size
            _slice_layer(block.layer, n_out, n_in)
            bn = block.bn
            for name in ("weight", "bias"):
                setattr(bn, name, nn.Parameter(getattr(bn, name)[:n_out].clone()))
            bn.running_mean, bn.running_var = bn.running_mean[:n_out].clone(), bn.running_var[:n_out].clone()
            bn.num_features = n_out
            block.groups, n_in = n, n_out
        _slice_layer(net.head, None, n_in)
        return net


def _slice_layer(layer: BayesLayer, n_out, n_in):
    names = ["weight_mu"] + (["weight_log_sigma"] if layer.bayesian else [])
    for name in names:
        setattr(layer, name, nn.Parameter(getattr(layer, name)[:n_out, :n_in].clone()))
    if layer.bias is not None and n_out is not None:
        layer.bias = nn.Parameter(layer.bias[:n_out].clone())


def nested_mlp(in_features: int, num_classes: int, hidden=(128, 128), groups: int = 16,
               frozen: int = 1, bayesian: bool = True, input_shape=None) -> OrderedNet:
    """Ordered MLP: ``in -> hidden[0] -> ... -> classes``, every hidden layer ordered."""
    _check_sizes(in_features, num_classes, hidden, groups)
    blocks, n_in = [], in_features
    for width in hidden:
        blocks.append(OrderedBlock(BayesLinear(n_in, width, bayesian=bayesian, bias=False),
                                   groups, frozen))
        n_in = width
    head = BayesLinear(n_in, num_classes, bayesian=bayesian)
    return OrderedNet(blocks, head, input_ndim=len(input_shape) if input_shape else 1)


def nested_convnet(in_channels: int, num_classes: int, channels=(32, 64, 64), groups: int = 16,
                   frozen: int = 1, bayesian: bool = True) -> OrderedNet:
    """Ordered VGG-style conv net (3x3 conv, BN, ReLU, 2x2 max-pool after each of the first two
    blocks), global average pool, linear head. Bias-free convs, as in BNNN."""
    _check_sizes(in_channels, num_classes, channels, groups)
    blocks, c_in = [], in_channels
    for i, c in enumerate(channels):
        layer = BayesConv2d(c_in, c, 3, 1, bayesian=bayesian, bias=False)
        blocks.append(OrderedBlock(layer, groups, frozen, pool=i < 2))
        c_in = c
    return OrderedNet(blocks, BayesLinear(c_in, num_classes, bayesian=bayesian), input_ndim=3)


def _check_sizes(n_in, num_classes, widths, groups) -> None:
    check_int("inputs", n_in, 1), check_int("num_classes", num_classes, 1)
    check_int("groups", groups, 2)
    for i, width in enumerate(widths):
        check_int(f"width of layer {i}", width, groups)
        if width % groups:
            raise ValueError(f"layer {i} has {width} units, which {groups} groups cannot share "
                             f"equally; use a multiple of {groups}")
