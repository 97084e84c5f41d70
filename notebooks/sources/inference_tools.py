# %% [markdown]
# # Pyro and ArviZ tools on bayesdyn models
#
# Every bayesdyn family is a Pyro model with a guide, so the parts a researcher swaps are
# constructor arguments and Pyro objects, and the tools that train and inspect them are Pyro's and
# ArviZ's own. This notebook, for the depth (DUN) and nested (BNNN) families:
#
# 1. swaps the structure prior, the weight prior and the guide, one line each;
# 2. trains with Pyro's plain `SVI` loop and samples with `Predictive`;
# 3. inspects the posteriors with ArviZ: summaries, forest and distribution plots, R-hat across
#    runs, and `loo` / `compare` between the two families.
#
# `BAYESDYN_SMOKE=1` runs it on the bundled digits in about a minute; without it, on
# Fashion-MNIST.

# %%
import os

import arviz as az
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDiscreteParallel, AutoLowRankMultivariateNormal, AutoNormal

from bayesdyn.data import load
from bayesdyn.distributions import TruncatedGeometric
from bayesdyn.guides import DepthGuide, NestedGuide, weight_autoguide
from bayesdyn.inference import fit, loo, predict, to_datatree
from bayesdyn.models import DepthNet, NestedNet
from bayesdyn.nn import nested_mlp, residual_mlp

SMOKE = os.environ.get("BAYESDYN_SMOKE") == "1"
data = load("digits" if SMOKE else "fashion-mnist")
EPOCHS = 3 if SMOKE else 10
FEATURES = 64 if SMOKE else 784
x_test, y_test = data.test.tensors


def accuracy(model, guide):
    return float((predict(model, guide, x_test).mean.argmax(-1) == y_test).float().mean())


# %% [markdown]
# ## Depth: three swaps, one line each
#
# **Structure prior.** `prior=` takes `"uniform"` (DUN), `"decaying"` (VDS), a probability vector,
# or any Pyro distribution over 0, 1, 2, ... (here a geometric prior favouring shallow networks,
# truncated to the network's depths).

# %%
def depth_net(**kwargs):
    torch.manual_seed(0)
    backbone = residual_mlp(FEATURES, 10, width=64, depth=4, input_shape=data.input_shape)
    return DepthNet(backbone, num_classes=10, input_shape=data.input_shape, **kwargs)

model = depth_net(prior=dist.Geometric(0.3))                                    # <- structure prior
print("prior over depths:", [round(p, 3) for p in model.prior_probs.tolist()])

# %% [markdown]
# **Guide.** The family's own `DepthGuide`, or Pyro's `AutoDiscreteParallel` on the same site:
# `fit` trains the first through its exact fast path and the second through Pyro's
# `TraceEnum_ELBO`; both end with a categorical q(d).

# %%
for make_guide in (DepthGuide, AutoDiscreteParallel):                          # <- guide
    model = depth_net()
    guide = make_guide(model)
    history = fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False)
    q = model.depth_weights(guide).detach()
    print(f"{make_guide.__name__:<22} objective {history.objective:<5} accuracy {accuracy(model, guide):.3f}"
          f"  q(d) {[round(p, 2) for p in q.tolist()]}")

# %% [markdown]
# **Weight prior.** `output_prior_scale=1.0` puts a `N(0, 1)` prior on the output block's weights,
# so they get a posterior too; `weight_autoguide` pairs the depth guide with any Pyro autoguide
# over those weights (mean-field `AutoNormal`, or a low-rank Gaussian), started at the network's
# weights with a small scale.

# %%
for autoguide in (AutoNormal, AutoLowRankMultivariateNormal):                  # <- weight guide
    model = depth_net(output_prior_scale=1.0)                                   # <- weight prior
    guide = weight_autoguide(model, autoguide)
    fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False)
    print(f"{autoguide.__name__:<32} accuracy {accuracy(model, guide):.3f}")

# %% [markdown]
# ## Pyro's own loop
#
# `SVI` with a `pyro.optim` optimiser and the family's ELBO trains every parameter of the network
# and the guide; `dataset_size` scales each minibatch's likelihood to the whole training set.

# %%
model = depth_net()
guide = DepthGuide(model)
svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-3}), TraceEnum_ELBO(max_plate_nesting=1))
x, y = data.train.tensors
losses = []
for step in range(100 if SMOKE else 1000):
    batch = torch.randint(0, len(x), (128,))
    losses.append(svi.step(x[batch], y[batch], dataset_size=len(x)) / len(x))
plt.plot(losses); plt.xlabel("SVI step"); plt.ylabel("negative ELBO per example")
print(f"accuracy after Pyro's SVI: {accuracy(model, guide):.3f}")

# %% [markdown]
# `Predictive` draws depths from q(d) and returns every site, including the class
# probabilities the model records as a `pyro.deterministic` site.

# %%
draws = Predictive(model, guide=guide, num_samples=100)(x_test[:5])
print({name: tuple(v.shape) for name, v in draws.items()})
print("depths drawn:", torch.bincount(draws["depth"].flatten(), minlength=model.num_depths).tolist())

# %% [markdown]
# ## Nested: the same three swaps
#
# The ordering prior (`ordering_prior=`, any `OrderingDistribution`), the weight prior
# (`weight_prior=`: Gaussian, log-uniform or ARD) and the guide (`NestedGuide`, or a Pyro
# autoguide over the weights through `weight_autoguide`). Nested nets train through
# `TraceMeanField_ELBO`: the KLs of the ordering and of each unit group's weights are exact.

# %%
def nested_net(**kwargs):
    torch.manual_seed(0)
    net = nested_mlp(FEATURES, 10, hidden=(64, 64), input_shape=data.input_shape)
    return NestedNet(net, 10, input_shape=data.input_shape, **kwargs)

choices = {
    "BNNN (NestedGuide)": (dict(), NestedGuide),
    "ordering prior 0.8": (dict(ordering_prior=TruncatedGeometric(0.8, 15)), NestedGuide),  # <- prior
    "ARD weight prior": (dict(weight_prior="ard"), NestedGuide),                           # <- weight prior
    "AutoNormal weights": (dict(), lambda m: weight_autoguide(m, AutoNormal)),             # <- guide
}
nested_runs = {}
for label, (options, make_guide) in choices.items():
    model = nested_net(**options)
    guide = make_guide(model)
    history = fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False)
    nested_runs[label] = (model, guide)
    print(f"{label:<20} objective {history.objective:<5} accuracy {accuracy(model, guide):.3f}")

# %% [markdown]
# ## ArviZ: summaries and R-hat across runs
#
# `to_datatree` turns trained runs into one `xarray.DataTree`, one chain per run. Its posterior
# holds the drawn structure and its exact pmf (`depth_probs`); the log-likelihood is that of the
# data passed (here 500 training examples, for leave-one-out of the fit). R-hat across runs is
# computed on draws (the drawn depth), since the exact pmf has no Monte Carlo error.

# %%
x_fit, y_fit = data.train[:500]
depth_runs = []
for seed in range(2):
    torch.manual_seed(seed)
    model = depth_net()
    guide = DepthGuide(model)
    fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=3e-3, seed=seed, progress=False)
    depth_runs.append((model, guide))
depth_tree = to_datatree(*depth_runs[0], x_fit, y_fit, num_samples=200, runs=depth_runs[1:])
print("R-hat of the drawn depth across the two runs:",
      round(float(az.rhat(depth_tree, var_names=["depth"])["depth"]), 3))
az.summary(depth_tree, kind="stats")

# %%
az.plot_forest(depth_tree, var_names=["depth_probs"], combined=False);

# %%
nested_tree = to_datatree(*nested_runs["BNNN (NestedGuide)"], x_fit, y_fit, num_samples=200)
az.plot_dist(nested_tree, var_names=["order_0", "order_1"]);

# %% [markdown]
# ## Model comparison: `loo` and `compare`
#
# `loo` returns ArviZ's own ELPD object: PSIS-LOO for the nested net's continuous weight draws,
# and an exact leave-one-out for the DUN, whose depth posterior is discrete and exact (PSIS has
# no tail to fit on five distinct values). `az.compare` then ranks the two families like any
# ArviZ models, on the same 500 training examples.

# %%
comparison = az.compare({"depth (DUN)": loo(depth_tree), "nested (BNNN)": loo(nested_tree)})
comparison
