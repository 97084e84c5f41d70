# %% [markdown]
# # Structured ensembles: several small networks cut out of one untrained network
#
# A deep ensemble trains `M` full networks. *Structured ensembles* (Pomponi, Scardapane and
# Uncini, 2021) instead cut `M` different sub-networks out of **one untrained** network and train
# those: each member keeps only part of every layer's channels, so the ensemble has far fewer
# parameters. The procedure:
#
# 1. **mask stage** - the untrained weights stay frozen; every member `m` gets a trainable scale
#    `s_{l,m}` per channel of every layer. A batch is cut into `M` chunks, member `m` sees chunk
#    `m`, and the loss is `CE + w / (sum_l sum_{m<m'} MMD(s_{l,m}, s_{l,m'}))`: the second term
#    pushes the members' masks apart, so they pick different channels;
# 2. **importance** - the mean of `|dL/ds|` over the training batches;
# 3. **pruning** - each member drops the fraction `q` of its least important channels (globally,
#    one ranking over all layers, or per layer);
# 4. **extraction** - each member becomes a smaller dense network with the *initial* weights of
#    the channels it kept, and all members are trained together.
#
# In bayesdyn the member is a latent variable, `m ~ Categorical(1/M, ..., 1/M)`, and the
# predictive averages the members (`StructuredEnsemble`; `DeepEnsemble` is the baseline). Budget
# `k` runs the first `k` members. At the end, the same machinery learns tasks one after another
# without forgetting (continual learning). `BAYESDYN_SMOKE=1` runs everything on the bundled 8x8
# digits in about a minute; without it, it uses Fashion-MNIST.

# %%
import os
import matplotlib.pyplot as plt
import torch

from bayesdyn.data import load
from bayesdyn.evaluation import evaluate
from bayesdyn.inference import fit
from bayesdyn.inference.continual import run_continual, split_tasks
from bayesdyn.inference.subnets import structured_subnetworks
from bayesdyn.models import DeepEnsemble, StructuredEnsemble
from bayesdyn.nn.members import PlainSpec, StackedNet, to_sequential

torch.set_num_threads(1)
SMOKE = os.environ.get("BAYESDYN_SMOKE") == "1"
DATASET = "digits" if SMOKE else "fashion-mnist"
EPOCHS, MASK_EPOCHS, WIDTH = (3, 1, 32) if SMOKE else (10, 5, 256)
data = load(DATASET)
x, y = data.train.tensors
data

# %% [markdown]
# ## One untrained network, three sub-networks
#
# The network is a plain MLP: `WIDTH` channels per hidden layer, BatchNorm, ReLU, a linear
# classifier. `structured_subnetworks` runs stages 1-4 and returns the extracted members with a
# report (mask scales, importances, kept channels).

# %%
torch.manual_seed(0)
spec = PlainSpec(data.input_shape, (WIDTH, WIDTH), data.num_classes)
base = StackedNet(spec, 1)
members, report = structured_subnetworks(base, x, y, members=3, q=0.5, scope="global",
                                         mask_epochs=MASK_EPOCHS, divergence_weight=0.01)
for m, net in enumerate(members):
    print(f"member {m + 1}: widths {net.spec.widths}, "
          f"{sum(p.numel() for p in net.parameters()):,} parameters")
print(f"the full network: {sum(p.numel() for p in base.parameters()):,} parameters")

# %% [markdown]
# ### Which channels each member kept
#
# Left: for every layer, the share of channels two members have in common (1 on the diagonal).
# Global pruning at `q = 0.5` keeps half of all channels of a member, not half of each layer.
# Right: each member's channel importances in the first layer, sorted.

# %%
fig, axes = plt.subplots(1, len(spec.widths) + 1, figsize=(4 * (len(spec.widths) + 1), 3.2))
for layer, width in enumerate(spec.widths):
    keep = torch.zeros(3, width)
    for m in range(3):
        keep[m, report["kept"][m][layer]] = 1
    overlap = (keep @ keep.T) / keep.sum(1, keepdim=True).clamp_min(1)
    image = axes[layer].imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    axes[layer].set(title=f"layer {layer + 1}: shared channels", xticks=range(3), yticks=range(3),
                    xticklabels=[1, 2, 3], yticklabels=[1, 2, 3])
    for i in range(3):
        for j in range(3):
            axes[layer].text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", color="w")
for m in range(3):
    axes[-1].plot(report["importances"][0][m].sort(descending=True).values, label=f"member {m + 1}")
axes[-1].set(title="importance |dL/ds|, layer 1", xlabel="channel (sorted)", yscale="log")
axes[-1].legend()
fig.colorbar(image, ax=axes[:-1])
plt.show()

# %% [markdown]
# ## Training the members together, and the baselines
#
# All members train in one loop with one optimiser (`fit`), each on every example. Members of
# equal widths run in one batched pass. The baselines are one full network and a deep ensemble
# of three full networks, trained the same way.

# %%
def train(model):
    fit(model, model.default_guide(), data, epochs=EPOCHS, batch_size=128, lr=1e-3,
        early_stopping=3, progress=False)
    return evaluate(model, model.default_guide(), data, ood=None, num_samples=1)

torch.manual_seed(0)
results = {
    "structured ensemble": train(StructuredEnsemble(members)),
    "deep ensemble": train(DeepEnsemble([to_sequential(StackedNet(spec, 1)) for _ in range(3)])),
    "single network": train(DeepEnsemble([to_sequential(StackedNet(spec, 1))])),
}
for name, metrics in results.items():
    m = metrics["marginal"]
    print(f"{name:20s} accuracy {m['accuracy']:.4f}  NLL {m['nll']:.4f}  ECE {m['ece']:.4f}  "
          f"parameters {m['params']:,}")

# %% [markdown]
# ### Accuracy, NLL and calibration against parameters, member by member
#
# Each point is a budget: the first `k` members. The structured ensemble's points sit to the left
# of the deep ensemble's at equal `k`: its members are smaller.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
for name, metrics in results.items():
    rows = metrics["budgets"]
    for ax, key in zip(axes, ("accuracy", "nll", "ece")):
        ax.plot([r["params"] for r in rows], [r[key] for r in rows], "o-", label=name)
        for k, r in enumerate(rows, start=1):
            ax.annotate(str(k), (r["params"], r[key]), textcoords="offset points", xytext=(3, 3))
for ax, key in zip(axes, ("accuracy", "NLL", "ECE (15 bins)")):
    ax.set(xlabel="parameters", ylabel=key, xscale="log")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Continual learning: new tasks on free channels
#
# The dataset is cut into five tasks of two classes, learned one after another, each with its own
# head. For task `t`, the mask stage and the importances pick half of the channels that no earlier
# task owns; task `t`'s network also uses every earlier task's channels, whose weights stay frozen.
# Earlier tasks therefore cannot be forgotten, and the memory grows more slowly than one network
# per task. Fine-tuning one shared network is the forgetting baseline. Row `i` of each matrix is
# the test accuracy on every task after learning task `i`.

# %%
tasks = split_tasks(data)
cl_spec = PlainSpec(data.input_shape, (WIDTH, WIDTH), 2, batch_norm=False)
continual = {method: run_continual(tasks, cl_spec, method, epochs=EPOCHS, mask_epochs=1)
             for method in ("subnets", "finetune", "separate")}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, (method, result) in zip(axes, continual.items()):
    matrix = torch.tensor(result["accuracy_matrix"])
    ax.imshow(matrix, vmin=0.5, vmax=1, cmap="magma")
    for i in range(len(matrix)):
        for j in range(i + 1):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="c", fontsize=8)
    ax.set(title=f"{method}: avg {result['average_accuracy']:.3f}, "
                 f"BWT {result['backward_transfer']:+.3f}",
           xlabel="task", ylabel="after learning task")
plt.tight_layout()
plt.show()
for method, result in continual.items():
    print(f"{method:9s} parameters after each task: {result['parameters']}")
