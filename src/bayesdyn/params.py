"""How bayesdyn's models and guides meet Pyro's param store, without any global setting.

Pyro's ``SVI`` and ``pyro.optim`` train what a model or guide registers with ``pyro.param``
while it runs. Models register their ``nn.Module`` parameters on every call (as ``pyro.module``
does); guides are ``PyroModule``s and register theirs themselves. Each instance gets its own
name prefix, so two models or guides of one class (several seeds, several chains) never share a
parameter through the store by name.
"""

from __future__ import annotations

import itertools

import pyro
from pyro.nn import PyroModule
from torch import nn

_instances = itertools.count()
DIVIDER = "$$$"  # Pyro's separator between a module's name and its parameter's


def unique_name(obj) -> str:
    """``ClassName_N``: a param-store prefix no other object of this process uses."""
    return f"{type(obj).__name__}_{next(_instances)}"


def register_parameters(module: nn.Module) -> None:
    """``pyro.param`` for every trainable parameter of ``module`` under ``module.pyro_name``, so
    Pyro's optimisers see it. Frozen parameters are skipped silently (``pyro.module`` warns)."""
    for param_name, param in module.named_parameters():
        if param.requires_grad:
            pyro.param(f"{module.pyro_name}{DIVIDER}{param_name}", param)


def give_unique_name(guide: PyroModule) -> PyroModule:
    """Rename a guide (and its sub-guides) from its class name to a unique prefix."""
    guide._pyro_set_supermodule(unique_name(guide), guide._pyro_context)
    return guide


class RenamedOnCopy:
    """Mixin: a copy (``copy.deepcopy``, unpickling) takes a new param-store prefix, so training
    the copy with Pyro's optimisers never updates the original's tensors."""

    def __setstate__(self, state):
        super().__setstate__(state)
        if hasattr(self, "_pyro_context"):  # a guide (PyroModule)
            give_unique_name(self)
        else:
            self.pyro_name = unique_name(self)
