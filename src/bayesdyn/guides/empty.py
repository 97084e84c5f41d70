"""The guide of a model with no latent variables (point-estimate baselines)."""

from pyro.infer.autoguide import AutoGuide

from ..params import RenamedOnCopy, give_unique_name


class EmptyGuide(RenamedOnCopy, AutoGuide):
    """Samples nothing: the ELBO reduces to the (scaled) log-likelihood."""

    def __init__(self, model=None):
        super().__init__(model)
        give_unique_name(self)  # its own prefix in Pyro's param store

    def forward(self, *args, **kwargs):
        return {}

    def median(self, *args, **kwargs):
        return {}
