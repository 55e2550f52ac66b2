"""Which fixed strategy should `auto` keep as its default? Leave-one-category-out over a benchmark.

For every category, the default is chosen on the OTHER categories of a results.csv (the fixed
strategy with the best mean image AUROC over their shots and seeds) and then only measured on the
held-out one: a table gives that held-out mean per shot count next to every fixed strategy's mean
(a choice that changes from fold to fold can lose to one strategy kept everywhere); another shows `auto` (with today's default) against the best single fixed
strategy and the per-category oracle, per shot count.

    python benchmarks/default_strategy.py runs/real/results.csv runs/generated/results.csv
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from astfad.config import is_fixed_strategy
from astfad.report import read_results


def mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="results.csv files (e.g. real and generated runs)")
    args = parser.parse_args()
    rows = [r for path in args.results for r in read_results(path)]
    auroc: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for r in rows:
        auroc[(r["category"], r["shots"], r["strategy"])].append(r["image_auroc"])
    categories = sorted({r["category"] for r in rows})
    shots = sorted({r["shots"] for r in rows})
    fixed = sorted(s for s in {k[2] for k in auroc} if is_fixed_strategy(s))

    print("leave-one-category-out choice of the default (best mean image AUROC on the others):")
    chosen = {}
    for held_out in categories:
        others = [c for c in categories if c != held_out]
        score = {s: mean([mean(auroc[(c, k, s)]) for c in others for k in shots]) for s in fixed}
        chosen[held_out] = max(fixed, key=lambda s: score[s])
        print(f"- {held_out}: {chosen[held_out]} ({100 * score[chosen[held_out]]:.1f} on {', '.join(others)})")

    # what the folds' choice scores on the categories that did not choose it, against each fixed strategy
    print("\n| shots | held out (each category under its fold's choice) | " + " | ".join(fixed) + " |")
    print("|---|---:|" + "---:|" * len(fixed))
    for k in shots:
        held = mean([mean(auroc[(c, k, chosen[c])]) for c in categories])
        print(f"| {k} | {100 * held:.1f} | "
              + " | ".join(f"{100 * mean([mean(auroc[(c, k, s)]) for c in categories]):.1f}" for s in fixed) + " |")

    if not any(strategy == "auto" for _, _, strategy in auroc):
        return
    print("\n| shots | auto | best fixed (which) | oracle | auto - best fixed | auto - oracle |")
    print("|---|---:|---|---:|---:|---:|")
    for k in shots:
        per_cat = {s: [mean(auroc[(c, k, s)]) for c in categories] for s in fixed + ["auto"]}
        best = max(fixed, key=lambda s: mean(per_cat[s]))
        oracle = mean([max(mean(auroc[(c, k, s)]) for s in fixed) for c in categories])
        a, b = mean(per_cat["auto"]), mean(per_cat[best])
        print(f"| {k} | {100 * a:.1f} | {100 * b:.1f} ({best}) | {100 * oracle:.1f} | "
              f"{100 * (a - b):+.1f} | {100 * (a - oracle):+.1f} |")


if __name__ == "__main__":
    main()
