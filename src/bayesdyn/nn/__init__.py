"""Building blocks: residual stacks returning every depth, ordered (nested) Bayesian layers,
multi-exit backbones (MSDNet, ResNet, MLP), stacked ensemble members."""

from .members import PlainSpec, StackedNet, extract, member_of, stack_members, to_sequential
from .msdnet import MSDNET_CIFAR, msdnet
from .multiexit import (
                        ExitHead,
                        ExitOutputs,
                        MultiExitStack,
                        evenly_spaced_exits,
                        gradient_equilibrium,
                        multiexit_mlp,
                        multiexit_resnet,
                        scale_gradient,
)
from .ordered import BayesConv2d, BayesLinear, OrderedBlock, OrderedNet, nested_convnet, nested_mlp
from .residual import (
                       BasicBlock,
                       Bottleneck,
                       DepthBatchNorm2d,
                       DepthStack,
                       Residual,
                       residual_mlp,
                       resnet18_depth,
                       resnet50_depth,
                       resnet_depth,
                       vds_convnet,
)

__all__ = ["BasicBlock", "BayesConv2d", "BayesLinear", "Bottleneck", "DepthBatchNorm2d",
           "DepthStack", "OrderedBlock", "OrderedNet", "Residual", "nested_convnet", "nested_mlp",
           "resnet18_depth", "resnet50_depth", "resnet_depth", "residual_mlp", "vds_convnet"]
__all__ += ["MSDNET_CIFAR", "ExitHead", "ExitOutputs", "MultiExitStack", "evenly_spaced_exits",
            "gradient_equilibrium", "msdnet", "multiexit_mlp", "multiexit_resnet", "scale_gradient"]
__all__ += ["PlainSpec", "StackedNet", "extract", "member_of", "stack_members", "to_sequential"]
