"""Speed of the exits family (issue 13), ratios measured in one run on one MSDNet:

1. training step: BoostNet's loss vs the sum of cross-entropies, same backbone (with and
   without gradient equilibrium), both through ``fit``'s fast path; target BoostNet <= 1.05x;
2. inference: every exit from one forward pass vs each exit's network run on its own;
3. early exiting (``predict_early_exit``) at the budget level where half the inputs leave at the
   first exit vs the full network's prediction; target <= 0.6x at batch 256 on the CPU.

The backbone is BoostNet's budgeted-batch CIFAR MSDNet (6 blocks, even, step 2, base 4,
nChannels 16, growthRate 6) on 28x28 one-channel inputs, untrained: timing depends only on how
many inputs leave where, which the thresholds (MSDNet's rule on a synthetic validation batch) fix.

    OMP_NUM_THREADS=1 python benchmarks/bench_exits.py --threads 1
"""

from __future__ import annotations

import argparse
import math

import torch
from common import report, synthetic_splits, time_variants

from bayesdyn.evaluation import exit_proportions
from bayesdyn.inference import FitConfig, fit_thresholds, predict_early_exit, resolve_device
from bayesdyn.inference.fit import Trainer
from bayesdyn.models import BoostedExits, MultiExitNet
from bayesdyn.nn import MSDNET_CIFAR, msdnet

N = 60_000
SHAPE = (1, 28, 28)


def make(family, ge, **kw):
    torch.manual_seed(0)
    net = msdnet(1, 10, **MSDNET_CIFAR["boostnet-budgeted"], gradient_equilibrium=ge)
    return family(net, 10, input_shape=SHAPE, **kw)


def training_steps(args, device):
    data, x, y = synthetic_splits(args.batch * 4, SHAPE)
    xb, yb = x[: args.batch].to(device), y[: args.batch].to(device)
    variants = {}
    for ge in (False, True):
        for label, family in (("sum of CE", MultiExitNet), ("BoostNet", BoostedExits)):
            model = make(family, ge)
            trainer = Trainer(model, model.default_guide(), data, None,
                              FitConfig(batch_size=args.batch, optimizer="sgd", lr=0.1), device,
                              None, False)
            step = lambda t=trainer: t._step(t.loss_fn(xb, yb)[0] / N)  # noqa: E731
            variants[f"{label}{', GE' if ge else ''}"] = step
    times = time_variants(variants, device, steps=args.steps, rounds=args.rounds)
    rows = [(name, t, None) for name, t in times.items()]
    report(f"exits: training step, MSDNet (boostnet-budgeted, 28x28), batch {args.batch}", rows,
           baseline="sum of CE", device=device,
           checks=[("BoostNet / sum of CE", times["BoostNet"] / times["sum of CE"], 1.05),
                   ("BoostNet, GE / sum of CE, GE", times["BoostNet, GE"] / times["sum of CE, GE"],
                    1.05)],
           notes=f"One SGD step through fit's fast path (forward, loss, backward, update); median "
                 f"of {args.rounds} interleaved rounds of {args.steps} steps.")


def inference(args, device):
    model = make(BoostedExits, True).to(device).eval()
    guide = model.default_guide()
    g = torch.Generator().manual_seed(1)
    x_val = torch.randn(args.eval_batch * 4, *SHAPE, generator=g).to(device)
    x = torch.randn(args.eval_batch, *SHAPE, generator=g).to(device)
    k = model.num_exits
    share = [float(exit_proportions(level, k)[0]) for level in range(1, 40)]
    level = min(range(1, 40), key=lambda lv: abs(share[lv - 1] - 0.5))
    msdnet_rule = fit_thresholds(model, x_val, level)
    first = torch.softmax(model.exit_logits(x_val, 0)[0], -1).max(-1).values.median().item()
    rest_to_end = torch.tensor([first] + [math.inf] * (k - 2) + [-math.inf])
    fractions = {name: predict_early_exit(model, x, t).exit_fractions()
                 for name, t in (("rule", msdnet_rule), ("end", rest_to_end))}
    truncated = [model.backbone.truncated(j) for j in range(k)]
    variants = {
        "full network (last exit's prediction)": lambda: model.predict_probs(guide, x),
        "every exit, one pass": lambda: model.exit_logits(x),
        "every exit, each network alone": lambda: [net(x) for net in truncated],
        f"early exit, MSDNet level {level}": lambda: predict_early_exit(model, x, msdnet_rule),
        "early exit, half at exit 1, rest at the last": lambda: predict_early_exit(model, x,
                                                                                   rest_to_end),
    }
    with torch.no_grad():
        times = time_variants(variants, device, steps=args.steps, rounds=args.rounds)
    rows = [(name, t, None) for name, t in times.items()]
    full = times["full network (last exit's prediction)"]
    fmt = lambda f: ", ".join(f"{v:.2f}" for v in f)  # noqa: E731
    report(f"exits: inference, MSDNet (boostnet-budgeted, 28x28), batch {args.eval_batch}", rows,
           baseline="full network (last exit's prediction)", device=device,
           checks=[(f"early exit (level {level}) / full network",
                    times[f"early exit, MSDNet level {level}"] / full, 0.6),
                   ("every exit in one pass / each network alone",
                    times["every exit, one pass"] / times["every exit, each network alone"], 0.5)],
           notes=f"Exit shares on the timed batch: MSDNet level {level} [{fmt(fractions['rule'])}]"
                 f"; half-then-last [{fmt(fractions['end'])}]. Untrained network, synthetic "
                 f"inputs (thresholds from {len(x_val)} synthetic validation inputs); median of "
                 f"{args.rounds} interleaved rounds of {args.steps} calls.")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    training_steps(args, device)
    inference(args, device)


if __name__ == "__main__":
    main()
