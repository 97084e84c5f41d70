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
    Pyro's optimisers see it. Frozen parameters are skipped silently (``pyro.module`` warns). A
    copy of a module (``copy.deepcopy``) that finds its original's tensors under its name takes a
    new name instead of training the original's."""
    store = pyro.get_param_store()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if any(store._params.get(f"{module.pyro_name}{DIVIDER}{n}", p) is not p for n, p in trainable):
        module.pyro_name = unique_name(module)
    for param_name, param in trainable:
        pyro.param(f"{module.pyro_name}{DIVIDER}{param_name}", param)


def give_unique_name(guide: PyroModule) -> PyroModule:
    """Rename a guide (and its sub-guides) from its class name to a unique prefix."""
    guide._pyro_set_supermodule(unique_name(guide), guide._pyro_context)
    return guide
