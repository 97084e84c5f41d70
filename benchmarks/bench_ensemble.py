"""Speed of the ensemble family (issue 15), ratios measured in one run:

1. one training step (forward, loss, backward, Adam update) of M = 4 equal-shape members:
   ``4 separate steps`` (four ``nn.Sequential`` networks, one step each, the baseline) vs
   ``vmap`` (``DeepEnsemble``: ``torch.func.stack_module_state`` + ``vmap``) vs ``stacked``
   (``StackedNet``: one batched matmul per linear layer, one grouped convolution per conv
   layer), the last two through ``fit``'s fast loss and one optimiser; target <= 0.7x;
2. the structured ensemble's predictive costs its members' FLOPs (measured with
   ``FlopCounterMode`` on the whole predictive and on each member alone), and its wall time
   next to the deep ensemble's.

    OMP_NUM_THREADS=1 python benchmarks/bench_ensemble.py --threads 1
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import append_results, header, report, time_variants

from bayesdyn.evaluation import measure
from bayesdyn.inference.subnets import prune
from bayesdyn.models import DeepEnsemble, StructuredEnsemble
from bayesdyn.nn.members import PlainSpec, StackedNet, extract, member_of, to_sequential

SHAPES = {
    "digits MLP 64-64-64, batch 64": (PlainSpec((1, 8, 8), (64, 64), 10), 64),
    "MLP 784-256-256, batch 128": (PlainSpec((1, 28, 28), (256, 256), 10), 128),
    "MLP 784-256-256, batch 512": (PlainSpec((1, 28, 28), (256, 256), 10), 512),
    "conv 16-M-32 (8x8 digits), batch 64": (PlainSpec((1, 8, 8), (16, "M", 32), 10, conv=True),
                                            64),
    "conv 32-M-64-M (28x28), batch 128": (PlainSpec((1, 28, 28), (32, "M", 64, "M"), 10,
                                                     conv=True), 128),
}
MEMBERS = 4


def step_fn(params, loss_fn):
    opt = torch.optim.Adam(params, lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def training_step(args, title, spec, batch):
    torch.manual_seed(0)
    x, y = torch.randn(batch, *spec.input_shape), torch.randint(0, 10, (batch,))
    nets = [to_sequential(StackedNet(spec, 1)) for _ in range(MEMBERS)]
    separate = [step_fn(n.parameters(), lambda n=n: F.cross_entropy(n(x), y)) for n in nets]
    deep = DeepEnsemble([to_sequential(StackedNet(spec, 1)) for _ in range(MEMBERS)]).train()
    guide = deep.default_guide()
    stacked = StructuredEnsemble([StackedNet(spec, MEMBERS)]).train()
    variants = {
        f"{MEMBERS} separate steps": lambda: [s() for s in separate],
        "vmap (DeepEnsemble)": step_fn(deep.parameters(),
                                       lambda: deep.fast_loss(guide, x, y, batch)[0] / batch),
        "stacked (batched matmul / grouped conv)": step_fn(
            stacked.parameters(), lambda: stacked.fast_loss(guide, x, y, batch)[0] / batch),
    }
    times = time_variants(variants, torch.device("cpu"), steps=args.steps, rounds=args.rounds)
    base = times[f"{MEMBERS} separate steps"]
    return report(f"ensemble: training step of {MEMBERS} members, {title}",
                  [(n, t, None) for n, t in times.items()], f"{MEMBERS} separate steps",
                  torch.device("cpu"),
                  checks=[("vmap / separate", times["vmap (DeepEnsemble)"] / base, 0.7),
                          ("stacked / separate",
                           times["stacked (batched matmul / grouped conv)"] / base, 0.7)],
                  notes=f"Median of {args.rounds} interleaved rounds of {args.steps} steps; every "
                        "variant does forward, cross-entropy, backward and an Adam update of all "
                        f"{MEMBERS} members.")


def predictive_cost(args):
    spec = PlainSpec((1, 28, 28), (256, 256), 10)
    torch.manual_seed(0)
    base = StackedNet(spec, 1)
    g = torch.Generator().manual_seed(0)
    members = [extract(base, prune([torch.rand(w, generator=g) for w in spec.widths], 0.5))
               for _ in range(3)]
    structured = StructuredEnsemble(members).eval()
    deep = DeepEnsemble([to_sequential(StackedNet(spec, 1)) for _ in range(3)]).eval()
    budgets = measure(structured, spec.input_shape)
    alone = [measure(StructuredEnsemble([member_of(grp, j)]), spec.input_shape)[0].flops
             for grp in structured.groups for j in range(grp.members)]
    deep_flops = measure(deep, spec.input_shape)[-1].flops
    x = torch.randn(1024, *spec.input_shape)
    times = time_variants({"structured": lambda: structured.predict_probs(None, x).mean(),
                           "deep": lambda: deep.predict_probs(None, x).mean()},
                          torch.device("cpu"), steps=args.steps, rounds=args.rounds)
    lines = [*header("ensemble: predictive cost, 3 members of MLP 784-256-256 (q = 0.5, global "
                     "pruning on random importances)", torch.device("cpu")), "",
             "| | structured ensemble | deep ensemble |", "|---|---|---|",
             f"| forward FLOPs per example, whole predictive | {budgets[-1].flops:,} | "
             f"{deep_flops:,} |",
             f"| sum of the members' FLOPs, each measured alone | {sum(alone):,} | - |",
             f"| parameters | {budgets[-1].params:,} | {measure(deep, spec.input_shape)[-1].params:,} |",
             f"| ms per batch of 1024 | {1e3 * times['structured']:.2f} | "
             f"{1e3 * times['deep']:.2f} |", "",
             f"Budget k (first k members) FLOPs: {[b.flops for b in budgets]}; members alone: "
             f"{alone}. The members of a global pruning have their own widths, so the structured "
             "ensemble runs one pass per member."]
    return append_results(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for title, (spec, batch) in SHAPES.items():
        training_step(args, title, spec, batch)
    predictive_cost(args)


if __name__ == "__main__":
    main()
