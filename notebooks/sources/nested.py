# %% [markdown]
# # Bayesian nested networks: learning which units matter, and how many
#
# A *nested* network orders the units of each layer, so the first `k` groups form a working
# sub-network for every `k`: one trained model serves every width. Nested dropout trains this with
# a fixed-rate ordering (a truncated geometric over how many groups stay on). **Bayesian nested
# neural networks (BNNN)** instead put a prior on the ordering and *learn* its posterior, with
# Gaussian weights:
#
#     z_l ~ Downhill(TruncatedGeometric(0.95, K))      a relaxed, monotone mask per layer
#     W   ~ N(0, 1)                                    counted while its group is on
#     y   ~ Categorical(f(x; W, z))
#
# This notebook looks at the Downhill distribution, trains BNNN and nested dropout, compares
# them at every width, and shows how to pick a width for a FLOPs budget and swap parts.
# `BAYESDYN_SMOKE=1` runs it on the bundled digits in about a minute.

# %%
import os
import torch
import matplotlib.pyplot as plt

from bayesdyn.data import load
from bayesdyn.distributions import Downhill, StickBreakingOrdering, TruncatedGeometric
from bayesdyn.evaluation import evaluate, plots
from bayesdyn.inference import fit
from bayesdyn.recipes import Recipe, build

SMOKE = os.environ.get("BAYESDYN_SMOKE") == "1"
DATASET = "digits" if SMOKE else "fashion-mnist"
EPOCHS = 3 if SMOKE else 10
data = load(DATASET)
data

# %% [markdown]
# ## The Downhill distribution
#
# A Concrete sample over the cut `z ∈ {0..K}`, turned into a mask by a reverse cumulative sum: the
# mask is non-increasing, lies in `[0, 1]^K`, and becomes the exact binary nested mask as the
# temperature goes to 0. In `hard` mode the forward value is binary and the gradient is the
# relaxed one (straight-through).

# %%
q = StickBreakingOrdering(torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4]))
fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
for ax, tau in zip(axes, [5.0, 1.0, 0.3, 0.05]):
    masks = Downhill(probs=q.probs, temperature=tau).rsample((12,))
    ax.plot(torch.arange(1, 9), masks.T, alpha=0.7)
    ax.set_title(f"temperature {tau}"); ax.set_xlabel("unit group j")
axes[0].set_ylabel("mask d_j");

# %%
hard = Downhill(probs=q.probs, temperature=2.0, hard=True).sample((20000,))
freq = torch.bincount(hard.sum(-1).long(), minlength=9) / len(hard)
plots.structure_posterior(freq, q.probs, name="groups on (z)",
                          title="hard Downhill samples (bars) follow q (dashed)");

# %% [markdown]
# ## Training BNNN and nested dropout
#
# Both use the same ordered network (16 groups per layer, the first always on). The recipe
# `nested` learns the ordering and Gaussian weights; `nested-dropout` samples masks from the
# fixed prior and keeps point weights.

# %%
runs = {}
for method in ("nested", "nested-dropout"):
    torch.manual_seed(0)
    model, guide = build(Recipe(method, width=64 if SMOKE else 256, arch="mlp"), data.input_shape, 10)
    history = fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=2e-3, progress=False)
    runs[method] = (model, guide)
    print(method, history.epochs[-1])

# %% [markdown]
# ## What the posterior learned about the ordering
#
# Per ordered layer, `q(z)` (bars) against the truncated-geometric prior (dashed). The guide
# starts every keep probability at `sigmoid(3) = 0.95`, the prior's own, so `q` starts on the
# prior; the printed total-variation distance says how far training moved it (in smoke mode's
# three epochs on digits, hardly at all: the KL to the prior outweighs what so little data says).

# %%
model, guide = runs["nested"]
posterior = model.structure_posterior(guide)
for name, probs in posterior.items():
    if not name.endswith("prior"):
        prior = posterior[name + " prior"]
        print(f"{name}: total variation from the prior {0.5 * (probs - prior).abs().sum():.3f}, "
              f"expected groups on {float((probs * torch.arange(len(probs))).sum()):.2f} "
              f"(prior {float((prior * torch.arange(len(prior))).sum()):.2f})")
        plots.structure_posterior(probs.cpu(), prior.cpu(), name=name, title=f"q vs prior, {name}")

# %% [markdown]
# ## Every width is a budget
#
# `evaluate` slices the weights for each width `1 - i/15`, re-estimates BatchNorm statistics per
# width, and reports accuracy, calibration and OOD detection with 8 Monte Carlo samples. The FLOPs
# are those of the whole predictive: 8 samples, each a local-reparameterisation pass (a mean and
# a variance per layer), so BNNN's budgets cost more than nested dropout's at the same width.

# %%
results = {m: evaluate(*runs[m], data, method=m) for m in runs}
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for ax, key in zip(axes, ["accuracy", "ece", "ood_auroc"]):
    for m, res in results.items():
        ax.plot([b["flops"] / 1e6 for b in res["budgets"]], [b[key] for b in res["budgets"]], "o-", ms=3, label=m)
    ax.set_xlabel("MFLOPs per example (8 Monte Carlo samples)"); ax.set_title(key); ax.legend()

# %% [markdown]
# ## Choosing a width for a FLOPs budget
#
# The rule applied here: the widest width whose predictive fits the budget (half the full
# width's FLOPs).

# %%
budget_mflops = 0.5 * results["nested"]["budgets"][-1]["flops"] / 1e6
fits = [b for b in results["nested"]["budgets"] if b["flops"] / 1e6 <= budget_mflops]
choice = max(fits, key=lambda b: b["flops"])
print(f"budget {budget_mflops:.3f} MFLOPs -> {choice['budget']}: accuracy {choice['accuracy']:.4f}, ECE {choice['ece']:.4f}")

# %% [markdown]
# ## Swapping the ordering prior and the weight guide
#
# The ordering prior is a constructor argument (any `OrderingDistribution`, per layer or shared).
# The weight guide can be any Pyro autoguide: `weight_autoguide(model, AutoNormal)` composes the
# family's ordering guide with it (`AutoGuideList`), and `fit` then trains with the family's
# reference ELBO, Pyro's `TraceMeanField_ELBO` (`AutoNormal` does not know the orderings, so every
# group's weight KL counts). Pyro's own defaults start every weight at zero (all units equal) with
# a scale of 0.1; `weight_autoguide` starts at the network's initial weights with a scale of 0.001.

# %%
from pyro import poutine
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from bayesdyn.guides import NestedGuide, weight_autoguide
from bayesdyn.models import NestedNet
from bayesdyn.nn import nested_mlp

def custom_model():
    torch.manual_seed(0)
    net = nested_mlp(64 if SMOKE else 784, 10, hidden=(64, 64), input_shape=data.input_shape)
    return NestedNet(net, 10, ordering_prior=TruncatedGeometric(0.8, 15),          # <- ordering prior
                     input_shape=data.input_shape)

custom = custom_model()
guide = weight_autoguide(custom, AutoNormal)                                     # <- weight guide
h = fit(custom, guide, data, epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False)
print(f"objective: {h.objective}; weight_autoguide(AutoNormal): val accuracy {h.epochs[-1]['val_accuracy']:.3f}")

pyro_defaults = custom_model()
is_order = lambda msg: msg["name"].startswith("order")
plain = AutoGuideList(pyro_defaults)
plain.append(NestedGuide(poutine.block(pyro_defaults, expose_fn=is_order), weights=False, nested=pyro_defaults))
plain.append(AutoNormal(poutine.block(pyro_defaults, hide_fn=is_order)))
h = fit(pyro_defaults, plain, data, epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False)
print(f"AutoNormal with Pyro's defaults:       val accuracy {h.epochs[-1]['val_accuracy']:.3f}")

# %% [markdown]
# ## Swapping the weight prior
#
# BNNN's weights have a sparsity prior of the variational-dropout family. `weight_prior=` takes
# `"gaussian"` (the default, `N(0, prior_scale²)`), `"log-uniform"` (improper `p(w) ∝ 1/|w|`, KL by
# Molchanov et al.'s approximation) or `"ard"` (a Gaussian whose per-weight variance is set to its
# empirical-Bayes optimum), or your own `WeightPrior`. Sparsity priors push each weight's
# noise-to-signal ratio `α = σ²/μ²` up; `weight_sparsity()` reports the fraction with `log α > 3`.

# %%
for prior in ("gaussian", "log-uniform"):
    torch.manual_seed(0)
    m, g = build(Recipe("nested", width=64 if SMOKE else 256, arch="mlp", weight_prior=prior),  # <- weight prior
                 data.input_shape, 10)
    h = fit(m, g, data, epochs=1 if SMOKE else 3, batch_size=128, lr=2e-3, progress=False)
    sparsity = {k: round(v, 3) for k, v in m.weight_sparsity().items()}
    print(f"{prior:<12} val accuracy {h.epochs[-1]['val_accuracy']:.4f}  noisy weights per layer {sparsity}")
