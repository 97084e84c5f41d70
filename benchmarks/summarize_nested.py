"""Count, per recorded nested reproduction, at how many of the 16 widths BNNN beats nested
dropout (mean over seeds; higher accuracy / AUROC, lower NLL / ECE) and the range of the
accuracy gap: the "Reading" tables of RESULTS.md.

    python benchmarks/summarize_nested.py [benchmarks/results/repro_nested_*.json ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

LOWER_IS_BETTER = {"nll", "ece"}
KEYS = ("accuracy", "nll", "ece", "ood_auroc")


def summarize(path: Path) -> str:
    results = json.loads(path.read_text())["results"]

    def mean(method, i, key):
        return statistics.mean(run["budgets"][i][key] for run in results[method])

    widths = range(len(results["nested"][0]["budgets"]))
    wins = {}
    for key in KEYS:
        sign = -1 if key in LOWER_IS_BETTER else 1
        wins[key] = sum(sign * (mean("nested", i, key) - mean("nested-dropout", i, key)) > 0
                        for i in widths)
    gaps = [mean("nested", i, "accuracy") - mean("nested-dropout", i, "accuracy") for i in widths]
    counts = " | ".join(str(wins[k]) for k in KEYS)
    return f"| {path.stem} | {counts} | {min(gaps):+.3f} / {max(gaps):+.3f} |"


def main():
    paths = [Path(p) for p in sys.argv[1:]] or sorted(
        Path(__file__).with_name("results").glob("repro_nested_*.json"))
    print("| run | " + " | ".join(KEYS) + " | accuracy BNNN - ND, min / max |")
    print("|---" * (len(KEYS) + 2) + "|")
    for path in paths:
        print(summarize(path))


if __name__ == "__main__":
    main()
