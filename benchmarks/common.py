"""Shared timing and reporting for the benchmarks: ratios against a baseline measured in the
same process, interleaved rounds (so drift hits every variant alike), results appended to
RESULTS.md with the command, device and date."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# gpu_check.sh sends a run's figures to its own results folder (BAYESDYN_RESULTS)
RESULTS = Path(os.environ.get("BAYESDYN_RESULTS", Path(__file__).with_name("RESULTS.md")))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


QUICK = os.environ.get("BAYESDYN_BENCH_QUICK") == "1"  # gpu_check.sh --dry: smoke, not figures


def time_variants(variants: dict, device, steps: int = 20, rounds: int = 7, warmup: int = 5):
    """Median seconds per call of each zero-argument callable, measured in interleaved rounds
    (one round of two steps with ``BAYESDYN_BENCH_QUICK=1``)."""
    if QUICK:
        steps, rounds, warmup = 2, 1, 1
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync(device)
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_memory(fn, device) -> int | None:
    """Peak GPU memory (bytes) of one call; None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def synthetic_splits(n: int, input_shape, n_val: int = 8, classes: int = 10):
    """Random inputs and labels as ``DataSplits`` (timing only; seeded): ``(data, x, y)``."""
    from torch.utils.data import TensorDataset

    from bayesdyn.data import DataSplits

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *input_shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    val = TensorDataset(x[:n_val], y[:n_val])
    channels = (0.0,) * (input_shape[0] if len(input_shape) == 3 else 1)
    data = DataSplits("synthetic", TensorDataset(x, y), val, val, classes, tuple(input_shape),
                      channels, tuple(1.0 for _ in channels))
    return data, x, y


def subset(data, n: int):
    """``data`` with its training split cut to the first ``n`` examples of a fixed permutation
    (the same for every run; ``n <= 0`` or more than there are: all of them)."""
    from dataclasses import replace

    from torch.utils.data import TensorDataset

    if n <= 0 or n >= len(data.train):
        return data
    x, y = data.train.tensors
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    return replace(data, train=TensorDataset(x[keep], y[keep]))


def mean_std(values) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def add_msdnet_arguments(p) -> None:
    """The CPU-sized MSDNet and its SGD recipe, shared by the exits reproductions."""
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--step", type=int, default=1)
    p.add_argument("--base", type=int, default=2)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--growth-rate", type=int, default=4)
    p.add_argument("--head-channels", type=int, default=32)
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")


def cell(values, scale=1.0, digits=2) -> str:
    """``mean ± std`` of ``scale * values`` for a table."""
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def curve_at(rows, grid, key):
    """``key`` of a curve of ``{"flops", key}`` rows, interpolated at the FLOPs in ``grid``."""
    import numpy as np

    rows = sorted(rows, key=lambda r: r["flops"])
    return np.interp(grid, [r["flops"] for r in rows], [r[key] for r in rows])


def header(title: str, device) -> list[str]:
    """A section's first lines: title, command, device, date."""
    return [f"### {title}", "",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- device: {device_name(device)}; torch {torch.__version__}",
            f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"]


def append_results(lines: list[str]) -> str:
    """Print a Markdown section and append it to RESULTS.md (unless --no-record)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if "--no-record" not in sys.argv:
        with RESULTS.open("a") as fh:
            fh.write("\n" + text)
    return text


def report(title: str, rows: list[tuple[str, float, int | None]], baseline: str, device,
           checks: list[tuple[str, float, float]], notes: str = "") -> str:
    """Print and append a Markdown section: ms per step, ratio to ``baseline``, peak memory, and
    target checks ``(description, measured ratio, limit)``."""
    base = dict((n, t) for n, t, _ in rows)[baseline]
    lines = [*header(title, device), "",
             "| variant | ms / step | ratio to baseline | peak GPU MiB |", "|---|---|---|---|"]
    for name, t, mem in rows:
        mib = "-" if mem is None else f"{mem / 2**20:.0f}"
        lines.append(f"| {name} | {1e3 * t:.3f} | {t / base:.3f} | {mib} |")
    lines += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
    for text, value, limit in checks:
        lines.append(f"| {text} | {value:.3f} | {limit} | {'yes' if value <= limit else 'NO'} |")
    if notes:
        lines += ["", notes]
    return append_results(lines)
