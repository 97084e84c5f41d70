"""Build a family's model and guide from a plain config (what ``config.json`` stores), so the
CLI, ``bayesdyn evaluate DIR`` and notebooks construct the same networks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .distributions.weight_priors import WEIGHT_PRIORS
from .guides import DepthGuide, EmptyGuide, NestedGuide
from .models import BoostedExits, DepthNet, DeterministicNet, MultiExitNet, NestedNet
from .nn import (
    evenly_spaced_exits,
    msdnet,
    multiexit_mlp,
    multiexit_resnet,
    nested_convnet,
    nested_mlp,
    residual_mlp,
    resnet18_depth,
    resnet50_depth,
    vds_convnet,
)
from .validation import check_int, check_real

IMPLEMENTED = ("deterministic", "depth", "nested", "nested-dropout", "exits", "boosted-exits",
               "structured-ensemble", "ensemble")
PLANNED = ()
ENSEMBLE_METHODS = ("structured-ensemble", "ensemble")
ARCHS = ("mlp", "conv", "resnet18", "resnet50", "msdnet", "resnet")
REGRESSION_METHODS = ("deterministic", "depth")  # the methods with a Gaussian likelihood
EXIT_METHODS = ("exits", "boosted-exits")
EXIT_ARCHS = ("auto", "mlp", "msdnet", "resnet")  # auto: mlp for 8x8 inputs, msdnet otherwise


@dataclass
class Recipe:
    method: str
    arch: str = "auto"  # auto: mlp for 8x8 inputs, conv otherwise
    depth: int = 4  # residual blocks (mlp, conv)
    width: int = 64  # hidden units / channels (resnet: of the first stage; nested: widest layer)
    prior: str = "uniform"  # depth prior: uniform | decaying
    keep_prob: float = 0.95  # nested: keep probability of the truncated-geometric prior
    weight_prior: str = "gaussian"  # nested: gaussian | log-uniform | ard
    prior_scale: float = 1.0  # nested: scale of the Gaussian weight prior
    kl_weight: float = 1.0  # nested: multiplies the KL terms (1: the ELBO)
    gumbel_logits: str = "log_probs"  # nested: "probs" reproduces the official code's bug
    exits: int = 4  # exits: number of exits (msdnet blocks, mlp layers, resnet exits)
    gamma: float = 0.5  # boosted-exits: weight of the previous ensemble, F_k = f_k + gamma F_{k-1}
    gradient_equilibrium: bool | None = None  # exits: None = on for boosted-exits, off for exits
    stop_gradient: bool = True  # boosted-exits: detach the history in the loss
    members: int = 3  # ensembles: M
    prune: float = 0.5  # structured-ensemble: pruned fraction q of the channels
    prune_scope: str = "global"  # structured-ensemble: global | local
    divergence: str = "gaussian"  # structured-ensemble: gaussian | official (MMD of the masks)
    divergence_weight: float = 0.01  # structured-ensemble: w of w / (sum of MMDs)
    mask_epochs: int = 10  # structured-ensemble: epochs of the mask stage
    combine: str = "probs"  # ensembles: average probabilities, or "logits" (the paper)

    def __post_init__(self):
        if self.method in PLANNED:
            raise NotImplementedError(f"method {self.method!r} is planned but not built yet; "
                                      f"available: {', '.join(IMPLEMENTED)}")
        if self.method not in IMPLEMENTED:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(IMPLEMENTED)}")
        if self.arch not in ("auto", *ARCHS):
            raise ValueError(f"unknown arch {self.arch!r}; choose one of auto, {', '.join(ARCHS)}")
        check_int("depth", self.depth, 1)
        check_int("width", self.width, 1)
        if self.prior not in ("uniform", "decaying"):
            raise ValueError(f"unknown depth prior {self.prior!r}; choose uniform or decaying")
        check_real("keep_prob", self.keep_prob, 0, 1, open_low=True, open_high=True)
        if self.weight_prior not in WEIGHT_PRIORS:
            raise ValueError(f"unknown weight prior {self.weight_prior!r}; choose one of "
                             f"{', '.join(WEIGHT_PRIORS)}")
        check_real("prior_scale", self.prior_scale, 0, open_low=True)
        check_real("kl_weight", self.kl_weight, 0)
        if self.gumbel_logits not in ("log_probs", "probs"):
            raise ValueError(f"gumbel_logits must be 'log_probs' or 'probs', got "
                             f"{self.gumbel_logits!r}")
        if self.method in ("nested", "nested-dropout") and self.width % 16:
            raise ValueError(f"nested methods cut every layer into 16 unit groups: --width must "
                             f"be a multiple of 16 (32 for the conv net), got {self.width}")
        self._check_exits()
        self._check_ensembles()

    def _check_ensembles(self):
        from .ensemble_recipes import check_ensemble_options

        check_ensemble_options(self)

    def _check_exits(self):
        exit_method = self.method in EXIT_METHODS
        if exit_method and self.arch not in EXIT_ARCHS:
            raise ValueError(f"arch {self.arch!r} has no exits; the {self.method} method takes "
                             f"{', '.join(EXIT_ARCHS)}")
        if not exit_method and self.arch in ("msdnet", "resnet"):
            raise ValueError(f"arch {self.arch!r} is a multi-exit backbone for the exits and "
                             f"boosted-exits methods, not {self.method}")
        check_int("exits", self.exits, 1)
        check_real("gamma", self.gamma, 0)
        if self.method == "exits" and (self.gamma != 0.5 or not self.stop_gradient):
            raise ValueError("gamma and stop_gradient are boosted-exits options; the exits "
                             "method trains each exit on its own")

    def to_dict(self) -> dict:
        return asdict(self)


def backbone(recipe: Recipe, input_shape, num_classes: int | None):
    """The depth stack of ``recipe``; vector inputs (``input_shape = (D,)``) get DUN's fully
    connected residual net, with one output for regression (``num_classes`` None)."""
    outputs = 1 if num_classes is None else num_classes
    if len(input_shape) == 1:
        if recipe.arch not in ("auto", "mlp"):
            raise ValueError(f"arch {recipe.arch!r} needs image inputs; {input_shape} are vectors")
        return residual_mlp(input_shape[0], outputs, recipe.width, recipe.depth, input_relu=False)
    channels, height, width = input_shape
    arch = recipe.arch
    if arch == "auto":
        arch = "mlp" if height * width <= 64 else "conv"
    if arch == "mlp":
        return residual_mlp(channels * height * width, num_classes, recipe.width, recipe.depth,
                            input_shape=input_shape)
    if arch == "conv":
        return vds_convnet(channels, num_classes, recipe.depth, recipe.width, recipe.width // 2)
    resnet = resnet18_depth if arch == "resnet18" else resnet50_depth
    return resnet(channels, num_classes, width=recipe.width)  # stage widths w, 2w, 4w, 8w


def nested_backbone(recipe: Recipe, input_shape, num_classes: int):
    channels, height, width = input_shape
    bayesian = recipe.method == "nested"
    if recipe.arch in ("mlp", "auto") and (recipe.arch == "mlp" or height * width <= 64):
        return nested_mlp(channels * height * width, num_classes, (recipe.width, recipe.width),
                          bayesian=bayesian, input_shape=input_shape)
    return nested_convnet(channels, num_classes, (recipe.width // 2, recipe.width, recipe.width),
                          bayesian=bayesian)


def exits_backbone(recipe: Recipe, input_shape, num_classes: int):
    """The multi-exit backbone: an MLP (``exits`` layers of ``width``), MSDNet (BoostNet's CIFAR
    layout, ``exits`` blocks; ``width``/``depth`` unused) or a CIFAR ResNet (3 stages of
    ``depth`` basic blocks, widths ``width, 2 width, 4 width``, exits spread evenly)."""
    channels, height, width = input_shape
    arch = recipe.arch if recipe.arch != "auto" else ("mlp" if height * width <= 64 else "msdnet")
    ge = recipe.gradient_equilibrium
    ge = recipe.method == "boosted-exits" if ge is None else ge
    if arch == "mlp":
        return multiexit_mlp(channels * height * width, num_classes, recipe.width, recipe.exits,
                             input_shape=input_shape, gradient_equilibrium=ge)
    if arch == "msdnet":
        return msdnet(channels, num_classes, num_blocks=recipe.exits, gradient_equilibrium=ge)
    return multiexit_resnet(channels, num_classes, stages=(recipe.depth,) * 3,
                            widths=(recipe.width, 2 * recipe.width, 4 * recipe.width),
                            exits_after=evenly_spaced_exits(3 * recipe.depth, recipe.exits),
                            gradient_equilibrium=ge)


def build(recipe: Recipe, input_shape, num_classes: int | None):
    """``(model, guide)`` for ``recipe`` on inputs of ``input_shape`` (``num_classes`` None:
    regression, a Gaussian likelihood with a learned noise scale)."""
    likelihood = "classification" if num_classes is not None else "regression"
    if likelihood == "regression" and recipe.method not in REGRESSION_METHODS:
        raise ValueError(f"method {recipe.method!r} is for classification; regression datasets "
                         f"work with: {', '.join(REGRESSION_METHODS)}")
    if recipe.method in EXIT_METHODS:
        net = exits_backbone(recipe, input_shape, num_classes)
        if recipe.method == "exits":
            model = MultiExitNet(net, num_classes, input_shape=input_shape)
        else:
            model = BoostedExits(net, num_classes, gamma=recipe.gamma,
                                 stop_gradient=recipe.stop_gradient, input_shape=input_shape)
        return model, EmptyGuide(model)
    if recipe.method in ENSEMBLE_METHODS:
        from .ensemble_recipes import build_ensemble

        return build_ensemble(recipe, input_shape, num_classes)
    if recipe.method in ("nested", "nested-dropout"):
        net = nested_backbone(recipe, input_shape, num_classes)
        model = NestedNet(net, num_classes, keep_prob=recipe.keep_prob, input_shape=input_shape,
                          weight_prior=recipe.weight_prior, prior_scale=recipe.prior_scale,
                          kl_weight=recipe.kl_weight)
        return model, NestedGuide(model, learn_ordering=recipe.method == "nested",
                                  gumbel_logits=recipe.gumbel_logits)
    stack = backbone(recipe, input_shape, num_classes)
    if recipe.method == "deterministic":  # the same backbone at full depth, maximum likelihood
        model = DeterministicNet(stack.truncated(stack.max_depth), num_classes, input_shape,
                                 likelihood=likelihood)
        return model, EmptyGuide(model)
    model = DepthNet(stack, prior=recipe.prior, likelihood=likelihood, num_classes=num_classes,
                     input_shape=input_shape)
    return model, DepthGuide(model)
