"""Export guide draws to an ArviZ 1.x ``xarray.DataTree`` (ecosystem.md §5).

One chain per independent SVI run, draws from the guide. Everything comes from one vectorised
Pyro trace per run (``Predictive.get_vectorized_trace`` with the labels observed), so the latent
draws, the ``pyro.deterministic`` sites, the pointwise log-likelihood and the posterior-predictive
labels all belong to the same draws.
"""

from __future__ import annotations

import arviz_base
import numpy as np
import pyro
import torch
from pyro.poutine.util import site_is_subsample

from ..models.base import vectorized_trace
from .predict import _EvalMode

OBS = "y"
DIMS = {"probs": ["obs_id", "class"], OBS: ["obs_id"]}


def to_datatree(model, guide, x: torch.Tensor, y: torch.Tensor, num_samples: int = 200,
                runs: list | None = None, seed: int = 0, attrs: dict | None = None,
                weights: bool = False):
    """``DataTree`` with groups ``posterior`` (latent sites and ``pyro.deterministic`` sites such
    as class probabilities), ``posterior_predictive`` (label draws), ``log_likelihood`` and
    ``observed_data``, dims ``(chain, draw, ...)``.

    Args:
        model, guide: a trained pair (the first chain).
        x, y: the inputs ``[N, ...]`` and labels ``[N]`` the quantities are computed on (a probe
            set: class probabilities are stored per draw, ``S x N x C`` numbers per chain).
        num_samples: draws per chain.
        runs: further independent ``(model, guide)`` pairs (other seeds), one chain each, so
            ``arviz.rhat`` measures between-run disagreement.
        weights: also store weight sites (``*.weight``; large), not only structural latents.
    """
    pairs = [(model, guide), *(runs or [])]
    chains = [_draws(m, g, x, y, num_samples, seed + i, weights) for i, (m, g) in enumerate(pairs)]
    groups = {name: {k: np.stack([c[name][k] for c in chains]) for k in chains[0][name]}
              for name in ("posterior", "posterior_predictive", "log_likelihood")}
    groups["observed_data"] = {OBS: y.detach().cpu().numpy()}
    root_attrs = {"inference": "svi", "model": type(model).__name__,
                  "guide": type(guide).__name__, "num_runs": len(pairs)}
    root_attrs.update(attrs or {})
    return arviz_base.from_dict(groups, dims=DIMS, sample_dims=["chain", "draw"],
                                attrs={"/": root_attrs})


@torch.no_grad()
def _draws(model, guide, x, y, num_samples, seed, weights) -> dict:
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    pyro.set_rng_seed(seed)
    with _EvalMode(model, guide):
        trace, guide_trace = vectorized_trace(model, guide, x, y, num_samples)
    trace.compute_log_prob()
    posterior, n = {}, x.shape[0]
    latent = set(guide_trace.stochastic_nodes)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if not (name in latent or site["infer"].get("_deterministic")):
            continue
        if name.endswith(".weight") and not weights:
            continue
        posterior[name] = _per_draw(site, num_samples, n).cpu().numpy()
    obs = trace.nodes[OBS]
    y_rep = obs["fn"].expand(torch.Size([num_samples, n])).sample()  # a replicated label per draw
    log_lik = obs["log_prob"].expand(num_samples, n)
    return {"posterior": posterior,
            "posterior_predictive": {OBS: y_rep.cpu().numpy()},
            "log_likelihood": {OBS: log_lik.cpu().numpy()}}


def _per_draw(site, num_samples: int, n: int) -> torch.Tensor:
    """The site's value as ``[S, (N,) *event]``: drops the singleton plate dims Predictive-style
    vectorisation inserts, and repeats values that do not vary over draws."""
    value = site["value"]
    event_dim = site["fn"].event_dim
    event = value.shape[value.dim() - event_dim:] if event_dim else ()
    in_data_plate = any(f.name == "data" for f in site["cond_indep_stack"])
    core = (n, *event) if in_data_plate else tuple(event)
    return value.reshape(-1, *core).expand(num_samples, *core)
