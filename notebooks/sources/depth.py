# %% [markdown]
# # Depth uncertainty: a posterior over how deep the network is
#
# A residual network computes `a_0 = input(x)`, `a_d = a_{d-1} + block_d(a_{d-1})`, and one output
# block reads *every* depth. Treating the depth `d` as a latent variable gives the model of
# **Variational Depth Search** and **Depth Uncertainty Networks (DUN)**:
#
#     d ~ Categorical(prior)            y ~ Categorical(softmax(output(a_d)))
#
# Because one forward pass returns the prediction of every depth, the ELBO
#
#     sum_n sum_d q(d) log p(y_n | x_n, d) - KL(q(d) || p(d))
#
# is computed **exactly** (no sampling), and the predictive `sum_d q(d) p(y | x, d)` costs one pass.
#
# This notebook trains a DUN, looks at `q(d)`, evaluates every depth, prunes the network, detects
# out-of-distribution inputs, summarises `q(d)` across runs with ArviZ, and swaps the prior and the
# guide. Set `BAYESDYN_SMOKE=1` for a one-minute run on the bundled digits; without it, it trains
# on Fashion-MNIST.

# %%
import os
import torch
import matplotlib.pyplot as plt
import pyro

from bayesdyn.data import load
from bayesdyn.nn import residual_mlp, vds_convnet
from bayesdyn.models import DepthNet, DeterministicNet
from bayesdyn.guides import DepthGuide
from bayesdyn.inference import fit, predict, to_datatree
from bayesdyn.evaluation import evaluate, measure, plots

SMOKE = os.environ.get("BAYESDYN_SMOKE") == "1"
DATASET = "digits" if SMOKE else "fashion-mnist"
EPOCHS = 3 if SMOKE else 20
torch.manual_seed(0)
data = load(DATASET)
data


# %% [markdown]
# ## The model and its guide
#
# The backbone is a `DepthStack`: for 28x28 images, VDS's convolutional net (bottleneck residual
# blocks at one resolution, a shared pooling + linear head); for the 8x8 digits, a residual MLP.
# `DepthNet` puts the prior over depth on top; `DepthGuide` is `q(d) = Categorical(logits=alpha)`,
# marked for exact enumeration. On a GPU, `resnet18_depth(1, 10)` or DUN's
# `resnet50_depth(1, 10)` (stage 4 shared by every depth) drop in for `make_backbone()`.

# %%
def make_backbone():
    if SMOKE:
        return residual_mlp(64, 10, width=64, depth=5, input_shape=data.input_shape)
    return vds_convnet(1, 10, depth=8, channels=32, hidden=16)

model = DepthNet(make_backbone(), prior="uniform", num_classes=10, input_shape=data.input_shape)
guide = DepthGuide(model)
x, y = data.train.tensors
print("outputs of every depth from one pass:", tuple(model.backbone(x[:4]).shape), "= [D+1, B, C]")
trace = pyro.poutine.trace(model).get_trace(x[:4], y[:4])
print({name: tuple(site["value"].shape) for name, site in trace.nodes.items() if site["type"] == "sample"})

# %% [markdown]
# The fast path that `fit` trains with is the same objective as Pyro's `TraceEnum_ELBO`
# on this model/guide pair; check it on one batch:

# %%
model.eval()
reference = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x[:64], y[:64], len(x))
fast, terms = model.fast_loss(guide, x[:64], y[:64], len(x))
print(f"TraceEnum_ELBO loss {reference.item():.4f}   fast path {fast.item():.4f}")

# %% [markdown]
# ## Training, and how q(d) moves
#
# `fit` is resumable: calling it again with a larger `epochs` on the same `out` folder continues the
# run. We use that to record `q(d)` after every epoch.

# %%
import tempfile
run_dir = tempfile.mkdtemp(prefix="depth-")
q_history = [guide.probs().detach().clone()]
for epoch in range(1, EPOCHS + 1):
    history = fit(model, guide, data, epochs=epoch, batch_size=128, lr=3e-3, out=run_dir,
                  resume=epoch > 1, progress=False, device="auto")
    q_history.append(guide.probs().detach().cpu().clone())
print(history.epochs[-1])
q_history = torch.stack(q_history)
fig, ax = plt.subplots(figsize=(6, 3.5))
for d in range(q_history.shape[1]):
    ax.plot(q_history[:, d], label=f"d={d}")
ax.set_xlabel("epoch"); ax.set_ylabel("q(d)"); ax.legend(ncol=3, fontsize=8); ax.set_title("q(d) during training")
plots.structure_posterior(guide.probs().detach().cpu(), model.prior_probs.cpu(), name="depth");

# %% [markdown]
# ## Every depth is a budget
#
# `evaluate` measures each depth's sub-network with PyTorch's FLOP counter and reports accuracy,
# NLL, ECE and OOD AUROC at every depth and for the depth-marginalised model (the star).

# %%
metrics = evaluate(model, guide, data, method="DUN")
rows = metrics["budgets"]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for ax, key in zip(axes, ["accuracy", "nll", "ece"]):
    ax.plot([r["flops"] / 1e6 for r in rows], [r[key] for r in rows], "o-", label="single depth")
    ax.plot(metrics["marginal"]["flops"] / 1e6, metrics["marginal"][key], "*", ms=14, label="marginal over q(d)")
    ax.set_xlabel("MFLOPs per example"); ax.set_title(key); ax.legend(fontsize=8)
pred = predict(model, guide, data.test.tensors[0])
plots.reliability_diagram(pred.mean, data.test.tensors[1], title="DUN, marginal predictive");

# %% [markdown]
# ## Pruning (VDS)
#
# Keep the shallowest depth whose posterior mass is within 95 % of the mode, drop the deeper
# blocks, and move their posterior mass onto the cut. The pruned network is genuinely smaller.

# %%
pruned, pruned_guide = model.prune(guide)
full_cost, small_cost = measure(model, data.input_shape)[-1], measure(pruned, data.input_shape)[-1]
acc = lambda m, g: (predict(m, g, data.test.tensors[0]).mean.argmax(-1) == data.test.tensors[1].cpu()).float().mean().item()
print(f"depth {model.backbone.max_depth} -> {pruned.backbone.max_depth}")
print(f"params {full_cost.params} -> {small_cost.params}, FLOPs {full_cost.flops} -> {small_cost.flops}")
print(f"accuracy {acc(model, guide):.4f} -> {acc(pruned, pruned_guide):.4f}")

# %% [markdown]
# ## Out-of-distribution inputs
#
# The predictive entropy of the marginal model should be higher on inputs from elsewhere
# (for Fashion-MNIST: digits resized to 28x28; for digits: Fashion-MNIST reduced to 8x8, or smooth
# random images when Fashion-MNIST is not installed).

# %%
from bayesdyn.data import default_ood, load_ood
ood_name = default_ood(data.name)
ood_x = load_ood(data, ood_name).tensors[0]
pred_ood = predict(model, guide, ood_x)
print(f"OOD set: {ood_name}; AUROC (entropy):", metrics["marginal"]["ood_auroc"])
plots.ood_histogram(pred.total, pred_ood.total, "predictive entropy", labels=(data.name, ood_name));

# %% [markdown]
# ## q(d) across independent runs, with ArviZ
#
# Each run (seed) becomes a chain; draws come from the guide. The posterior group holds the drawn
# depths and the exact `q(d)` of each run (`depth_probs`); R-hat across runs, computed on the
# drawn depths, tells whether the runs agree. The log-likelihood is that of (a subset of) the
# training data, so `loo` is leave-one-out of the fit: for the discrete, exact `q(d)` it is exact.

# %%
import arviz as az
from bayesdyn.inference import loo

runs = []
for seed in range(2 if SMOKE else 4):
    torch.manual_seed(seed)
    m = DepthNet(make_backbone(), num_classes=10, input_shape=data.input_shape)
    g = DepthGuide(m)
    fit(m, g, data, epochs=max(1, EPOCHS // 2), batch_size=128, lr=3e-3, seed=seed, progress=False)
    runs.append((m, g))
x_fit, y_fit = data.train[:1000]
tree = to_datatree(*runs[0], x_fit, y_fit, num_samples=200, runs=runs[1:],
                   predict_x=data.test.tensors[0][:200])
print("R-hat of the drawn depth across runs:", float(az.rhat(tree, var_names=["depth"])["depth"]))
az.summary(tree, kind="stats")

# %%
az.plot_forest(tree, var_names=["depth_probs"]);

# %%
loo(tree)

# %% [markdown]
# ## Swapping the prior and the guide: one line each
#
# The prior is a constructor argument (`"uniform"`, VDS's `"decaying"` 0.85^(d+1), or any
# `torch.distributions.Categorical`); the guide is any Pyro guide with a categorical `depth`
# site. With Pyro's own `AutoDiscreteParallel`, `fit` has no fast path and trains through
# `TraceEnum_ELBO` instead: same objective, slower.

# %%
from pyro.infer.autoguide import AutoDiscreteParallel
torch.manual_seed(0)
vds = DepthNet(make_backbone(), prior="decaying", num_classes=10, input_shape=data.input_shape)  # <- prior
pyro_guide = AutoDiscreteParallel(vds)                                                           # <- guide
h = fit(vds, pyro_guide, data, epochs=1, batch_size=256, lr=3e-3, progress=False)
print("objective used:", h.objective)
plots.structure_posterior(vds.structure_posterior(pyro_guide)["depth"].cpu(), vds.prior_probs.cpu(),
                          title="decaying prior, Pyro's discrete guide, 1 epoch");

# %% [markdown]
# ## Regression: a depth posterior for a 1-D curve
#
# DUN's regression networks are fully connected: a linear input layer (so depth 0 is a linear
# model), residual blocks linear-ReLU-BatchNorm, a linear output layer shared by every depth, and
# a Gaussian likelihood with a learned noise scale. The predictive is a mixture of Gaussians over
# depths. `toy-1d` is `y = x sin(x)` plus noise, observed on two intervals with a gap between them.

# %%
from bayesdyn.evaluation import evaluate as evaluate_run

curve = load("toy-1d")
torch.manual_seed(0)
regressor = DepthNet(residual_mlp(1, 1, width=50, depth=4, input_relu=False), likelihood="regression")
regressor_guide = DepthGuide(regressor)
fit(regressor, regressor_guide, curve, epochs=60 if SMOKE else 200, batch_size=64, lr=3e-3,
    progress=False)
scores = evaluate_run(regressor, regressor_guide, curve, method="DUN regression")
print({k: round(v, 3) for k, v in scores["marginal"].items() if k in ("rmse", "nll", "nll_gaussian")})
print("q(d):", [round(p, 3) for p in scores["structure"]["depth"]])
plots.regression_bands(regressor, regressor_guide, curve,
                       title="DUN on toy-1d: per-depth means and the marginal's ±2 sd band");

# %% [markdown]
# `nll` is the negative log-likelihood of the exact mixture over depths; `nll_gaussian` that of
# the Gaussian with the mixture's mean and variance (what DUN's tables report). The predictive
# standard deviation, in the data's units, where there is data (x = ±2) and in the gap (x = 0):

# %%
from bayesdyn.inference import predict_normal

where = torch.tensor([[-2.0], [0.0], [2.0]])
band = predict_normal(regressor, regressor_guide, (where - curve.mean[0]) / curve.std[0])
print({f"x={float(x):+.0f}": round(float(sd) * curve.target_std, 3)
       for x, sd in zip(where, band.variance.sqrt())})

# %% [markdown]
# A single network's band is its noise scale everywhere. The mixture over depths is wider where
# the depths' means part, little in the gap and much more beyond the data, where the deeper
# networks extrapolate in different directions.
