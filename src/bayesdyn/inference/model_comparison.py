"""Leave-one-out model comparison that ArviZ's ``compare`` accepts, for every family.

- Draws from a continuous posterior (nested nets, Bayesian heads): PSIS-LOO of the draws'
  pointwise log-likelihood, i.e. ``arviz.loo`` (q treated as the posterior; Pareto k flags
  where that is poor).
- An exact mixture over a discrete structure with point weights (a ``DepthNet``'s q(d), a
  deterministic net): importance sampling is exact there, no smoothing needed:
  ``p(y_i | y_-i) = 1 / sum_k w_k / p(y_i | k)`` (the structure posterior with observation ``i``
  removed by Bayes' rule; the weights stay at their point estimates, so this LOO does not refit
  them). PSIS cannot do it: a handful of distinct draws has no Pareto tail.
Both come back as ArviZ's own ``ELPDDataLOO``.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr


def loo(tree_or_model, guide=None, x=None, y=None, num_samples: int = 200):
    """ELPD-LOO of a ``to_datatree`` tree (or of ``model, guide`` on data ``x, y``) as an
    ``arviz_stats`` ``ELPDDataLOO``, pointwise, ready for ``arviz.compare``."""
    import arviz as az

    if isinstance(tree_or_model, xr.DataTree):
        tree = tree_or_model
    else:
        if guide is None or x is None or y is None:
            raise ValueError("loo(model, guide, x, y): pass the guide and the data too")
        from .datatree import to_datatree

        tree = to_datatree(tree_or_model, guide, x, y, num_samples=num_samples)
    if "structure" in tree.children:
        return exact_loo(tree["structure"].dataset, tree["log_likelihood"]["y"])
    return az.loo(tree, pointwise=True)


def exact_loo(structure: xr.Dataset, like: xr.DataArray):
    """Exact importance-sampling LOO over the components of every chain (chains weigh equally).

    ``structure``: ``log_weight [chain, component]`` and ``log_likelihood [chain, component,
    obs_id]``; ``like``: any array with the ``obs_id`` coordinate (for the result's)."""
    from arviz_stats.utils import ELPDDataLOO
    from scipy.special import logsumexp

    chains = structure.sizes["chain"]
    log_w = structure["log_weight"].values.reshape(-1) - math.log(chains)  # [C K]
    log_lik = structure["log_likelihood"].values.reshape(-1, structure.sizes["obs_id"])
    lpd_i = logsumexp(log_w[:, None] + log_lik, axis=0)
    elpd_i = -logsumexp(log_w[:, None] - log_lik, axis=0)
    n = len(elpd_i)
    obs = like["obs_id"]
    as_array = lambda v: xr.DataArray(v, dims=["obs_id"], coords={"obs_id": obs})  # noqa: E731
    return ELPDDataLOO(elpd=float(elpd_i.sum()), se=float(math.sqrt(n * np.var(elpd_i))),
                       p=float((lpd_i - elpd_i).sum()), n_samples=len(log_w), n_data_points=n,
                       scale="log", warning=False, good_k=0.7, elpd_i=as_array(elpd_i),
                       pareto_k=as_array(np.zeros(n)), approx_posterior=False)
