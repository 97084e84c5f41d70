"""``bayesdyn calibrate RUN``: post-hoc calibration of a trained exits run (methods.md §2.3-§2.5).

Builds the predictives of the WACV comparison side by side (vanilla, per-exit temperature
scaling, last-layer Laplace on every exit, MIE, LA + MIE; the Laplace ones with ``--laplace``,
the MIE ones with ``--mie``), scores each on the test split at every exit (anytime) and in
budgeted batch (thresholds from the same predictive's validation confidences), and writes
``RUN/calibration/metrics.json`` with plots in ``RUN/calibration/plots``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from .evaluation import plots
from .evaluation.cost import forward_flops
from .evaluation.metrics import classification_metrics
from .evaluation.protocols import budgeted_batch
from .inference.exit_laplace import calibrate_variants, exit_features
from .inference.lastlayer import STRUCTURES
from .models.exits import MultiExitNet


def compare_variants(model, variants: dict, data, n_bins: int = 15,
                     batch_size: int = 1024) -> dict:
    """Test metrics of every calibrated predictive: ``{name: {"exits": [per-exit metrics],
    "budgeted_batch": [39 rows], "temperature": [K], "prior_precision": [K] or None}}`` and
    ``flops`` (cumulative FLOPs of reaching each exit)."""
    val = exit_features(model, data.val.tensors[0], batch_size)
    test = exit_features(model, data.test.tensors[0], batch_size)
    costs = [forward_flops(model.budget_module(b), data.input_shape) for b in model.budgets()]
    y_val, y_test = data.val.tensors[1].cpu(), data.test.tensors[1].cpu()
    out = {"flops": costs, "variants": {}, "test_probs": {}}
    for name, cal in variants.items():
        val_probs = cal.probs(val).mean(1).float().cpu()  # [K, N, C]
        test_probs = cal.probs(test).mean(1).float().cpu()
        exits = [{"flops": c, **classification_metrics(p, y_test, n_bins)}
                 for c, p in zip(costs, test_probs, strict=True)]
        rows = budgeted_batch([SimpleNamespace(mean=p) for p in val_probs], y_val,
                              [SimpleNamespace(mean=p) for p in test_probs], y_test, costs,
                              n_bins=n_bins)
        out["variants"][name] = {
            "exits": exits, "budgeted_batch": rows, "temperature": cal.temperature.tolist(),
            "prior_precision": None if cal.heads is None else
            [float(h.prior_precision) for h in cal.heads]}
        out["test_probs"][name] = test_probs
    return out


def write_plots(folder: Path, found: dict, labels: torch.Tensor, n_bins: int = 15) -> None:
    """NLL / ECE / accuracy vs FLOPs of every predictive (anytime and budgeted batch), and
    reliability diagrams of every exit for vanilla and the last (best-calibrated) predictive."""
    variants = found["variants"]
    for metric in ("accuracy", "nll", "ece"):
        curves = {f"{n} (exits)": v["exits"] for n, v in variants.items()}
        curves.update({f"{n} (budgeted)": v["budgeted_batch"] for n, v in variants.items()})
        plots.metric_vs_flops(curves, metric, path=folder / f"{metric}_vs_flops.png")
    after = list(variants)[-1]
    for name in dict.fromkeys(["vanilla", after]):
        for k, probs in enumerate(found["test_probs"][name]):
            plots.reliability_diagram(probs, labels, n_bins, title=f"{name}, exit {k + 1}",
                                      path=folder / f"reliability_{name}_exit{k + 1}.png")


def calibrate_run(run_dir, laplace: str | None = "kron", mie: bool = True,
                  prior: str = "marglik", link: str = "probit", num_samples: int = 100,
                  device: str = "cpu", n_bins: int = 15) -> dict:
    """Calibrate the exits run in ``run_dir`` and write ``calibration/metrics.json`` + plots."""
    from .inference.checkpoint import write_json
    from .runs import load_run

    if laplace is not None and laplace not in STRUCTURES:
        raise ValueError(f"--laplace must be one of {', '.join(STRUCTURES)} or none, got "
                         f"{laplace!r}")
    run = load_run(run_dir, device)
    if not isinstance(run.model, MultiExitNet):
        raise ValueError(f"{run_dir} is a {run.config['recipe']['method']!r} run; calibrate "
                         "needs an exits or boosted-exits run")
    data = run.data.to(next(run.model.parameters()).device)
    variants = calibrate_variants(run.model.eval(), data, laplace or "kron", prior=prior,
                                  link=link, num_samples=num_samples,
                                  with_laplace=laplace is not None, with_mie=mie)
    found = compare_variants(run.model, variants, data, n_bins)
    metrics = {"method": run.config["recipe"]["method"], "dataset": data.name,
               "seed": run.config["seed"], "laplace": laplace, "mie": mie, "prior": prior,
               "link": link, "ece_bins": n_bins, "flops": found["flops"],
               "variants": found["variants"]}
    folder = Path(run_dir) / "calibration"
    write_json(folder / "metrics.json", metrics)
    write_plots(folder / "plots", found, data.test.tensors[1].cpu(), n_bins)
    return metrics


def format_calibration(metrics: dict) -> str:
    """A table: every predictive's last-exit and mean budgeted-batch accuracy, NLL and ECE."""
    lines = [f"{'predictive':<14} {'last acc':>9} {'last nll':>9} {'last ece':>9} "
             f"{'bb acc':>8} {'bb nll':>8} {'bb ece':>8}"]
    for name, v in metrics["variants"].items():
        last, rows = v["exits"][-1], v["budgeted_batch"]
        acc, nll, ece = (sum(r[key] for r in rows) / len(rows) for key in ("accuracy", "nll", "ece"))
        lines.append(f"{name:<14} {last['accuracy']:9.4f} {last['nll']:9.4f} {last['ece']:9.4f} "
                     f"{acc:8.4f} {nll:8.4f} {ece:8.4f}")
    return "\n".join(lines)
