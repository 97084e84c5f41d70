# %% [markdown]
# # One budget interface: "I have X MFLOPs per image — which model, which budget?"
#
# Every bayesdyn family is a network whose structure is a random variable: how deep (depth),
# how wide (nested), where to stop (exits), which sub-networks of an ensemble to run
# (ensemble). Each family therefore offers *several predictors*
# from one trained model, one per **budget**, and each budget has a measured cost. The calls are
# the same for every family:
#
# - `model.budgets(guide)` lists the budgets (a depth, a width, an exit, ...);
# - `bayesdyn.evaluation.measure(model, input_shape, guide)` adds each budget's FLOPs and
#   parameters (the FLOPs of the predictive that is actually run, Monte Carlo draws included);
# - `predict(model, guide, x, budget=b)` gives the predictive distribution at that budget
#   (`budget=None`: averaged over the structure posterior).
#
# This notebook trains the families on one dataset, puts every budget of every family on one
# accuracy-vs-FLOPs plot, draws the Pareto front and reads the answer to the title's question
# off it. It ends with the structure posteriors side by side.
#
# `BAYESDYN_SMOKE=1` runs it on the bundled 8x8 digits in a minute or two; without it, on
# Fashion-MNIST. `benchmarks/compare_families.py` runs the same comparison with backbones of
# matched cost and several seeds.

# %%
import os

import matplotlib.pyplot as plt
import torch

from bayesdyn import recipes
from bayesdyn.data import load
from bayesdyn.evaluation import accuracy, ece, measure, nll, pareto_front, plots
from bayesdyn.inference import fit, fit_thresholds, predict, predict_early_exit

SMOKE = os.environ.get("BAYESDYN_SMOKE") == "1"
data = load("digits" if SMOKE else "fashion-mnist")
EPOCHS = 6 if SMOKE else 10
WIDTH = 64 if SMOKE else 128
SAMPLES = 8  # Monte Carlo draws per input where the predictive samples
x_test, y_test = data.test.tensors
print(data.name, "train / val / test:", len(data.train), len(data.val), len(data.test))

# %% [markdown]
# ## Train one model per family
#
# `recipes.build` makes the same networks as the `bayesdyn` command line: fully connected
# backbones here, so that it runs on a laptop. Each family gets its own guide (a categorical
# q(depth), an ordering posterior per layer, or nothing to infer for the exit networks and the
# ensemble members, whose structure is chosen at prediction time), and `fit` trains every one
# with the same loop. For the structured ensemble, `fit` first runs the mask stage that cuts
# three small members out of one untrained network.

# %%
FAMILIES = ["deterministic", "depth", "nested", "exits", "boosted-exits", "structured-ensemble"]
trained = {}
for method in FAMILIES:
    torch.manual_seed(0)
    model, guide = recipes.build(recipes.Recipe(method, arch="mlp", width=WIDTH),
                                 data.input_shape, data.num_classes)
    history = fit(model, guide, data, epochs=EPOCHS, batch_size=128, lr=3e-3, progress=False)
    model.prepare_evaluation(data.train, guide)  # e.g. BatchNorm statistics per width
    trained[method] = (model, guide)
    print(f"{method:<14} {len(model.budgets(guide)):>2} budgets, "
          f"trained in {sum(e['seconds'] for e in history.epochs):.0f} s")

# %% [markdown]
# ## Every budget of every family, with the same three calls

# %%
rows = []
for method, (model, guide) in trained.items():
    for budget in measure(model, data.input_shape, guide, num_samples=SAMPLES):
        pred = predict(model, guide, x_test, budget=budget, num_samples=SAMPLES)
        rows.append({"family": method, "budget": budget.name, "flops": budget.flops,
                     "params": budget.params, "cumulative": budget.info["cumulative_flops"],
                     "accuracy": accuracy(pred.mean, y_test),
                     "nll": nll(pred.mean, y_test), "ece": ece(pred.mean, y_test)})

print(f"{'family':<20} {'budget':<12} {'kFLOPs':>9} {'params':>8} {'acc':>7} {'NLL':>7} {'ECE':>7}")
for r in rows:
    print(f"{r['family']:<20} {r['budget']:<12} {r['flops'] / 1e3:>9.1f} {r['params']:>8} "
          f"{r['accuracy']:>7.4f} {r['nll']:>7.4f} {r['ece']:>7.4f}")

# %% [markdown]
# ## The Pareto front
#
# A predictor is on the front when no other predictor is at least as cheap *and* at least as
# good. `pareto_front(rows, metric)` returns those rows, cheapest first. The black staircase is
# the best accuracy (left) or NLL (right) money can buy at each cost.

# %%
by_family = {m: [r for r in rows if r["family"] == m] for m in trained}
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
for ax, metric in zip(axes, ("accuracy", "nll"), strict=True):
    plots.metric_vs_flops(by_family, metric, ax=ax, front=pareto_front(rows, metric))
    ax.set_xscale("log")
plt.show()

# %% [markdown]
# ## The answer: the best predictor within X FLOPs
#
# Walk the front from the cheap end and keep the last predictor that fits the budget.

# %%
def best_within(max_flops, metric="accuracy"):
    """The front's best predictor that costs at most ``max_flops`` per input (None: none fits)."""
    affordable = [r for r in pareto_front(rows, metric) if r["flops"] <= max_flops]
    return affordable[-1] if affordable else None


cheapest, dearest = min(r["flops"] for r in rows), max(r["flops"] for r in rows)
for fraction in (0.0, 0.05, 0.2, 1.0):
    limit = cheapest + fraction * (dearest - cheapest)
    best = best_within(limit)
    print(f"at most {limit / 1e3:8.1f} kFLOPs: {best['family']} / {best['budget']} "
          f"({best['flops'] / 1e3:.1f} kFLOPs, accuracy {best['accuracy']:.4f})")

# %% [markdown]
# The answer depends on the metric: the cheapest predictor with the best *NLL* (calibrated
# probabilities) need not be the one with the best accuracy.

# %%
limit = cheapest + 0.2 * (dearest - cheapest)
for metric in ("accuracy", "nll"):
    best = best_within(limit, metric)
    print(f"best {metric:<8} within {limit / 1e3:.1f} kFLOPs: {best['family']} / {best['budget']}"
          f" ({metric} {best[metric]:.4f})")

# %% [markdown]
# ## Exits: a budget per input, not per model
#
# An exit network can also let each input decide: it stops at the first exit whose confidence
# passes that exit's threshold. `fit_thresholds` picks the thresholds on validation inputs for a
# target spending level (MSDNet's rule), and `predict_early_exit` computes only the blocks each
# input needs. The average cost then sits between the exits' costs.

# %%
model, guide = trained["boosted-exits"]
exit_costs = [r["cumulative"] for r in by_family["boosted-exits"]]
x_val = data.val.tensors[0]
for level in (5, 20, 35):
    out = predict_early_exit(model, x_test, fit_thresholds(model, x_val, level=level))
    mean_cost = sum(f * c for f, c in zip(out.exit_fractions(), exit_costs, strict=True))
    print(f"level {level:>2}: exits taken {[round(f, 2) for f in out.exit_fractions()]}, "
          f"about {mean_cost / 1e3:.1f} kFLOPs per input, accuracy {accuracy(out.probs, y_test):.4f}")

# %% [markdown]
# (`mean_cost` charges each input the cost of everything computed until it leaves: the blocks
# and every exit head up to its exit, which `measure` reports as `info["cumulative_flops"]`.)
#
# ## The structure posteriors side by side
#
# What each family learned about its own structure: q(depth) for the depth network, q(number of
# unit groups kept) for each layer of the nested network (against its prior), where inputs
# leave the boosted exit network under the middle threshold policy, and how many units of each
# layer every member of the structured ensemble kept.

# %%
depth_post = trained["depth"][0].structure_posterior(trained["depth"][1])
nested_post = trained["nested"][0].structure_posterior(trained["nested"][1])
layers = [k for k in nested_post if not k.endswith(" prior")]
fig, axes = plt.subplots(1, 3 + len(layers), figsize=(4 * (3 + len(layers)), 3.2))
axes[0].bar(range(len(depth_post["depth"])), depth_post["depth"].tolist(), label="q(d)")
axes[0].plot(depth_post["depth prior"].tolist(), "k.", label="prior")
axes[0].set(title="depth: q(d)", xlabel="depth d")
for ax, name in zip(axes[1:], layers, strict=False):
    ax.bar(range(len(nested_post[name])), nested_post[name].tolist(), label="q(z)")
    ax.plot(nested_post[f"{name} prior"].tolist(), "k.", label="prior")
    ax.set(title=f"nested: {name}", xlabel="unit groups kept")
out = predict_early_exit(model, x_test, fit_thresholds(model, x_val, level=20))
axes[-2].bar(range(1, len(exit_costs) + 1), out.exit_fractions())
axes[-2].set(title="boosted exits: where inputs leave", xlabel="exit")
ensemble = trained["structured-ensemble"][0]
for row in ensemble.structure.tolist():  # one row per group of equal-width members
    members, widths = row[0], row[1:]
    axes[-1].plot(range(1, len(widths) + 1), widths, "o-", label=f"{members} member(s)")
axes[-1].axhline(WIDTH, color="k", ls=":", label="unpruned")
axes[-1].set(title="structured ensemble: units kept", xlabel="layer", ylim=(0, WIDTH * 1.1))
axes[-1].legend(fontsize=7)
axes[0].legend()
plt.tight_layout()
plt.show()
