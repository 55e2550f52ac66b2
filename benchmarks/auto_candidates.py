"""Which candidates should `auto` validate? Replays the selection rule on recorded validations.

A benchmark run with `auto` writes every auto cell's validation terms to selection.csv; the
fixed strategies' rows of the same cells (results.csv of the same or another run over the same
categories, shots and seeds) give each choice's test figures. For each candidate set, the rule
(selection.choose_strategy) is replayed on the recorded terms of that set's candidates, and the
chosen strategy's test figures are read off the fixed rows (the same maps and thresholds: `auto`
with `auto_experts` naming a set's experts makes exactly these choices, the validation of each
candidate not depending on the others). Prints, per shot count, every set's image AUROC per
category (mean over seeds) and its mean image / pixel AUROC / AUPRO over categories, the fixed
strategies and the per-category oracle (by image AUROC), and the leave-one-category-out choice of
the set (best mean image AUROC on the other categories) with its held-out mean.

    python benchmarks/auto_candidates.py --selection runs/real_auto runs/gen_auto \
        --fixed runs/real_fixed runs/gen_fixed
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from astfad.report import read_results, read_selections
from astfad.selection import CANDIDATES, DEFAULT_STRATEGY, choose_strategy
from protocol import held_out_best

METRICS = ("image_auroc", "pixel_auroc", "aupro")

FUSIONS = tuple(c for c in CANDIDATES if c.startswith("fusion_"))
CANDIDATE_SETS = {
    "semantic alone": (DEFAULT_STRATEGY,),
    "texture, semantic, fusions (default)": ("texture", DEFAULT_STRATEGY, *FUSIONS),
    "semantic, fusions": (DEFAULT_STRATEGY, *FUSIONS),
    "semantic, subspace": (DEFAULT_STRATEGY, "subspace"),
    "texture, semantic, subspace, fusions": ("texture", DEFAULT_STRATEGY, "subspace", *FUSIONS),
}


def replay(selection_dirs: list[Path], fixed_dirs: list[Path]) -> dict:
    """{(set, category, shots): [(image AUROC, pixel AUROC, AUPRO) per seed]} plus the fixed
    strategies' and the oracle's."""
    fixed = defaultdict(dict)  # (category, shots, seed) -> {strategy: figures}
    for folder in fixed_dirs:
        for r in read_results(folder / "results.csv"):
            if r["strategy"] != "auto":
                fixed[(r["category"], r["shots"], r["seed"])][r["strategy"]] = tuple(r[m] for m in METRICS)
    out = defaultdict(list)
    for folder in selection_dirs:
        for record in read_selections(folder / "selection.csv"):
            cell = (record["category"], record["shots"], record["seed"])
            for name, members in CANDIDATE_SETS.items():
                terms = {c: record["terms"][c] for c in members if c in record["terms"]}
                choice = choose_strategy(terms, seed=record["seed"]).choice
                out[(name, cell[0], cell[1])].append(fixed[cell][choice])
            for s, figures in fixed[cell].items():
                out[(f"fixed: {s}", cell[0], cell[1])].append(figures)
            # by image AUROC; a tie goes to the first strategy by name, so the row is reproducible
            best = max(sorted(fixed[cell]), key=lambda s: fixed[cell][s][0])
            out[("oracle", cell[0], cell[1])].append(fixed[cell][best])
    return out


def report(out: dict) -> None:
    for k in sorted({key[2] for key in out}):
        categories = sorted({c for (_, c, shots) in out if shots == k})
        names = sorted({n for (n, _, shots) in out if shots == k})
        figures = {(n, c): 100 * np.mean(out[(n, c, k)], axis=0) for n in names for c in categories if (n, c, k) in out}
        names = [n for n in names if all((n, c) in figures for c in categories)]
        value = {key: float(v[0]) for key, v in figures.items()}
        print(f"\n{k} shot(s): image AUROC per category, mean image / pixel AUROC / AUPRO (%, mean over seeds)")
        print("| candidates | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for n in sorted(names, key=lambda n: (n.startswith("fixed"), n == "oracle", n)):
            mean = np.mean([figures[(n, c)] for c in categories], axis=0)
            print(f"| {n} | " + " | ".join(f"{value[(n, c)]:.1f}" for c in categories)
                  + " | " + " / ".join(f"{v:.1f}" for v in mean) + " |")
        sets = [n for n in CANDIDATE_SETS if n in names]
        held = []
        for c, best in held_out_best(categories, sets, lambda o, n: value[(n, o)]).items():
            held.append(value[(best, c)])
            print(f"- held out {c}: chose '{best}' -> {held[-1]:.1f}")
        print(f"held-out mean {np.mean(held):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection", type=Path, nargs="+", required=True, help="folders with selection.csv")
    parser.add_argument("--fixed", type=Path, nargs="+", required=True, help="folders with the fixed rows")
    args = parser.parse_args()
    report(replay(args.selection, args.fixed))


if __name__ == "__main__":
    main()
