"""Building blocks: residual stacks returning every depth (more to come: ordered layers,
multi-exit backbones, Bayesian heads, extracted sub-networks)."""

from .ordered import BayesConv2d, BayesLinear, OrderedBlock, OrderedNet, nested_convnet, nested_mlp
from .residual import BasicBlock, DepthStack, Residual, residual_mlp, resnet_depth, vds_convnet

__all__ = ["BayesConv2d", "BayesLinear", "OrderedBlock", "OrderedNet", "nested_convnet",
           "nested_mlp", "BasicBlock", "DepthStack", "Residual", "resnet_depth", "residual_mlp",
           "vds_convnet"]
