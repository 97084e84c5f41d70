"""bayesdyn: Bayesian dynamic neural networks in Pyro.

Networks whose width, depth, exit or sub-network is a latent variable, trained with SVI, so one
trained model serves every compute budget with calibrated uncertainty.
"""

import pyro

# Parameters of guides (PyroModules) live in their modules, not in Pyro's global param store:
# otherwise two guides of the same class (e.g. four SVI runs for R-hat) would share parameters by
# name. Pyro recommends this mode for ELBOModule training.
pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"
