"""The contract every family implements: a Pyro model plus the one budget interface.

A family is an ``nn.Module`` whose ``forward`` *is* the Pyro model ``model(x, y=None,
dataset_size=None)``, so Pyro's machinery (``Trace_ELBO()(model, guide)``, ``Predictive``,
``poutine.trace``) accepts it as it is. On top of that it lists its budgets (structural settings)
and gives a predictive distribution for any budget and for the structure-marginalised model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import torch
from torch import nn

from ..params import RenamedOnCopy, register_parameters, unique_name
from ..validation import check_inputs, check_int


@dataclass(frozen=True)
class Budget:
    """One structural setting of a dynamic network (a depth, a width, an exit, a member).

    ``flops`` (forward FLOPs per example) and ``params`` are measured on the actual sub-network by
    ``bayesdyn.evaluation.cost.measure``; they are ``None`` until then.
    """

    name: str
    setting: object
    flops: int | None = None
    params: int | None = None
    info: dict = field(default_factory=dict, compare=False)


@dataclass
class PredictiveSamples:
    """Class probabilities ``probs [S, B, C]`` with sample weights ``weights [S]`` (summing to 1).

    Monte Carlo draws carry equal weights; exact mixtures (e.g. over depths) carry their mixture
    weights, so the predictive is ``sum_s weights[s] * probs[s]`` either way."""

    probs: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def equal(cls, probs: torch.Tensor) -> PredictiveSamples:
        s = probs.shape[0]
        return cls(probs, torch.full((s,), 1.0 / s, dtype=probs.dtype, device=probs.device))

    def mean(self) -> torch.Tensor:
        """The predictive ``[B, C]``."""
        return torch.einsum("s,sbc->bc", self.weights, self.probs)


class DynamicModel(RenamedOnCopy, nn.Module):
    """Base class of the families. Subclasses implement ``model``, ``default_guide``,
    ``budgets``, ``budget_module`` and ``predict_probs``; ``fast_loss`` is optional."""

    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None  # checked at the public boundary when known
    likelihood: str = "classification"  # or "regression": then regression_mixture, not predict_probs
    # The Pyro ELBO that serves as reference for this family's fast path.
    reference_elbo: type[pyro.infer.ELBO] = pyro.infer.Trace_ELBO
    max_plate_nesting: int = 1

    def __init__(self):
        super().__init__()
        self.pyro_name = unique_name(self)  # this instance's prefix in Pyro's param store

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                dataset_size: int | None = None):
        check_inputs(x, y, self.num_classes, self.input_shape,
                     regression=self.likelihood == "regression")
        dtype = next(self.parameters()).dtype
        x = x.to(dtype)  # float64 data meets float32 weights here, not deep inside a layer
        if y is not None and y.is_floating_point():
            y = y.to(dtype)
        register_parameters(self)  # so SVI + pyro.optim train the weights
        return self.model(x, y, dataset_size)

    def model(self, x, y=None, dataset_size=None):
        raise NotImplementedError

    def default_guide(self) -> nn.Module:
        """The family's own guide (the one its fast path knows)."""
        raise NotImplementedError

    def fast_loss(self, guide, x, y, dataset_size: int):
        """``(neg_elbo, terms)``: the negative ELBO estimate for the whole dataset from this
        minibatch, equal in value and gradient to ``reference_elbo``'s loss, as a 0-d tensor, and
        a dict of its terms (0-d tensors). Returns ``NotImplemented`` for guides it does not know.
        """
        return NotImplemented

    def reference_loss(self) -> nn.Module:
        """Pyro's ELBO for this family as an ``nn.Module(model, guide)`` factory argument."""
        return self.reference_elbo(max_plate_nesting=self.max_plate_nesting)

    def budgets(self, guide=None) -> list[Budget]:
        raise NotImplementedError

    def budget_module(self, budget: Budget, guide=None) -> nn.Module:
        """The sub-network that computes ``budget`` alone (for FLOPs and parameter counts)."""
        raise NotImplementedError

    def head_module(self, budget: Budget, guide=None) -> nn.Module | None:
        """The part of ``budget``'s sub-network that deeper budgets do not reuse (an exit head),
        or ``None`` when a larger budget recomputes everything. Budgeted-batch evaluation charges
        an input stopping at budget ``k`` the sub-network ``k`` plus the heads of budgets < k."""
        return None

    def predict_probs(self, guide, x: torch.Tensor, budget: Budget | None = None,
                      num_samples: int = 1) -> PredictiveSamples:
        """Class probabilities at ``budget`` (``None``: marginalised over the structure) as
        weighted samples ``[S, B, C]``."""
        raise NotImplementedError

    def regression_mixture(self, guide, x: torch.Tensor, budget: Budget | None = None):
        """Regression families: the Gaussian-mixture predictive ``(log_weights [K],
        means [K, B], scale)`` at ``budget`` (``None``: marginalised over the structure)."""
        raise NotImplementedError

    def prepare_evaluation(self, train, guide=None) -> None:
        """Called by ``evaluate`` before predicting at the budgets, with the training split (a
        ``TensorDataset`` of inputs and labels): nested nets re-estimate BatchNorm statistics per
        width, a marginal-likelihood DepthNet computes its exact depth posterior. Default:
        nothing."""

    def component_log_likelihood(self, guide, x: torch.Tensor, y: torch.Tensor):
        """For a predictive that is an exact mixture over a discrete structure with point
        weights: ``(log_weights [K], log p(y_n | x_n, component k) [K, N])``, from which
        ``bayesdyn.inference.loo`` computes an exact leave-one-out. ``None`` (the default) when
        the posterior is only known through draws (then PSIS-LOO applies)."""
        return None

    def structure_sites(self) -> list[str]:
        """Names of the sample sites of the latent structure (depth, orderings, ...)."""
        return []

    def structure_guide(self, blocked_model):
        """The family's own guide of the structure sites, for ``blocked_model`` (this model
        with only those sites exposed), to compose with a weight guide in an
        ``AutoGuideList`` (see ``bayesdyn.guides.weight_autoguide``)."""
        raise NotImplementedError(f"{type(self).__name__} has no latent structure")

    def variational_parameters(self) -> list[nn.Parameter]:
        """Parameters the model holds that belong to a variational posterior (e.g. the means
        and scales of Bayesian layers): ``fit`` never applies weight decay to them, as to any
        guide parameter. Default: none."""
        return []

    def structure_parameters(self, guide) -> list[nn.Parameter]:
        """The parameters of the structure posterior in ``guide`` (q(d), q(z)), which
        ``fit(warmup_epochs=...)`` holds at their initialisation. Default: none."""
        return []

    def network_values(self) -> dict[str, torch.Tensor]:
        """The network's current value of every weight sample site of ``model``, by site name
        and shaped like the site (``bayesdyn.guides.init_to_network`` starts autoguides there).
        Default: no weight sites."""
        return {}

    def structure_posterior(self, guide) -> dict[str, torch.Tensor]:
        """Posterior over the structure, e.g. ``{"depth": q(d) [D+1]}`` (may be empty)."""
        return {}


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when autocast made it half or bfloat16 (likelihoods are computed in full
    precision); float32 and float64 tensors are left as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def output_size(net: nn.Module) -> int | None:
    """Outputs of the last linear layer of ``net`` (``None`` when it has none)."""
    last = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            last = module.out_features
        elif hasattr(module, "weight_mu") and module.weight_mu.dim() == 2:  # BayesLinear
            last = module.weight_mu.shape[0]
    return last


def check_output_size(net: nn.Module, expected: int | None, what: str = "network") -> None:
    """The last linear layer of ``net`` must give ``expected`` outputs (the classes, or 1 for
    regression): a 10-output backbone must not silently train as a 20-class model."""
    last = output_size(net)
    if expected is not None and last is not None and last != expected:
        raise ValueError(f"the {what} has {last} outputs but {expected} are needed (num_classes "
                         f"or 1 for regression); build it with {expected} outputs")


def classes_of(net: nn.Module, num_classes: int | None, what: str = "network") -> int:
    """``num_classes`` checked against ``net``'s outputs, or read off them when ``None``."""
    if num_classes is None:
        num_classes = output_size(net)
        if num_classes is None:
            raise ValueError(f"pass num_classes: the {what} has no final linear layer to read "
                             "it from")
    check_int("num_classes", num_classes, 2)
    check_output_size(net, num_classes, what)
    return num_classes


def vectorized_trace(model, guide, x, y=None, num_samples: int = 1, condition: dict | None = None):
    """``(model_trace, guide_trace)`` of ``num_samples`` guide draws at once: the guide runs in a
    plate left of the model's plates and the model is replayed on it (what Pyro's ELBOs do per
    particle). ``condition`` fixes latent sites (e.g. ordering masks) in both."""
    from pyro import poutine

    guide_fn, model_fn = guide, model
    if condition:
        guide_fn = poutine.condition(guide, data=condition)
        model_fn = poutine.condition(model, data=condition)
    draws_dim = -(getattr(model, "max_plate_nesting", 1) + 1)
    with pyro.plate("_draws", num_samples, dim=draws_dim):
        guide_trace = poutine.trace(guide_fn).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace(x, y)
    return model_trace, guide_trace


def data_plate(x: torch.Tensor, dataset_size: int | None):
    """The data plate, scaled by ``dataset_size / batch`` so a minibatch estimates the full ELBO."""
    batch = x.shape[0]
    size = batch if dataset_size is None else int(dataset_size)
    if size < batch:
        raise ValueError(f"dataset_size={size} is smaller than the batch ({batch})")
    return pyro.plate("data", size, subsample=torch.arange(batch, device=x.device), dim=-1)
