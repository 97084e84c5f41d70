"""DUN training step vs a multi-exit net with summed cross-entropy and vs TraceEnum_ELBO (issue 5).

All three train the same residual stack (every depth's head computed in one pass) with one Adam:
(a) bayesdyn's step through fit's path (fast exact ELBO: sum_d q(d) log p(y|x,d) - KL),
(b) the same heads trained with summed cross-entropy (a plain multi-exit network),
(c) Pyro's TraceEnum_ELBO as an nn.Module (depth enumerated in the guide).

    python benchmarks/bench_depth_step.py [--device cpu|cuda] [--width 512] [--blocks 6]
"""

from __future__ import annotations

import argparse

import pyro
import torch
import torch.nn.functional as F
from common import peak_memory, report, synthetic_splits, time_variants

from bayesdyn.inference import FitConfig, resolve_device
from bayesdyn.inference.fit import Trainer
from bayesdyn.models import DepthNet
from bayesdyn.nn import residual_mlp

N = 60_000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    data, x, y = synthetic_splits(args.batch * 4, (784,))
    xb, yb = x[: args.batch].to(device), y[: args.batch].to(device)

    def build():
        torch.manual_seed(0)
        model = DepthNet(residual_mlp(784, 10, args.width, args.blocks), num_classes=10)
        return model, model.default_guide()

    trainer = Trainer(*build(), data, None, FitConfig(batch_size=args.batch), device, None, False)
    dun_step = lambda: trainer._step(trainer.loss(xb, yb)[0] / N)  # noqa: E731

    multi, _ = build()
    multi.to(device)
    opt_multi = torch.optim.Adam(multi.parameters(), lr=1e-3)

    def multi_exit_step():
        out = multi.backbone(xb)  # [D+1, B, C]
        loss = F.cross_entropy(out.flatten(0, 1), yb.repeat(out.shape[0]), reduction="sum")
        opt_multi.zero_grad(set_to_none=True)
        (loss * (N / len(xb)) / N).backward()
        opt_multi.step()

    ref_model, ref_guide = build()
    ref_model.to(device), ref_guide.to(device)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)(ref_model, ref_guide)
    opt_ref = torch.optim.Adam(elbo.parameters(), lr=1e-3)

    def traceenum_step():
        loss = elbo(xb, yb, dataset_size=N) / N
        opt_ref.zero_grad(set_to_none=True)
        loss.backward()
        opt_ref.step()

    variants = {"multi-exit, summed CE": multi_exit_step, "DUN via fit (exact ELBO)": dun_step,
                "Pyro TraceEnum_ELBO": traceenum_step}
    times = time_variants(variants, device)
    rows = [(name, t, peak_memory(variants[name], device)) for name, t in times.items()]
    dun = times["DUN via fit (exact ELBO)"]
    report(f"depth: DUN step, residual MLP {args.blocks}x{args.width}, batch {args.batch}", rows,
           baseline="multi-exit, summed CE", device=device,
           checks=[("DUN / multi-exit summed CE", dun / times["multi-exit, summed CE"], 1.1),
                   ("DUN / TraceEnum_ELBO", dun / times["Pyro TraceEnum_ELBO"], 0.3)],
           notes=f"{args.blocks + 1} depths, all heads in one forward pass; median of 7 "
                 "interleaved rounds of 20 steps.")


if __name__ == "__main__":
    main()
