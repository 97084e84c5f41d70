"""Ensembles as Pyro models: ``StructuredEnsemble`` (sub-networks extracted from one untrained
network, methods.md §5) and the baseline ``DeepEnsemble`` (M independently initialised copies).

The member ``m`` is the latent structure:

    m ~ Categorical(1/M, ..., 1/M)          y | x, m ~ Categorical(logits = f_m(x))

and the guide ``MemberGuide`` is ``q(m) = p(m)`` (fixed, uniform, enumerated exactly), so the
ELBO is ``(1/M) sum_m log p(y | x, m)``: every member is trained on every example, as
independently trained ensemble members are, in one step with one optimiser. The predictive
averages the members' probabilities (the mixture); ``combine="logits"`` gives the paper's
softmax of the averaged logits instead. Budget ``k`` is the first ``k`` members.
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer.autoguide import AutoGuide
from pyro.ops.indexing import Vindex
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..nn.members import StackedNet, member_of, stack_members
from ..params import RenamedOnCopy, give_unique_name
from .base import Budget, DynamicModel, PredictiveSamples, data_plate, full_precision


class MemberGuide(RenamedOnCopy, AutoGuide):
    """``q(m)``: uniform over the members and fixed (it equals the prior, so the KL is 0); the
    site is enumerated in parallel, so ``TraceEnum_ELBO`` averages over members exactly."""

    site = "member"

    def __init__(self, model, num_members: int | None = None):
        super().__init__(model)
        give_unique_name(self)
        num_members = getattr(model, "num_members", None) if num_members is None else num_members
        if num_members is None:
            raise ValueError("MemberGuide needs num_members when the model is not an ensemble")
        self.register_buffer("probs", torch.full((num_members,), 1.0 / num_members))

    def forward(self, *args, **kwargs):
        m = pyro.sample(self.site, dist.Categorical(self.probs), infer={"enumerate": "parallel"})
        return {self.site: m}

    def median(self, *args, **kwargs):
        """Member 0 (every member is equally probable)."""
        return {self.site: torch.zeros((), dtype=torch.long, device=self.probs.device)}


class FirstMembers(nn.Module):
    """The first ``k`` members alone (copies): ``forward(x) -> logits [k, B, C]``."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x):
        return torch.cat([net(x) for net in self.nets])


class MemberEnsemble(DynamicModel):
    """Shared by both ensembles: the Pyro model, the fast loss, budgets and prediction over
    ``member_logits(x, k) -> [k, B, C]`` (the first ``k`` members)."""

    reference_elbo = pyro.infer.TraceEnum_ELBO

    def __init__(self, num_members: int, num_classes: int, input_shape, combine: str):
        super().__init__()
        if combine not in ("probs", "logits"):
            raise ValueError(f"combine must be 'probs' or 'logits', got {combine!r}")
        self.num_members, self.num_classes, self.combine = num_members, num_classes, combine
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    def member_logits(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Logits of the first ``k`` members (default all), ``[k, B, C]``."""
        raise NotImplementedError

    def member_modules(self, k: int) -> list[nn.Module]:
        """Copies of the first ``k`` members as modules mapping ``[B, ...]`` to ``[1, B, C]``."""
        raise NotImplementedError

    def model(self, x, y=None, dataset_size=None):
        logits = self.member_logits(x)
        m = pyro.sample("member", dist.Categorical(logits=logits.new_zeros(self.num_members)))
        with data_plate(x, dataset_size):
            f = Vindex(logits)[m, torch.arange(x.shape[0], device=x.device)]
            pyro.deterministic("probs", torch.softmax(f, -1), event_dim=1)
            return pyro.sample("y", dist.Categorical(logits=f), obs=y)

    def default_guide(self) -> MemberGuide:
        return MemberGuide(self)

    def fast_loss(self, guide, x, y, dataset_size):
        """``-(1/M) sum_m log p(y | x, m) N / B`` (the KL of ``q(m) = p(m)`` is 0); terms: the
        members' shares ``nll_member{m}``."""
        if type(guide) is not MemberGuide:
            return NotImplemented
        logits = full_precision(self.member_logits(x))
        per_member = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_members),
                                     reduction="none").view(self.num_members, -1).sum(1)
        per_member = per_member * (dataset_size / x.shape[0] / self.num_members)
        return per_member.sum(), {f"nll_member{m + 1}": v for m, v in enumerate(per_member)}

    def member_validation(self, guide, x, y) -> dict:
        """Per-member validation accuracy and NLL (``fit`` records them every epoch)."""
        logits = self.member_logits(x)
        nll = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.num_members),
                              reduction="none").view(self.num_members, -1).mean(1)
        acc = (logits.argmax(-1) == y).float().mean(1)
        out = {}
        for m in range(self.num_members):
            out[f"val_accuracy_member{m + 1}"] = float(acc[m])
            out[f"val_nll_member{m + 1}"] = float(nll[m])
        return out

    def budgets(self, guide=None) -> list[Budget]:
        return [Budget(f"{k} member" + ("s" if k > 1 else ""), k)
                for k in range(1, self.num_members + 1)]

    def _members(self, budget) -> int:
        if budget is None:
            return self.num_members
        k = budget.setting if isinstance(budget, Budget) else budget
        if not isinstance(k, int) or not 1 <= k <= self.num_members:
            raise ValueError(f"budget must be one of model.budgets() (1..{self.num_members} "
                             f"members), got {budget!r}")
        return k

    def budget_module(self, budget, guide=None) -> nn.Module:
        return FirstMembers(self.member_modules(self._members(budget)))

    def predict_probs(self, guide, x, budget=None, num_samples=1) -> PredictiveSamples:
        """The first ``k`` members' probabilities ``[k, B, C]`` with equal weights (their
        mixture), or with ``combine="logits"`` ``softmax(mean logits)`` ``[1, B, C]``."""
        logits = full_precision(self.member_logits(x, self._members(budget)))
        if self.combine == "logits":
            return PredictiveSamples.equal(torch.softmax(logits.mean(0), -1)[None])
        return PredictiveSamples.equal(torch.softmax(logits, -1))

    @torch.no_grad()
    def component_log_likelihood(self, guide, x, y):
        """The mixture over members (``combine="probs"``): ``log(1/M) [M]`` and
        ``log p(y_n | x_n, m) [M, N]``; the logit average is one component."""
        logits = full_precision(self.member_logits(x))
        if self.combine == "logits":
            logits = logits.mean(0, keepdim=True)
        loglik = -F.cross_entropy(logits.flatten(0, 1), y.repeat(len(logits)),
                                  reduction="none").view(len(logits), -1)
        return torch.full((len(logits),), -float(torch.log(torch.tensor(len(logits)))),
                          dtype=loglik.dtype, device=loglik.device), loglik

    def structure_sites(self) -> list[str]:
        return ["member"]

    def structure_guide(self, blocked_model):
        return MemberGuide(blocked_model, self.num_members)


class StructuredEnsemble(MemberEnsemble):
    """Sub-networks of different widths trained jointly (Pomponi et al. 2021).

    Args:
        members: the extracted members, one-member ``StackedNet``s (from
            ``bayesdyn.inference.structured_subnetworks``). Members of equal widths are stacked
            into one ``StackedNet`` and run in one vectorised pass (always so under local pruning;
            global pruning gives each member its own widths, then one pass per width).
        num_classes, input_shape: as the other families (read off the members by default).
        combine: ``"probs"`` (mixture, default) or ``"logits"`` (the paper's logit average).
    """

    def __init__(self, members, num_classes: int | None = None, input_shape=None,
                 combine: str = "probs"):
        members = list(members)
        if not members or not all(isinstance(n, StackedNet) for n in members):
            raise TypeError("members must be a non-empty list of StackedNet")
        spec = members[0].spec
        if num_classes not in (None, spec.num_classes):
            raise ValueError(f"the members have {spec.num_classes} outputs, not {num_classes}")
        total = sum(n.members for n in members)
        super().__init__(total, spec.num_classes, input_shape or spec.input_shape, combine)
        groups: dict = {}  # equal specs together, in order of first appearance
        for net in members:
            groups.setdefault(net.spec, []).append(net)
        self.groups = nn.ModuleList(stack_members(g) for g in groups.values())
        self.register_buffer("structure", self._structure_tensor())

    @classmethod
    def untrained(cls, base: StackedNet, members: int, combine: str = "probs",
                  **search_options) -> StructuredEnsemble:
        """An ensemble whose members are found on the training data by ``prepare_training``
        (``bayesdyn.runs.train_run`` calls it before ``fit``): until then, ``members`` copies of
        ``base``. ``search_options`` go to ``bayesdyn.inference.structured_subnetworks`` (q,
        scope, mask_epochs, divergence, divergence_weight, ...)."""
        model = cls([base] * members, combine=combine)
        model._pending_search = (base, members, search_options)
        return model

    def prepare_training(self, train, device="cpu", seed: int = 0) -> None:
        """Stages 1-4 on ``train`` (a ``TensorDataset``) when the ensemble was made by
        ``untrained``: the groups become the extracted members; ``search_report`` keeps the
        scales, importances and kept channels."""
        pending = getattr(self, "_pending_search", None)
        if pending is None:
            return
        from ..inference.subnets import structured_subnetworks

        base, members, options = pending
        x, y = train.tensors
        nets, self.search_report = structured_subnetworks(base, x, y, members, seed=seed,
                                                          device=device, **options)
        fresh = StructuredEnsemble(nets, combine=self.combine)
        self.groups, self.structure = fresh.groups, fresh.structure
        self._pending_search = None

    def _structure_tensor(self) -> torch.Tensor:
        """``[G, 1 + L]``: members and unit widths of each group (checkpoints rebuild from it)."""
        return torch.tensor([[g.members, *g.spec.widths] for g in self.groups])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Rebuilds the groups to the checkpoint's widths first (the widths come from the mask
        stage, which a rebuilt model has not run)."""
        structure = state_dict.get("structure")
        if structure is not None and not torch.equal(structure.cpu(), self.structure.cpu()):
            spec, device = self.groups[0].spec, self.structure.device
            self.groups = nn.ModuleList(StackedNet(spec.with_widths(row[1:].tolist()),
                                                   int(row[0])).to(device)
                                        for row in structure)
            self.num_members = int(structure[:, 0].sum())
            self.structure = structure.to(device).clone()
        return super().load_state_dict(state_dict, strict, assign)

    def member_logits(self, x, k=None):
        k = self.num_members if k is None else k
        out = []
        for group in self.groups:
            if k <= 0:
                break
            out.append(group(x, members=min(k, group.members)))
            k -= group.members
        return torch.cat(out)

    def member_modules(self, k):
        nets = [member_of(g, j) for g in self.groups for j in range(g.members)]
        return nets[:k]

    def member_parameters(self) -> list[int]:
        """Parameters of each member."""
        return [sum(p.numel() for p in member.parameters())
                for member in self.member_modules(self.num_members)]


class DeepEnsemble(MemberEnsemble):
    """``M`` copies of one network with their own initialisation, run as one with
    ``torch.func.stack_module_state`` + ``vmap`` (any network mapping ``[B, ...]`` to
    ``[B, C]``; BatchNorm running statistics are per member).

    Args:
        nets: the members (equal architectures), or one network and ``members``: its copies
            re-initialised with ``reset_parameters``; or a ``StackedNet`` of ``M`` members,
            which runs them with batched matmuls and grouped convolutions instead of ``vmap``
            (faster on the CPU, see benchmarks/RESULTS.md).
        members: ``M`` when ``nets`` is one network.
        num_classes, input_shape, combine: as ``StructuredEnsemble``.
    """

    def __init__(self, nets, members: int | None = None, num_classes: int | None = None,
                 input_shape=None, combine: str = "probs"):
        if isinstance(nets, StackedNet):
            spec = nets.spec
            if num_classes not in (None, spec.num_classes):
                raise ValueError(f"the members have {spec.num_classes} outputs, not {num_classes}")
            super().__init__(nets.members, spec.num_classes, input_shape or spec.input_shape,
                             combine)
            self.stack = nets
            return
        self.stack = None
        if isinstance(nets, nn.Module):
            if not isinstance(members, int) or members < 1:
                raise ValueError("pass members (an integer >= 1) with a single network")
            nets = [nets] + [_reinitialised(nets) for _ in range(members - 1)]
        nets = list(nets)
        from .base import classes_of

        num_classes = classes_of(nets[0], num_classes, "member network")
        super().__init__(len(nets), num_classes, input_shape, combine)
        params, buffers = stack_module_state(nets)
        self._names = {name: name.replace(".", "__") for name in [*params, *buffers]}
        self.stacked = nn.ParameterDict({self._names[n]: nn.Parameter(p.detach())
                                         for n, p in params.items()})
        for n, b in buffers.items():
            self.register_buffer(f"buffer__{self._names[n]}", b)
        self._buffer_names = list(buffers)
        self._skeleton = [copy.deepcopy(nets[0]).to("meta")]  # a list: not a submodule

    def _state(self, k):
        params = {n: self.stacked[self._names[n]][:k] for n in self._names
                  if self._names[n] in self.stacked}
        buffers = {n: getattr(self, f"buffer__{self._names[n]}")[:k] for n in self._buffer_names}
        return params, buffers

    def member_logits(self, x, k=None):
        k = self.num_members if k is None else k
        if self.stack is not None:
            return self.stack(x, members=k)
        params, buffers = self._state(k)
        skeleton = self._skeleton[0]
        skeleton.train(self.training)

        def one(p, b, inputs):
            return functional_call(skeleton, (p, b), (inputs,))

        return vmap(one, in_dims=(0, 0, None))(params, buffers, x)

    def member_modules(self, k):
        if self.stack is not None:
            return [member_of(self.stack, m) for m in range(k)]
        out = []
        for m in range(k):
            net = copy.deepcopy(self._skeleton[0]).to_empty(device=self.structure_device())
            params, buffers = self._state(self.num_members)
            net.load_state_dict({**{n: p[m] for n, p in params.items()},
                                 **{n: b[m] for n, b in buffers.items()}})
            out.append(_Unsqueezed(net))
        return out

    def structure_device(self) -> torch.device:
        """The device of the stacked parameters."""
        return next(self.parameters()).device


class _Unsqueezed(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[None]


def _reinitialised(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every sub-module's parameters reset (its own initialisation)."""
    out = copy.deepcopy(net)
    for module in out.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return out
