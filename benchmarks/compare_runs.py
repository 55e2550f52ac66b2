"""Does a code change earn its place? Two benchmark runs of the same cells, before and after it,
compared by the tuning protocol's leave-one-category-out (benchmarks/README.md): for each held-out
category, the version with the better mean on the OTHER categories is the one that category gets.

    python benchmarks/compare_runs.py --before runs/real_old runs/gen_old --after runs/real runs/gen \
        --strategy auto

Prints, per shot count: the cells found in both runs, how many applied another strategy, the change
per category, the folds adopting the change and the held-out mean change. Only cells present in
both runs count (each run folder's results.csv; several folders are pooled).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from astfad.report import read_results
from protocol import held_out_best


def cells(folders: list[Path], strategy: str) -> dict[tuple[str, int, int], dict]:
    return {(r["category"], r["shots"], r["seed"]): r for folder in folders
            for r in read_results(folder / "results.csv") if r["strategy"] == strategy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, nargs="+", required=True)
    parser.add_argument("--after", type=Path, nargs="+", required=True)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--measure", default="image_auroc")
    args = parser.parse_args()
    before, after = cells(args.before, args.strategy), cells(args.after, args.strategy)
    common = sorted(set(before) & set(after))
    if not common:
        raise SystemExit(f"no cell of strategy '{args.strategy}' is in both runs")
    for shots in sorted({k for _, k, _ in common}):
        keys = [key for key in common if key[1] == shots]
        per_category: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"before": [], "after": []})
        for key in keys:
            per_category[key[0]]["before"].append(before[key][args.measure])
            per_category[key[0]]["after"].append(after[key][args.measure])
        mean = {c: {v: float(np.mean(x)) for v, x in d.items()} for c, d in per_category.items()}
        categories = sorted(mean)
        chosen = held_out_best(categories, ["before", "after"], lambda c, v: mean[c][v])
        held_out = np.mean([mean[c][chosen[c]] - mean[c]["before"] for c in categories])
        switched = sum(before[k]["applied_strategy"] != after[k]["applied_strategy"] for k in keys)
        print(f"{shots} shot(s): {len(keys)} cells in both runs, {switched} applied another strategy; "
              f"folds adopting the change {sum(v == 'after' for v in chosen.values())} of {len(categories)}; "
              f"held-out change {100 * held_out:+.2f} points of {args.measure}")
        for c in categories:
            print(f"  {c:<20} {100 * mean[c]['before']:6.1f} -> {100 * mean[c]['after']:6.1f} "
                  f"({100 * (mean[c]['after'] - mean[c]['before']):+.1f}; this fold: {chosen[c]})")


if __name__ == "__main__":
    main()
