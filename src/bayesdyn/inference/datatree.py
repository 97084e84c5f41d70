"""Export a trained model and guide to an ArviZ 1.x ``xarray.DataTree`` (ecosystem.md §5).

One chain per independent run (seed), draws from the guide. Everything of a chain comes from one
vectorised Pyro trace (the guide's draws, the model replayed on them), so latent draws, the
pointwise log-likelihood, the replicated labels and the class probabilities of new inputs all
belong to the same draws.

Groups:
- ``posterior``: draws of the structural latents (``depth``; ``order_i`` as the number of unit
  groups on), their exact posterior pmfs (``depth_probs``, ``order_i_probs``: the guide's
  ``q``, the same for every draw of a chain, so across chains ``az.rhat`` compares runs), and
  weight draws on request;
- ``prior``: draws of the same latents from the prior and their prior pmfs;
- ``log_likelihood``, ``posterior_predictive``, ``observed_data``: the pointwise log-likelihood,
  replicated labels and labels of the data passed (pass the training data, or a subset of it, for
  ``az.loo`` of the fit);
- ``predictions``: class probabilities per draw for new inputs (``predict_x``);
- ``structure``: for models whose predictive is an exact mixture over a discrete structure with
  point weights (``DepthNet``, deterministic baselines), the log-likelihood of every component and
  its weight, from which ``bayesdyn.inference.loo`` computes an exact leave-one-out;
- ``optimization``: the training curve (negative ELBO per example and validation metrics per
  epoch), when ``histories`` are given.
"""

from __future__ import annotations

import arviz_base
import numpy as np
import pyro
import torch
import xarray as xr
from pyro.poutine.util import site_is_subsample

from ..models.base import vectorized_trace
from .predict import _EvalMode

OBS = "y"
DIMS = {"probs": ["pred_id", "class"], OBS: ["obs_id"]}


def to_datatree(model, guide, x: torch.Tensor, y: torch.Tensor, num_samples: int = 200,
                runs: list | None = None, seed: int = 0, attrs: dict | None = None,
                weights: bool = False, predict_x: torch.Tensor | None = None,
                histories: list | None = None):
    """The DataTree of one or several trained runs (see the module docstring for its groups).

    Args:
        model, guide: a trained pair (the first chain).
        x, y: inputs ``[N, ...]`` and labels ``[N]`` of the log-likelihood (for LOO of the fit:
            the training data or a subset of it).
        num_samples: draws per chain.
        runs: further independent ``(model, guide)`` pairs (other seeds), one chain each.
        weights: also store the weight sites (``*.weight``; large).
        predict_x: new inputs ``[M, ...]`` whose class probabilities go to ``predictions``.
        histories: one ``History`` (or list of epoch dicts) per chain for ``optimization``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if len(x) == 0:
        raise ValueError("x is empty: pass the data whose log-likelihood ArviZ should use")
    pairs = [(model, guide), *(runs or [])]
    chains = [_draws(m, g, x, y, num_samples, seed + i, weights, predict_x)
              for i, (m, g) in enumerate(pairs)]
    group_names = ["posterior", "prior", "posterior_predictive", "log_likelihood"]
    if predict_x is not None and chains[0]["predictions"]:  # regression models have no probs
        group_names.append("predictions")
    groups = {name: {k: np.stack([c[name][k] for c in chains]) for k in chains[0][name]}
              for name in group_names}
    groups["observed_data"] = {OBS: y.detach().cpu().numpy()}
    root_attrs = {"inference": "svi", "model": type(model).__name__,
                  "guide": type(guide).__name__, "num_runs": len(pairs)}
    root_attrs.update(attrs or {})
    tree = arviz_base.from_dict(groups, dims={**DIMS, **_probs_dims(chains[0])},
                                sample_dims=["chain", "draw"], attrs={"/": root_attrs})
    components = [_components(m, g, x, y) for m, g in pairs]
    if all(c is not None for c in components):
        tree["structure"] = xr.DataTree(_structure_dataset(components))
    if histories is not None:
        tree["optimization"] = xr.DataTree(_optimization_dataset(histories))
    return tree


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _components(model, guide, x, y):
    with _EvalMode(model, guide):
        return model.component_log_likelihood(guide, x.to(_device(model)), y.to(_device(model)))


@torch.no_grad()
def _draws(model, guide, x, y, num_samples, seed, weights, predict_x) -> dict:
    device = _device(model)
    n = len(x)
    x_all, y_all = x.to(device), y.to(device)
    if predict_x is not None:  # one trace, so predictions use the same draws; labels unused
        x_all = torch.cat([x_all, predict_x.to(device)])
        y_all = torch.cat([y_all, y_all[:1].expand(len(predict_x))])
    pyro.set_rng_seed(seed)
    with _EvalMode(model, guide):
        trace, guide_trace = vectorized_trace(model, guide, x_all, y_all, num_samples)
    trace.compute_log_prob()
    latent = set(guide_trace.stochastic_nodes)
    posterior, predictions = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or name == OBS:
            continue
        if site["infer"].get("_deterministic"):
            if predict_x is not None:
                predictions[name] = _per_draw(site, num_samples, len(x_all))[:, n:].cpu().numpy()
            continue
        if name not in latent or (name.endswith(".weight") and not weights):
            continue
        value = _per_draw(site, num_samples, len(x_all))
        if name.startswith("order_"):  # a nested mask: store its cut, the number of groups on
            value = value.sum(-1).round().long()
        posterior[name] = value.cpu().numpy()
    prior = {}
    for name, (q, p) in _structure_pmfs(model, guide).items():
        posterior[f"{name}_probs"] = np.broadcast_to(q, (num_samples, len(q))).copy()
        prior[f"{name}_probs"] = np.broadcast_to(p, (num_samples, len(p))).copy()
        prior[name] = torch.multinomial(torch.as_tensor(p), num_samples, True).numpy()
    obs = trace.nodes[OBS]
    y_rep = obs["fn"].sample()[..., :n].expand(num_samples, n)  # a replicated label per draw
    log_lik = obs["log_prob"][..., :n].expand(num_samples, n)
    out = {"posterior": posterior, "prior": prior,
           "posterior_predictive": {OBS: y_rep.cpu().numpy()},
           "log_likelihood": {OBS: log_lik.cpu().numpy()}}
    if predict_x is not None:
        out["predictions"] = predictions
    return out


def _structure_pmfs(model, guide) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{site: (q pmf, prior pmf)}`` from ``model.structure_posterior``."""
    found = model.structure_posterior(guide)
    return {name: (found[name].detach().cpu().double().numpy(),
                   found[f"{name} prior"].detach().cpu().double().numpy())
            for name in found if not name.endswith(" prior") and f"{name} prior" in found}


def _probs_dims(chain: dict) -> dict:
    return {name: [f"{name.removesuffix('_probs')}_value"]
            for name in chain["posterior"] if name.endswith("_probs")}


def _per_draw(site, num_samples: int, n: int) -> torch.Tensor:
    """The site's value as ``[S, (N,) *event]``: drops the singleton plate dims Predictive-style
    vectorisation inserts, and repeats values that do not vary over draws."""
    value = site["value"]
    event_dim = site["fn"].event_dim
    event = value.shape[value.dim() - event_dim:] if event_dim else ()
    in_data_plate = any(f.name == "data" for f in site["cond_indep_stack"])
    core = (n, *event) if in_data_plate else tuple(event)
    return value.reshape(-1, *core).expand(num_samples, *core)


def _structure_dataset(components) -> xr.Dataset:
    """Per chain, ``log p(y_n | component k)`` ``[K, N]`` and ``log w_k`` ``[K]``."""
    log_w = np.stack([c[0].detach().double().cpu().numpy() for c in components])
    log_lik = np.stack([c[1].detach().double().cpu().numpy() for c in components])
    return xr.Dataset({"log_weight": (("chain", "component"), log_w),
                       "log_likelihood": (("chain", "component", "obs_id"), log_lik)})


def _optimization_dataset(histories) -> xr.Dataset:
    epochs = [list(getattr(h, "epochs", h)) for h in histories]
    length = max(len(e) for e in epochs)
    keys = [k for k in epochs[0][0] if all(isinstance(r.get(k), (int, float)) for e in epochs
                                           for r in e)] if length else []
    data = {}
    for key in keys:
        table = np.full((len(epochs), length), np.nan)
        for c, rows in enumerate(epochs):
            table[c, :len(rows)] = [r[key] for r in rows]
        data[key] = (("chain", "epoch_index"), table)
    return xr.Dataset(data)
