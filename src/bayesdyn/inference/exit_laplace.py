"""Post-hoc calibration of every exit of a trained multi-exit network (Meronen et al., WACV 2024,
methods.md §2.3-§2.5): a last-layer Laplace approximation per exit head, per-exit temperatures,
and model-internal ensembling (MIE).

One pass over the training inputs caches every exit's features ``phi_k`` (``exit_features``);
each head's Laplace is then closed-form (``HeadLaplace``). Exit ``k``'s logits are
``F_k = sum_{i<=k} c_ki f_i`` (``c = I`` for ``MultiExitNet``; BoostNet's ``c_ki = prod_{j=i+1..k}
gamma_j``), so with independent Gaussian heads ``F_k | x ~ N(F_k^MAP, sum_i c_ki^2 Sigma_i(x))``;
the predictive of exit ``k`` is ``E[softmax(F_k / T_k)]`` by the chosen link, and MIE averages
exits ``1..k`` in probability space with weights ``w_i = c_i / c_K`` (``c_i``: FLOPs of reaching
exit ``i``). The Laplace for BoostNet head ``k`` uses exit ``k``'s own likelihood (``F_k`` with
the earlier heads' history as a fixed offset), as its training did.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models.exits import BoostedEnsemble, check_multi_exit
from . import link as links
from .lastlayer import STRUCTURES, HeadLaplace
from .predict import _EvalMode

PAPER_TEMPERATURES = (0.3, 0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0)  # §2.3 grid
PAPER_PRIOR_VARIANCES = (0.5, 0.7, 1.0, 1.3, 1.5, 1.7, 2.0, 2.5, 3.0, 4.0)  # sigma0^2 grid


@dataclass
class ExitFeatures:
    """Every exit's ``features`` (``K`` tensors ``[N, D_k]``) and logits at the MAP:
    ``logits [K, N, C]`` the exits' predictions ``F_k``, ``own [K, N, C]`` the heads' ``f_k``."""

    features: list
    logits: torch.Tensor
    own: torch.Tensor



@torch.no_grad()
def exit_features(model, x: torch.Tensor, batch_size: int = 1024,
                  until: int | None = None) -> ExitFeatures:
    """One pass over ``x [N, ...]`` (eval mode, chunks of ``batch_size``) caching every exit
    (``until``: exits ``0..until`` only, later blocks are not run)."""
    check_multi_exit(model, "exit calibration")
    param = next(model.parameters())
    feats, logits, own = [], [], []
    with _EvalMode(model):
        for xb in x.split(batch_size):
            out = model.backbone(xb.to(param.device, param.dtype), until)
            feats.append(out.features)
            own.append(out.logits)
            logits.append(model.combine(out.logits))
    return ExitFeatures([torch.cat(f) for f in zip(*feats, strict=True)], torch.cat(logits, 1),
                        torch.cat(own, 1))


def combination_matrix(model) -> torch.Tensor:
    """``c [K, K]``: exit ``k``'s logits are ``sum_i c[k, i] f_i`` (lower triangular)."""
    k_exits = model.num_exits
    c = torch.eye(k_exits, dtype=torch.float64)
    if isinstance(model.combine, BoostedEnsemble):
        gamma = model.combine.gamma.double().cpu()
        for k in range(1, k_exits):
            c[k, :k] = gamma[k - 1] * c[k - 1, :k]
    return c


def mie_weights(model, input_shape) -> torch.Tensor:
    """MIE weights ``w_k = c_k / c_K`` from the FLOPs of reaching each exit (heads on the way
    included, MSDNet's op-counter convention)."""
    from ..evaluation.cost import forward_flops

    flops = torch.tensor([float(forward_flops(model.budget_module(b), tuple(input_shape)))
                          for b in model.budgets()], dtype=torch.float64)
    return flops / flops[-1]


def ensemble(probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """MIE: ``[K, ..., C]`` per-exit predictives -> ``sum_{i<=k} w_i p_i / sum_{i<=k} w_i``."""
    w = weights.to(probs.dtype).view(-1, *[1] * (probs.ndim - 1))
    return (w * probs).cumsum(0) / w.cumsum(0)


class ExitCalibration(nn.Module):
    """Calibrated predictives of every exit: optional Laplace ``heads`` (one ``HeadLaplace``
    per exit, ``None``: the plain heads), ``temperature [K]``, optional MIE ``weights [K]``.

    ``link``: ``probit`` (default), ``bridge`` or ``mc`` with ``num_samples`` draws (fresh
    noise per input; ``shared_noise=True``: one set for all inputs, as the WACV code).
    """

    def __init__(self, model, heads=None, temperature=None, weights=None, link: str = "probit",
                 num_samples: int = 100, shared_noise: bool = False):
        super().__init__()
        check_multi_exit(model, "exit calibration")
        if link not in links.LINKS:
            raise ValueError(f"link must be one of {links.LINKS}, got {link!r}")
        k_exits = model.num_exits
        self.heads = nn.ModuleList(heads) if heads is not None else None
        if heads is not None and len(heads) != k_exits:
            raise ValueError(f"need one HeadLaplace per exit ({k_exits}), got {len(heads)}")
        temperature = torch.ones(k_exits) if temperature is None else torch.as_tensor(temperature)
        self.register_buffer("temperature", temperature.double().clone())
        self.register_buffer("weights", None if weights is None else
                             torch.as_tensor(weights, dtype=torch.float64))
        self.register_buffer("combination", combination_matrix(model))
        self.link, self.num_samples, self.shared_noise = link, num_samples, shared_noise

    @property
    def bayesian(self) -> bool:
        return self.heads is not None

    @property
    def mie(self) -> bool:
        return self.weights is not None

    def moments(self, feats: ExitFeatures, k: int, full_cov: bool | None = None):
        """``(mu [B, C], Sigma [B, C, C] or variances [B, C] or None)`` of exit ``k``'s logits
        ``F_k`` (untempered; ``Sigma`` is ``None`` for plain heads)."""
        mu = feats.logits[k].double()
        if not self.bayesian:
            return mu, None
        full_cov = self.link != "probit" if full_cov is None else full_cov
        cov = 0.0
        for i in range(k + 1):
            coef = float(self.combination[k, i])
            if coef != 0.0:
                head_cov = self.heads[i].logit_moments(feats.features[i], full_cov)[1]
                cov = cov + coef ** 2 * head_cov.double()
        return mu, cov

    def exit_probs(self, mu, cov, temperature, noise=None) -> torch.Tensor:
        """One exit's predictive ``[S, B, C]`` (``S = 1`` but for ``mc``) at ``temperature``."""
        mu = mu / temperature
        if cov is None:
            return torch.softmax(mu, -1)[None]
        cov = cov / temperature ** 2
        if self.link == "mc":
            return links.mc(mu, cov, self.num_samples, self.shared_noise, noise=noise,
                            samples=True)
        return links.predictive(mu, cov, self.link)[None]

    def probs(self, feats: ExitFeatures, until: int | None = None) -> torch.Tensor:
        """Predictives of exits ``0..until`` ``[K', S, B, C]`` (MIE applied when on)."""
        until = len(self.temperature) - 1 if until is None else until
        out = torch.stack([self.exit_probs(*self.moments(feats, k), self.temperature[k])
                           .expand(self._draws, -1, -1) for k in range(until + 1)])
        return ensemble(out, self.weights[: until + 1]) if self.mie else out

    @property
    def _draws(self) -> int:
        return self.num_samples if self.bayesian and self.link == "mc" else 1

    def forward(self, x=None, y=None, dataset_size=None):
        """As a Pyro guide of ``BayesianExits``: draws every exit's head weights
        (``exit{k}.head.weight``, ``[C, D_k + 1]``) from the Laplace posterior."""
        import pyro

        from ..guides.laplace import LaplaceWeights
        from ..models.bayesian_exits import head_site

        if not self.bayesian:
            raise ValueError("only an ExitCalibration with Laplace heads is a guide of "
                             "BayesianExits' head-weight sites")
        return {head_site(k): pyro.sample(head_site(k), LaplaceWeights(head))
                for k, head in enumerate(self.heads)}


def _golden(fn, lo: float, hi: float, iters: int = 40) -> float:
    """Minimiser of a unimodal ``fn`` on ``[lo, hi]`` (golden-section search)."""
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = fn(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = fn(d)
    return 0.5 * (a + b)


def evidence_prior_precision(head: HeadLaplace) -> float:
    """The evidence-maximising prior precision (exact root for diag/kron/full; a golden-section
    search on ``log delta`` for kron-paper, whose evidence has no closed-form optimum)."""
    if head.structure != "kron-paper":
        return head.optimal_prior_precision()
    with torch.no_grad():
        return math.exp(_golden(lambda t: -float(head.log_marginal_likelihood(math.exp(t))),
                                -20.0, 20.0, 80))


def _nll(probs: torch.Tensor, y: torch.Tensor) -> float:
    p = probs.mean(0).gather(-1, y[:, None]).clamp_min(1e-12)
    return -float(p.log().mean())


def tune(calibration: ExitCalibration, val: ExitFeatures, y_val: torch.Tensor,
         prior: str = "marglik", temperature: str | None = "nll", seed: int = 0) -> None:
    """Tune the prior precision (``prior``: ``marglik`` keeps the heads' evidence maximisers,
    ``grid``: the paper's sigma0^2 grid) and temperature (``nll``: a continuous minimisation,
    ``grid``: the paper's grid, ``None``: T = 1) of every exit on validation NLL, exit by exit:
    with MIE greedily on the ensembled predictive, earlier exits' choices frozen (§2.3)."""
    if prior not in ("marglik", "grid"):
        raise ValueError(f"prior must be 'marglik' or 'grid', got {prior!r}")
    if temperature not in ("nll", "grid", None):
        raise ValueError(f"temperature must be 'nll', 'grid' or None, got {temperature!r}")
    y_val = y_val.to(val.logits.device)
    generator = torch.Generator(device=val.logits.device).manual_seed(seed)
    done = []  # tuned predictives [S, B, C] of earlier exits
    for k in range(len(calibration.temperature)):
        noise = None
        if calibration.bayesian and calibration.link == "mc":  # common random numbers
            shape = (calibration.num_samples, *([1] if calibration.shared_noise else
                                                [val.logits.shape[1]]), val.logits.shape[2])
            noise = torch.randn(shape, dtype=torch.float64, generator=generator,
                                device=val.logits.device)

        def objective(t, moments, k=k, noise=noise):
            probs = calibration.exit_probs(*moments, t, noise)
            if calibration.mie:
                w = calibration.weights[: k + 1]
                stack = [*done, probs.expand(calibration._draws, -1, -1)]
                probs = ensemble(torch.stack(stack), w)[-1]
            return _nll(probs, y_val)

        priors = [None]
        if calibration.bayesian and prior == "grid":
            priors = [1.0 / v for v in PAPER_PRIOR_VARIANCES]
        best = (math.inf, None, 1.0)
        for delta in priors:
            if delta is not None:
                calibration.heads[k].prior_precision.fill_(delta)
            moments = calibration.moments(val, k)  # the temperature only rescales them
            if temperature == "grid":
                t, value = min(((t, objective(t, moments)) for t in PAPER_TEMPERATURES),
                               key=lambda r: r[1])
            elif temperature == "nll":
                t = math.exp(_golden(lambda s, m=moments: objective(math.exp(s), m),
                                     math.log(0.01), math.log(100.0)))
                value = objective(t, moments)
            else:
                t, value = 1.0, objective(1.0, moments)
            if value < best[0]:
                best = (value, delta, t)
        if best[1] is not None:
            calibration.heads[k].prior_precision.fill_(best[1])
        calibration.temperature[k] = best[2]
        done.append(calibration.exit_probs(*calibration.moments(val, k), best[2], noise)
                    .expand(calibration._draws, -1, -1))


def fit_heads(model, train: ExitFeatures, y_train: torch.Tensor, structure: str = "kron",
              batch_size: int = 4096, seed: int = 0) -> list[HeadLaplace]:
    """One ``HeadLaplace`` per exit from cached training features, each at its evidence-
    maximising prior precision (BoostNet heads see their history as an offset)."""
    generator = torch.Generator(device=train.logits.device).manual_seed(seed)
    heads = []
    for k, exit_head in enumerate(model.backbone.heads):
        offset = train.logits[k] - train.own[k]
        offset = None if not bool(offset.abs().max() > 0) else offset
        head = HeadLaplace.fit(exit_head.linear, train.features[k], y_train.to(train.logits.device),
                               structure, offset, batch_size, generator)
        head.prior_precision.fill_(evidence_prior_precision(head))
        heads.append(head)
    return heads


def _check_options(structure, link, prior, temperature, data):
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    if link not in links.LINKS:
        raise ValueError(f"link must be one of {links.LINKS}, got {link!r}")
    if prior not in ("marglik", "grid"):
        raise ValueError(f"prior must be 'marglik' or 'grid', got {prior!r}")
    if temperature not in ("nll", "grid", None):
        raise ValueError(f"temperature must be 'nll', 'grid' or None, got {temperature!r}")
    if not all(hasattr(data, a) for a in ("train", "val", "input_shape")):
        raise TypeError("data must be a bayesdyn dataset (bayesdyn.data.load) with train and val "
                        "splits")
    if len(data.val) == 0:
        raise ValueError(f"the validation split of {getattr(data, 'name', 'data')} is empty: "
                         "temperatures and thresholds are tuned on it")


def laplace(model, data, structure: str = "kron", *, prior: str = "marglik",
            temperature: str | None = "nll", mie: bool = False, link: str = "probit",
            num_samples: int = 100, shared_noise: bool = False, batch_size: int = 1024,
            seed: int = 0) -> ExitCalibration:
    """Last-layer Laplace on every exit of a trained ``MultiExitNet`` / ``BoostedExits``.

    One pass over ``data.train`` caches the exits' features; each head gets a ``structure``
    Laplace (``diag``, ``kron``, ``full``, ``kron-paper``) at its evidence-maximising prior
    precision (``prior="grid"``: the paper's sigma0^2 grid on validation NLL instead), then
    per-exit temperatures by validation NLL (``temperature``: ``nll``, ``grid`` or ``None``),
    greedily under MIE when ``mie``. Returns the ``ExitCalibration`` (also a Pyro guide of
    ``bayesdyn.models.BayesianExits``)."""
    check_multi_exit(model, "exit calibration")
    _check_options(structure, link, prior, temperature, data)
    train = exit_features(model, data.train.tensors[0], batch_size)
    heads = fit_heads(model, train, data.train.tensors[1], structure, seed=seed)
    weights = mie_weights(model, data.input_shape) if mie else None
    calibration = ExitCalibration(model, heads, None, weights, link, num_samples, shared_noise)
    calibration.to(train.logits.device)
    val = exit_features(model, data.val.tensors[0], batch_size)
    tune(calibration, val, data.val.tensors[1], prior, temperature, seed)
    return calibration


VARIANTS = ("vanilla", "temperature", "laplace", "mie", "laplace+mie")


def calibrate_variants(model, data, structure: str = "kron", *, prior: str = "marglik",
                       link: str = "probit", num_samples: int = 100, batch_size: int = 1024,
                       seed: int = 0, with_laplace: bool = True,
                       with_mie: bool = True) -> dict[str, ExitCalibration]:
    """The predictives of the WACV comparison from one feature pass each over the training and
    validation splits: ``vanilla``, ``temperature`` (per-exit scaling), ``laplace`` (with
    temperatures), ``mie`` (plain heads ensembled) and ``laplace+mie`` (greedy tuning); the
    Laplace ones only ``with_laplace``, the MIE ones only ``with_mie``."""
    check_multi_exit(model, "exit calibration")
    _check_options(structure, link, prior, "nll", data)
    val = exit_features(model, data.val.tensors[0], batch_size)
    y_val = data.val.tensors[1]
    weights = mie_weights(model, data.input_shape) if with_mie else None
    out = {"vanilla": ExitCalibration(model), "temperature": ExitCalibration(model)}
    tune(out["temperature"], val, y_val)
    if with_mie:
        out["mie"] = ExitCalibration(model, weights=weights)
    if not with_laplace:
        return out
    train = exit_features(model, data.train.tensors[0], batch_size)
    fitted = fit_heads(model, train, data.train.tensors[1], structure, seed=seed)
    for name, w in (("laplace", None), ("laplace+mie", weights)):
        if name == "laplace+mie" and not with_mie:
            continue
        heads = [copy.deepcopy(h) for h in fitted]
        out[name] = ExitCalibration(model, heads, None, w, link, num_samples).to(val.logits.device)
        tune(out[name], val, y_val, prior, "nll" if prior == "marglik" else "grid", seed)
    return out
