"""Speed of the post-hoc exits Laplace (issue 14), ratios measured in one run on one device:

1. K-FAC fit of one head (N = 60k random features, D = 512, C = 10, float32): ours (the two
   closed-form factors and their eigendecompositions) vs laplace-torch 0.3's last-layer ``kron``
   fit (default curvlinops backend) on the same head and features; target >= 5x on CPU;
2. ``kron`` fit on every exit of an MSDNet (repro_exits.py's layout, random 28x28 inputs): the
   one feature-caching pass plus the fits vs one inference epoch over the same inputs; <= 1.2x;
3. probit predictive of every exit vs the plain forward pass of every exit on the test-size
   inputs; <= 1.3x.
Also printed: the evidence-maximising prior precision and laplace-torch's default
``optimize_prior_precision`` (100 Adam steps) on the same head.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_exit_laplace.py --threads 1
"""

from __future__ import annotations

import argparse
import time
import warnings
from types import SimpleNamespace

import torch
from common import append_results, header
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayesdyn.inference.exit_laplace import ExitCalibration, exit_features, fit_heads
from bayesdyn.inference.lastlayer import HeadLaplace


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def one_head(args):
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(args.n, args.d, generator=g).relu()  # post-ReLU features, as a pooled layer
    head = nn.Linear(args.d, args.c)
    y = (phi @ torch.randn(args.d, args.c, generator=g) / 20).argmax(-1)
    ours = best_of(lambda: HeadLaplace.fit(head, phi, y, "kron", batch_size=args.n), args.rounds)
    from laplace import Laplace

    def reference():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = Laplace(nn.Sequential(nn.Identity(), head), "classification",
                         subset_of_weights="last_layer", hessian_structure="kron",
                         last_layer_name="1")
            la.fit(DataLoader(TensorDataset(phi, y), batch_size=args.ref_batch))
            la.posterior_precision  # noqa: B018 (decomposes the factors, as ours does)
        return la

    theirs = best_of(reference, max(1, args.rounds // 2))
    mine = HeadLaplace.fit(head, phi, y, "kron", batch_size=args.n)
    exact = mine.optimal_prior_precision()
    la = reference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la.optimize_prior_precision(method="marglik")
    lt_prior = float(la.prior_precision)
    evidence = lambda d: float(mine.log_marginal_likelihood(d))  # noqa: E731
    return ours, theirs, exact, lt_prior, evidence(exact), evidence(lt_prior)


def multi_exit(args):
    from repro_exits import build

    data = SimpleNamespace(input_shape=(1, 28, 28), num_classes=10)
    keys = dict(blocks=5, step=1, base=2, channels=8, growth_rate=4, head_channels=32, gamma=0.5)
    model = build(SimpleNamespace(**keys), data, "MSDNet").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.train_size, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.train_size,), generator=g)
    x_test = x[: args.test_size]

    @torch.no_grad()
    def inference_epoch(inputs):
        for xb in inputs.split(args.batch):
            model.exit_logits(xb)

    def fit_all():
        feats = exit_features(model, x, args.batch)
        return fit_heads(model, feats, y, "kron")

    heads = fit_all()
    cal = ExitCalibration(model, heads)

    @torch.no_grad()
    def probit_all():
        for xb in x_test.split(args.batch):
            cal.probs(exit_features(model, xb, args.batch))

    epoch = best_of(lambda: inference_epoch(x), args.rounds)
    fit_time = best_of(fit_all, args.rounds)
    plain = best_of(lambda: inference_epoch(x_test), args.rounds)
    probit = best_of(probit_all, args.rounds)
    return epoch, fit_time, plain, probit


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=60000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--c", type=int, default=10)
    p.add_argument("--ref-batch", type=int, default=1024, help="laplace-torch's DataLoader batch")
    p.add_argument("--train-size", type=int, default=12000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs, exact, lt_prior, ev_exact, ev_lt = one_head(args)
    epoch, fit_time, plain, probit = multi_exit(args)
    checks = [(f"kron fit of one head, laplace-torch / ours (N={args.n}, D={args.d}, "
               f"C={args.c})", theirs / ours, ">= 5"),
              (f"kron fit on all 5 MSDNet exits / one inference epoch ({args.train_size} "
               "inputs)", fit_time / epoch, "<= 1.2"),
              (f"probit of all exits / plain forward of all exits ({args.test_size} inputs)",
               probit / plain, "<= 1.3")]
    lines = [*header("exits Laplace: speed (issue 14)", torch.device("cpu")),
             f"- threads: {args.threads}; best of {args.rounds} rounds; machine shared with "
             "other jobs (2 cores)", "",
             "| quantity | seconds |", "|---|---|",
             f"| ours: kron fit of one head (factors + eigendecompositions) | {ours:.3f} |",
             f"| laplace-torch 0.3: kron last-layer fit, same head | {theirs:.3f} |",
             f"| MSDNet: one inference epoch over {args.train_size} inputs | {epoch:.3f} |",
             f"| MSDNet: feature pass + kron fit on all exits | {fit_time:.3f} |",
             f"| MSDNet: plain forward of all exits, {args.test_size} inputs | {plain:.3f} |",
             f"| MSDNet: probit predictive of all exits, same inputs | {probit:.3f} |", "",
             "| target | measured | limit | met |", "|---|---|---|---|"]
    for text, value, limit in checks:
        ok = value >= float(limit.split()[1]) if limit.startswith(">=") else \
            value <= float(limit.split()[1])
        lines.append(f"| {text} | {value:.2f} | {limit} | {'yes' if ok else 'NO'} |")
    lines += ["", f"Prior precision of the one-head fit: exact evidence maximiser {exact:.6g} "
              f"(log evidence {ev_exact:.6f}); laplace-torch's default optimize_prior_precision "
              f"(100 Adam steps, lr 0.1, from 1) {lt_prior:.6g} (log evidence {ev_lt:.6f}; "
              f"{100 * (lt_prior / exact - 1):+.2f} % in precision)."]
    append_results(lines)


if __name__ == "__main__":
    main()
