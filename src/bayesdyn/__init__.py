"""bayesdyn: Bayesian dynamic neural networks in Pyro.

Networks whose width, depth, exit or sub-network is a latent variable, trained with SVI, so one
trained model serves every compute budget with calibrated uncertainty.
"""

__version__ = "0.1.0"
