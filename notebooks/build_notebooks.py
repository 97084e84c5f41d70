"""Writes the tutorial notebooks from the cell lists below (run it after editing them):

    python notebooks/build_notebooks.py

Notebooks are committed without outputs; `make test` executes them in smoke mode
(BAYESDYN_SMOKE=1: digits and a few epochs), and by hand they run in full mode."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent

DEPTH = [
    ("md", """# Depth uncertainty: a posterior over how deep the network is

A residual network computes `a_0 = input(x)`, `a_d = a_{d-1} + block_d(a_{d-1})`, and one output
block reads *every* depth. Treating the depth `d` as a latent variable gives the model of
**Variational Depth Search** and **Depth Uncertainty Networks (DUN)**:

    d ~ Categorical(prior)            y ~ Categorical(softmax(output(a_d)))

Because one forward pass returns the prediction of every depth, the ELBO

    sum_n sum_d q(d) log p(y_n | x_n, d) - KL(q(d) || p(d))

is computed **exactly** (no sampling), and the predictive `sum_d q(d) p(y | x, d)` costs one pass.

This notebook trains a DUN, looks at `q(d)`, evaluates every depth, prunes the network, detects
out-of-distribution inputs, summarises `q(d)` across runs with ArviZ, and swaps the prior and the
guide. Set `BAYESDYN_SMOKE=1` for a one-minute run on the bundled digits; without it, it trains
on Fashion-MNIST."""),
    ("code", """import os
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
data"""),
    ("md", """## The model and its guide

The backbone is a `DepthStack`: for 28x28 images, VDS's convolutional net (bottleneck residual
blocks at one resolution, a shared pooling + linear head); for the 8x8 digits, a residual MLP.
`DepthNet` puts the prior over depth on top; `DepthGuide` is `q(d) = Categorical(logits=alpha)`,
marked for exact enumeration. On a GPU, `resnet18_depth(1, 10)` or DUN's
`resnet50_depth(1, 10)` (stage 4 shared by every depth) drop in for `make_backbone()`."""),
    ("code", """def make_backbone():
    if SMOKE:
        return residual_mlp(64, 10, width=64, depth=5, input_shape=data.input_shape)
    return vds_convnet(1, 10, depth=8, channels=32, hidden=16)

model = DepthNet(make_backbone(), prior="uniform", num_classes=10, input_shape=data.input_shape)
guide = DepthGuide(model)
x, y = data.train.tensors
print("outputs of every depth from one pass:", tuple(model.backbone(x[:4]).shape), "= [D+1, B, C]")
trace = pyro.poutine.trace(model).get_trace(x[:4], y[:4])
print({name: tuple(site["value"].shape) for name, site in trace.nodes.items() if site["type"] == "sample"})"""),
    ("md", """The fast path that `fit` trains with is the same objective as Pyro's `TraceEnum_ELBO`
on this model/guide pair; check it on one batch:"""),
    ("code", """model.eval()
reference = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x[:64], y[:64], len(x))
fast, terms = model.fast_loss(guide, x[:64], y[:64], len(x))
print(f"TraceEnum_ELBO loss {reference.item():.4f}   fast path {fast.item():.4f}")"""),
    ("md", """## Training, and how q(d) moves

`fit` is resumable: calling it again with a larger `epochs` on the same `out` folder continues the
run. We use that to record `q(d)` after every epoch."""),
    ("code", """import tempfile
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
plots.structure_posterior(guide.probs().detach().cpu(), model.prior_probs.cpu(), name="depth");"""),
    ("md", """## Every depth is a budget

`evaluate` measures each depth's sub-network with PyTorch's FLOP counter and reports accuracy,
NLL, ECE and OOD AUROC at every depth and for the depth-marginalised model (the star)."""),
    ("code", """metrics = evaluate(model, guide, data, method="DUN")
rows = metrics["budgets"]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for ax, key in zip(axes, ["accuracy", "nll", "ece"]):
    ax.plot([r["flops"] / 1e6 for r in rows], [r[key] for r in rows], "o-", label="single depth")
    ax.plot(metrics["marginal"]["flops"] / 1e6, metrics["marginal"][key], "*", ms=14, label="marginal over q(d)")
    ax.set_xlabel("MFLOPs per example"); ax.set_title(key); ax.legend(fontsize=8)
pred = predict(model, guide, data.test.tensors[0])
plots.reliability_diagram(pred.mean, data.test.tensors[1], title="DUN, marginal predictive");"""),
    ("md", """## Pruning (VDS)

Keep the shallowest depth whose posterior mass is within 95 % of the mode, drop the deeper
blocks, and move their posterior mass onto the cut. The pruned network is genuinely smaller."""),
    ("code", """pruned, pruned_guide = model.prune(guide)
full_cost, small_cost = measure(model, data.input_shape)[-1], measure(pruned, data.input_shape)[-1]
acc = lambda m, g: (predict(m, g, data.test.tensors[0]).mean.argmax(-1) == data.test.tensors[1].cpu()).float().mean().item()
print(f"depth {model.backbone.max_depth} -> {pruned.backbone.max_depth}")
print(f"params {full_cost.params} -> {small_cost.params}, FLOPs {full_cost.flops} -> {small_cost.flops}")
print(f"accuracy {acc(model, guide):.4f} -> {acc(pruned, pruned_guide):.4f}")"""),
    ("md", """## Out-of-distribution inputs

The predictive entropy of the marginal model should be higher on inputs from elsewhere
(for Fashion-MNIST: digits resized to 28x28; for digits: the test digits rotated by 90 degrees)."""),
    ("code", """from bayesdyn.data import DEFAULT_OOD, load_ood
ood_x = load_ood(data, DEFAULT_OOD[data.name]).tensors[0]
pred_ood = predict(model, guide, ood_x)
print("OOD AUROC (entropy):", metrics["marginal"]["ood_auroc"])
plots.ood_histogram(pred.total, pred_ood.total, "predictive entropy", labels=(data.name, DEFAULT_OOD[data.name]));"""),
    ("md", """## q(d) across independent runs, with ArviZ

Each SVI run becomes a chain; draws come from the guide. R-hat across runs tells whether the
runs agree on the depth posterior."""),
    ("code", """import arviz as az
runs = []
for seed in range(2 if SMOKE else 4):
    torch.manual_seed(seed)
    m = DepthNet(make_backbone(), num_classes=10, input_shape=data.input_shape)
    g = DepthGuide(m)
    fit(m, g, data, epochs=max(1, EPOCHS // 2), batch_size=128, lr=3e-3, seed=seed, progress=False)
    runs.append((m, g))
probe_x, probe_y = (t[:200] for t in data.test.tensors)
tree = to_datatree(*runs[0], probe_x, probe_y, num_samples=200, runs=runs[1:])
az.summary(tree, var_names=["depth"])"""),
    ("code", """az.plot_forest(tree, var_names=["depth"]);"""),
    ("md", """## Swapping the prior and the guide: one line each

The prior is a constructor argument (`"uniform"`, VDS's `"decaying"` 0.85^(d+1), or any
`torch.distributions.Categorical`); the guide is any Pyro guide with a categorical `depth`
site. With Pyro's own `AutoDiscreteParallel`, `fit` has no fast path and trains through
`TraceEnum_ELBO` instead: same objective, slower."""),
    ("code", """from pyro.infer.autoguide import AutoDiscreteParallel
torch.manual_seed(0)
vds = DepthNet(make_backbone(), prior="decaying", num_classes=10, input_shape=data.input_shape)  # <- prior
pyro_guide = AutoDiscreteParallel(vds)                                                           # <- guide
h = fit(vds, pyro_guide, data, epochs=1, batch_size=256, lr=3e-3, progress=False)
print("objective used:", h.objective)
plots.structure_posterior(vds.structure_posterior(pyro_guide)["depth"].cpu(), vds.prior_probs.cpu(),
                          title="decaying prior, Pyro's discrete guide, 1 epoch");"""),
]

NESTED = [
    ("md", """# Bayesian nested networks: learning which units matter, and how many

A *nested* network orders the units of each layer, so the first `k` groups form a working
sub-network for every `k`: one trained model serves every width. Nested dropout trains this with
a fixed-rate ordering (a truncated geometric over how many groups stay on). **Bayesian nested
neural networks (BNNN)** instead put a prior on the ordering and *learn* its posterior, with
Gaussian weights:

    z_l ~ Downhill(TruncatedGeometric(0.95, K))      a relaxed, monotone mask per layer
    W   ~ N(0, 1)                                    counted while its group is on
    y   ~ Categorical(f(x; W, z))

This notebook looks at the Downhill distribution, trains BNNN and nested dropout, compares
them at every width, and shows how to pick a width for a FLOPs budget and swap parts.
`BAYESDYN_SMOKE=1` runs it on the bundled digits in about a minute."""),
    ("code", """import os
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
data"""),
    ("md", """## The Downhill distribution

A Concrete sample over the cut `z ∈ {0..K}`, turned into a mask by a reverse cumulative sum: the
mask is non-increasing, lies in `[0, 1]^K`, and becomes the exact binary nested mask as the
temperature goes to 0. In `hard` mode the forward value is binary and the gradient is the
relaxed one (straight-through)."""),
    ("code", """q = StickBreakingOrdering(torch.tensor([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.5, 0.4]))
fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
for ax, tau in zip(axes, [5.0, 1.0, 0.3, 0.05]):
    masks = Downhill(probs=q.probs, temperature=tau).rsample((12,))
    ax.plot(torch.arange(1, 9), masks.T, alpha=0.7)
    ax.set_title(f"temperature {tau}"); ax.set_xlabel("unit group j")
axes[0].set_ylabel("mask d_j");"""),
    ("code", """hard = Downhill(probs=q.probs, temperature=2.0, hard=True).sample((20000,))
freq = torch.bincount(hard.sum(-1).long(), minlength=9) / len(hard)
plots.structure_posterior(freq, q.probs, name="groups on (z)",
                          title="hard Downhill samples (bars) follow q (dashed)");"""),
    ("md", """## Training BNNN and nested dropout

Both use the same ordered network (16 groups per layer, the first always on). The recipe
`nested` learns the ordering and Gaussian weights; `nested-dropout` samples masks from the
fixed prior and keeps point weights."""),
    ("code", """runs = {}
for method in ("nested", "nested-dropout"):
    torch.manual_seed(0)
    model, guide = build(Recipe(method, width=64 if SMOKE else 256, arch="mlp"), data.input_shape, 10)
    history = fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=2e-3, progress=False)
    runs[method] = (model, guide)
    print(method, history.epochs[-1])"""),
    ("md", """## What the posterior learned about the ordering

Per ordered layer, `q(z)` (bars) against the truncated-geometric prior (dashed)."""),
    ("code", """model, guide = runs["nested"]
for name, probs in model.structure_posterior(guide).items():
    if not name.endswith("prior"):
        plots.structure_posterior(probs.cpu(), model.structure_posterior(guide)[name + " prior"].cpu(),
                                  name=name, title=f"q vs prior, {name}")"""),
    ("md", """## Every width is a budget

`evaluate` slices the weights for each width `1 - i/15`, re-estimates BatchNorm statistics per
width, and reports accuracy, calibration and OOD detection with 8 Monte Carlo samples."""),
    ("code", """results = {m: evaluate(*runs[m], data, method=m) for m in runs}
fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
for ax, key in zip(axes, ["accuracy", "ece", "ood_auroc"]):
    for m, res in results.items():
        ax.plot([b["flops"] / 1e6 for b in res["budgets"]], [b[key] for b in res["budgets"]], "o-", ms=3, label=m)
    ax.set_xlabel("MFLOPs per example (one MC sample)"); ax.set_title(key); ax.legend()"""),
    ("md", """## Choosing a width for a FLOPs budget

The cheapest width whose validation-free test accuracy is within 1 point of the best, or simply
the widest width that fits the budget:"""),
    ("code", """budget_mflops = 0.5 * results["nested"]["budgets"][-1]["flops"] / 1e6
fits = [b for b in results["nested"]["budgets"] if b["flops"] / 1e6 <= budget_mflops]
choice = max(fits, key=lambda b: b["flops"])
print(f"budget {budget_mflops:.3f} MFLOPs -> {choice['budget']}: accuracy {choice['accuracy']:.4f}, ECE {choice['ece']:.4f}")"""),
    ("md", """## Swapping the ordering prior and the weight guide

The ordering prior is a constructor argument (any `OrderingDistribution`, per layer or shared);
the weight guide can be any Pyro guide composed with the ordering part through `AutoGuideList`
(`fit` then trains with the family's reference ELBO, Pyro's `TraceMeanField_ELBO`; `AutoNormal`
does not know the orderings, so every group's weight KL counts)."""),
    ("code", """import pyro
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from bayesdyn.guides import NestedGuide
from bayesdyn.models import NestedNet
from bayesdyn.nn import nested_mlp

net = nested_mlp(64 if SMOKE else 784, 10, hidden=(32, 32), input_shape=data.input_shape)
custom = NestedNet(net, 10, ordering_prior=TruncatedGeometric(0.8, 15),           # <- ordering prior
                   input_shape=data.input_shape)
guide = AutoGuideList(custom)
guide.append(NestedGuide(pyro.poutine.block(custom, expose_fn=lambda m: m["name"].startswith("order")),
                         weights=False, nested=custom))
guide.append(AutoNormal(pyro.poutine.block(custom, hide_fn=lambda m: m["name"].startswith("order"))))  # <- weight guide
h = fit(custom, guide, data, epochs=1, batch_size=256, lr=2e-3, progress=False)
print("objective:", h.objective, h.epochs[-1])"""),
    ("md", """## Swapping the weight prior

BNNN's weights have a sparsity prior of the variational-dropout family. `weight_prior=` takes
`"gaussian"` (the default, `N(0, prior_scale²)`), `"log-uniform"` (improper `p(w) ∝ 1/|w|`, KL by
Molchanov et al.'s approximation) or `"ard"` (a Gaussian whose per-weight variance is set to its
empirical-Bayes optimum), or your own `WeightPrior`. Sparsity priors push each weight's
noise-to-signal ratio `α = σ²/μ²` up; `weight_sparsity()` reports the fraction with `log α > 3`."""),
    ("code", """for prior in ("gaussian", "log-uniform"):
    torch.manual_seed(0)
    m, g = build(Recipe("nested", width=64 if SMOKE else 256, arch="mlp", weight_prior=prior),  # <- weight prior
                 data.input_shape, 10)
    h = fit(m, g, data, epochs=1 if SMOKE else 3, batch_size=128, lr=2e-3, progress=False)
    sparsity = {k: round(v, 3) for k, v in m.weight_sparsity().items()}
    print(f"{prior:<12} val accuracy {h.epochs[-1]['val_accuracy']:.4f}  noisy weights per layer {sparsity}")"""),
]

EXITS = [
    ("md", """# Early exits: one network for every budget, trained as a boosted ensemble

An *early-exit* network puts a classifier after each block. An easy input can stop at the first
exit; a hard one goes on. With `f_k(x)` the logits of exit `k`, this notebook compares two ways to
train the exits, both as Pyro models whose every exit is an observed site:

- **sum of cross-entropies** (`MultiExitNet`, MSDNet's training): exit `k` predicts
  `F_k = f_k` and the loss is `sum_k CE(y, F_k)`;
- **BoostNet** (`BoostedExits`): the exits form an additive model, `F_k = f_k + gamma F_{k-1}`
  (`gamma = 0.5`), and exit `k` is trained on `CE(y, f_k + sg(gamma F_{k-1}))`: with the
  stop-gradient `sg`, each head fits what the earlier exits left over, as in gradient boosting.
  BoostNet also rescales gradients between exits and later blocks (*gradient equilibrium*, GE).

We train both, look at every exit (anytime prediction), choose exits per input under a compute
budget (budgeted batch, MSDNet's protocol), run early exiting that really skips the work, look
at which images leave early, and ablate GE and the stop-gradient. `BAYESDYN_SMOKE=1` runs it on
the bundled 8x8 digits with a multi-exit MLP in about a minute; without it, it trains an MSDNet
on Fashion-MNIST (a GPU helps)."""),
    ("code", """import os, time
import torch
import matplotlib.pyplot as plt
import pyro

from bayesdyn.data import load
from bayesdyn.evaluation import apply_thresholds, evaluate, flat_curve, measure
from bayesdyn.guides import EmptyGuide
from bayesdyn.inference import exit_confidences, fit, fit_thresholds, predict_early_exit
from bayesdyn.models import BoostedExits, MultiExitNet
from bayesdyn.nn import msdnet, multiexit_mlp

SMOKE = os.environ.get("BAYESDYN_SMOKE") == "1"
DATASET = "digits" if SMOKE else "fashion-mnist"
EPOCHS = 3 if SMOKE else 10
data = load(DATASET)
data"""),
    ("md", """## The backbone: every exit from one forward pass

For 28x28 images the backbone is an MSDNet (multi-scale dense network, Huang et al.): feature maps
at three resolutions, dense connections, an exit after each block reading the coarsest map. On the
8x8 digits it is an MLP with an exit after every hidden layer. Either way `backbone(x)` returns the
logits of every exit, `[K, B, C]`, and the feature vector each exit's final `nn.Linear` reads
(what a Laplace approximation of the last layer needs). `measure` gives the FLOPs of each exit:
exit `k` pays for blocks and heads `1..k`."""),
    ("code", """def make_backbone(gradient_equilibrium):
    torch.manual_seed(0)  # the same initial weights for every model below
    if SMOKE:
        return multiexit_mlp(64, 10, width=64, exits=4, input_shape=data.input_shape,
                             gradient_equilibrium=gradient_equilibrium)
    return msdnet(1, 10, num_blocks=5, step=1, base=2, channels=8, growth_rate=4, head_channels=32,
                  gradient_equilibrium=gradient_equilibrium)

x, y = data.train.tensors
out = make_backbone(False)(x[:8])
print("logits of every exit:", tuple(out.logits.shape), " features:", [tuple(f.shape) for f in out.features])
baseline = MultiExitNet(make_backbone(False), 10, input_shape=data.input_shape)
for b in measure(baseline, data.input_shape):
    print(f"{b.name}: {b.flops / 1e6:.3f} MFLOPs, {b.params} parameters")"""),
    ("md", """## Pyro models with a fast path

Both families are Pyro models: every exit's prediction is an observed `Categorical(logits=F_k)`
site (`y_exit1`, `y_exit2`, ... and `y` for the last exit), and the weights are point estimates
(the empty guide). `fit` trains with a pure-tensor loss equal in value and gradient to Pyro's
`Trace_ELBO` on the model; check it on one batch:"""),
    ("code", """boosted = BoostedExits(make_backbone(True), 10, gamma=0.5, input_shape=data.input_shape)
trace = pyro.poutine.trace(boosted).get_trace(x[:64], y[:64])
print([name for name, site in trace.nodes.items() if site["type"] == "sample" and site["is_observed"]
       and not site["infer"].get("_deterministic")])
guide = EmptyGuide(boosted)
reference = pyro.infer.Trace_ELBO().differentiable_loss(boosted, guide, x[:64], y[:64], len(x))
fast, terms = boosted.fast_loss(guide, x[:64], y[:64], len(x))
print(f"Trace_ELBO {reference.item():.4f}   fast path {fast.item():.4f}")"""),
    ("md", """## Training both

The same backbone and initial weights; the baseline on the plain backbone (as MSDNet), BoostNet
with gradient equilibrium (as in its paper). SGD with momentum, learning rate divided by 10 at
half and three quarters of training (the papers' schedule, shortened)."""),
    ("code", """TRAIN = dict(epochs=EPOCHS, batch_size=64, lr=0.1 if not SMOKE else 0.05, optimizer="sgd",
             momentum=0.9, weight_decay=1e-4, schedule="multistep", progress=False)

def train(model):
    started = time.perf_counter()
    fit(model, EmptyGuide(model), data, **TRAIN)
    print(f"{type(model).__name__}: {time.perf_counter() - started:.0f} s")
    return model

models = {"sum of CE": train(MultiExitNet(make_backbone(False), 10, input_shape=data.input_shape)),
          "BoostNet": train(BoostedExits(make_backbone(True), 10, input_shape=data.input_shape))}"""),
    ("md", """## Every exit: anytime prediction

`evaluate` reports accuracy, NLL and ECE at each exit (its FLOPs include the earlier exits) and
the budgeted-batch curve: for 39 budget levels MSDNet's rule picks confidence thresholds on the
validation split so that a geometric share of inputs leaves at each exit, and the test inputs
exit at the first exit whose confidence passes its threshold."""),
    ("code", """results = {name: evaluate(m, EmptyGuide(m), data, ood=None, num_samples=1) for name, m in models.items()}
print(f"{'exit':<8}" + "".join(f"{name + ' acc':>16}{'NLL':>8}{'ECE':>8}" for name in results))
for k in range(len(results["BoostNet"]["budgets"])):
    print(f"{k + 1:<8}" + "".join(f"{r['budgets'][k]['accuracy']:>16.4f}{r['budgets'][k]['nll']:>8.4f}"
                                  f"{r['budgets'][k]['ece']:>8.4f}" for r in results.values()))
gain = [b["accuracy"] - a["accuracy"] for a, b in zip(results["sum of CE"]["budgets"], results["BoostNet"]["budgets"])]
print("BoostNet - sum of CE, accuracy points per exit:", [round(100 * g, 2) for g in gain])"""),
    ("code", """fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for ax, key in zip(axes, ["accuracy", "nll", "ece"]):
    for name, r in results.items():
        ax.plot([b["flops"] / 1e6 for b in r["budgets"]], [b[key] for b in r["budgets"]], "o-", label=f"{name}, anytime")
        bb = sorted(r["budgeted_batch"], key=lambda row: row["flops"])
        ax.plot([row["flops"] / 1e6 for row in bb], [row[key] for row in bb], "--", label=f"{name}, budgeted batch")
    ax.set_xlabel("MFLOPs per example"); ax.set_title(key); ax.grid(alpha=0.3)
axes[0].legend(fontsize=8);"""),
    ("md", """BoostNet's released evaluation scripts post-process the budgeted-batch curve with
`flat_curve`: a level whose *validation* accuracy does not improve on the best so far reports the
best level's test metrics at its own FLOPs. That makes the curve monotone by selecting on it, so
it is drawn separately here and never replaces the raw curve."""),
    ("code", """fig, ax = plt.subplots(figsize=(6, 4))
for name, r in results.items():
    for rows, style, label in ((r["budgeted_batch"], "-", "raw"), (flat_curve(r["budgeted_batch"]), ":", "flat_curve")):
        rows = sorted(rows, key=lambda row: row["flops"])
        ax.plot([row["flops"] / 1e6 for row in rows], [row["accuracy"] for row in rows], style, label=f"{name}, {label}")
ax.set_xlabel("MFLOPs per example"); ax.set_ylabel("test accuracy"); ax.legend(fontsize=8); ax.grid(alpha=0.3);"""),
    ("md", """## Early exiting that computes less

`predict_early_exit` runs a batch block by block and drops the inputs that leave, so later blocks
only see the inputs still running. It takes the thresholds of a budget level (fitted on the
validation split with MSDNet's rule) and applies the budgeted-batch protocol's rule, so each input
takes the same exit (up to floating-point differences between batch sizes, which the check below
counts); only the cost differs. Level 10 of 39 aims at about half of the inputs leaving at the
first exit. The FLOPs saved are what the exits taken imply; the wall-clock saving also depends on
the network: on one as small as the smoke test's MLP the bookkeeping of dropping inputs can cost
more than the skipped work, on an MSDNet the saving shows (`benchmarks/bench_exits.py`)."""),
    ("code", """model = models["BoostNet"]
x_val = data.val.tensors[0]
x_test, y_test = data.test.tensors
thresholds = fit_thresholds(model, x_val, level=10)
early = predict_early_exit(model, x_test, thresholds)
print("thresholds:", [round(t, 4) for t in thresholds.tolist()])
print("share of test inputs leaving at each exit:", [round(f, 3) for f in early.exit_fractions()])
print("accuracy:", (early.probs.argmax(-1) == y_test).float().mean().item())
same = early.exit_index == apply_thresholds(exit_confidences(model, x_test), thresholds)
print(f"same exit as the budgeted-batch protocol: {int(same.sum())} of {len(same)} test inputs")

def seconds(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter(); fn(); best = min(best, time.perf_counter() - started)
    return best

with torch.no_grad():
    full = seconds(lambda: model.predict_probs(EmptyGuide(model), x_test))
    dynamic = seconds(lambda: predict_early_exit(model, x_test, thresholds))
exit_flops = torch.tensor([b["flops"] for b in results["BoostNet"]["budgets"]], dtype=torch.float64)
print(f"FLOPs per input: full network {exit_flops[-1] / 1e6:.3f} M, early exit {exit_flops[early.exit_index].mean() / 1e6:.3f} M")
print(f"wall clock: full network {1e3 * full:.1f} ms, early exit {1e3 * dynamic:.1f} ms on {len(x_test)} test inputs")"""),
    ("md", """## Which inputs leave where

The test images that left at the first exit with the highest confidence, and those that went on
to the last exit with the lowest first-exit confidence: the first row are the easy ones, the
second the ones the first exit was least sure about. Titles give the label and the prediction."""),
    ("code", """first_conf = exit_confidences(model, x_test)[0]
left_first = (early.exit_index == 0).nonzero().squeeze(1)
went_last = (early.exit_index == model.num_exits - 1).nonzero().squeeze(1)
easy = left_first[first_conf[left_first].argsort(descending=True)[:8]]
hard = went_last[first_conf[went_last].argsort()[:8]]
fig, axes = plt.subplots(2, 8, figsize=(14, 4))
for row, (indices, label) in enumerate([(easy, "exit 1"), (hard, f"exit {model.num_exits}")]):
    for ax, i in zip(axes[row], indices.tolist()):
        ax.imshow(x_test[i, 0], cmap="gray"); ax.axis("off")
        ax.set_title(f"{label}: y={y_test[i].item()} p={early.probs[i].argmax().item()}", fontsize=8)
for ax in axes.flat[len(easy):8]:
    ax.axis("off")
plt.tight_layout()"""),
    ("md", """## Ablations: gradient equilibrium and the stop-gradient

BoostNet's paper compares against a plain MSDNet, but BoostNet itself runs on the
gradient-equilibrium backbone, so part of a difference could come from GE (methods.md §3.8).
Both parts are switches: `gradient_equilibrium=` on the backbone, `stop_gradient=` on the
family. Same initial weights and training for each. `benchmarks/repro_exits.py` runs the same
comparison over several seeds; one seed here says little about small differences."""),
    ("code", """ablations = {
    "sum of CE + GE": MultiExitNet(make_backbone(True), 10, input_shape=data.input_shape),
    "BoostNet - GE": BoostedExits(make_backbone(False), 10, input_shape=data.input_shape),
    "BoostNet - stop-grad": BoostedExits(make_backbone(True), 10, stop_gradient=False, input_shape=data.input_shape),
}
for name, m in ablations.items():
    train(m)
    results[name] = evaluate(m, EmptyGuide(m), data, ood=None, num_samples=1)
print(f"{'variant':<22}" + "".join(f"exit {k + 1:>2}  " for k in range(model.num_exits)))
for name, r in results.items():
    print(f"{name:<22}" + "".join(f"{b['accuracy']:>9.4f}" for b in r["budgets"]))"""),
    ("md", """## Next

The heads here are point estimates, and a sum of logits can become overconfident at deep exits.
The features each exit's last layer reads (`backbone(x).features`) are what a last-layer Laplace
approximation per exit needs; that, and averaging exits' predictive distributions, is the
Bayesian part of the exits family."""),
]


def build(cells, path):
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


if __name__ == "__main__":
    build(DEPTH, HERE / "depth.ipynb")
    build(NESTED, HERE / "nested.ipynb")
    build(EXITS, HERE / "exits.ipynb")
