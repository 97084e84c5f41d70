"""Initialising Pyro's autoguides on a bayesdyn model's weight sites."""

from __future__ import annotations

from pyro.infer.autoguide.initialization import init_to_feasible, init_to_value


def init_to_network(model, fallback=init_to_feasible):
    """An ``init_loc_fn`` for Pyro autoguides (``AutoNormal``, ``AutoDelta``,
    ``AutoLowRankMultivariateNormal``, ...) that starts every weight site at the network's
    current weights (``model.network_values()``: its initialisation, or a point estimate trained
    before) instead of a prior draw, and other sites by ``fallback``.

    Starting at prior draws is what makes an ``AutoNormal`` over network weights train poorly,
    and an improper prior (log-uniform) has no draws at all."""
    values = {name: v.detach().clone() for name, v in model.network_values().items()}
    return init_to_value(values=values, fallback=fallback)
