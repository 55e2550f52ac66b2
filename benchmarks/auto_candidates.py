"""Which candidates should `auto` validate? Replays the selection rule on recorded validations.

A benchmark run with `auto` writes every auto cell's validation terms to selection.csv; the
fixed strategies' rows of the same cells (results.csv of the same or another run over the same
categories, shots and seeds) give each choice's test figures. For each candidate set (with its
own default) and each weight of the image term in the rule's measure, the rule
(selection.choose_strategy) is replayed on the recorded terms of that set's candidates, and the
chosen strategy's test figures are read off the fixed rows (the same maps and thresholds: `auto`
with `auto_experts` naming a set's experts makes exactly these choices, the validation of each
candidate not depending on the others). Prints, per shot count, every set's image AUROC per
category (mean over seeds) and its mean image / pixel AUROC / AUPRO over categories, the fixed
strategies and the per-category oracle (by image AUROC), and the leave-one-category-out choice of
the variant (best mean image AUROC on the other categories) with its held-out mean, per shot count
and on the mean over every shot count (the choice the defaults are made by).

    python benchmarks/auto_candidates.py --selection runs/real_auto runs/gen_auto \
        --fixed runs/real_fixed runs/gen_fixed
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from astfad.config import DEFAULT_PAIR, candidate_strategies, fusion_strategies, is_fixed_strategy
from astfad.report import read_results, read_selections
from astfad.selection import choose_strategy
from protocol import held_out_best

METRICS = ("image_auroc", "pixel_auroc", "aupro")

TEXTURE_FUSIONS = fusion_strategies(DEFAULT_PAIR)
PAIR = ("semantic", "subspace")
IMAGE_WEIGHTS = (0.0, 0.5)  # of the image term in the rule's measure (selection.IMAGE_WEIGHT)
# name -> (the default the rule keeps without evidence, the candidates it validates)
CANDIDATE_SETS = {
    "semantic alone": ("semantic", ("semantic",)),
    "texture, semantic, fusions": ("semantic", ("texture", "semantic", *TEXTURE_FUSIONS)),
    "semantic, fusions": ("semantic", ("semantic", *TEXTURE_FUSIONS)),
    "texture, semantic, subspace, fusions": ("semantic", ("texture", "semantic", "subspace", *TEXTURE_FUSIONS)),
    "semantic, subspace": ("semantic", PAIR),
    **{f"semantic, subspace, their fusions; default {d}": (d, candidate_strategies(PAIR))
       for d in ("semantic", *fusion_strategies(PAIR))},
    **{f"{d}, subspace": (d, (d, "subspace")) for d in fusion_strategies(PAIR)},
    **{f"{d} alone": (d, (d,)) for d in fusion_strategies(PAIR)},
}
# every set under each measure (a single candidate has nothing to weigh)
VARIANTS = {(f"{name}; image weight {w}" if len(members) > 1 else name): (default, members, w)
            for name, (default, members) in CANDIDATE_SETS.items()
            for w in (IMAGE_WEIGHTS if len(members) > 1 else IMAGE_WEIGHTS[:1])}


def replay(selection_dirs: list[Path], fixed_dirs: list[Path]) -> dict:
    """{(set, category, shots): [(image AUROC, pixel AUROC, AUPRO) per seed]} plus the fixed
    strategies' and the oracle's."""
    fixed = defaultdict(dict)  # (category, shots, seed) -> {strategy: figures}
    for folder in fixed_dirs:
        for r in read_results(folder / "results.csv"):
            if is_fixed_strategy(r["strategy"]):
                fixed[(r["category"], r["shots"], r["seed"])][r["strategy"]] = tuple(r[m] for m in METRICS)
    out = defaultdict(list)
    for folder in selection_dirs:
        for record in read_selections(folder / "selection.csv"):
            cell = (record["category"], record["shots"], record["seed"])
            for name, (default, members, weight) in VARIANTS.items():
                if not set(members) <= set(record["terms"]):
                    continue  # validated by a run whose auto_experts did not name these
                terms = {c: record["terms"][c] for c in members}
                choice = choose_strategy(terms, default, seed=record["seed"], image_weight=weight).choice
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
        sets = [n for n in VARIANTS if n in names]
        held = []
        for c, best in held_out_best(categories, sets, lambda o, n: value[(n, o)]).items():
            held.append(value[(best, c)])
            print(f"- held out {c}: chose '{best}' -> {held[-1]:.1f}")
        print(f"held-out mean {np.mean(held):.1f}")
    report_pooled(out)


def report_pooled(out: dict) -> None:
    """The choice the defaults are made by: leave-one-category-out on the mean over every shot count."""
    shots = sorted({key[2] for key in out})
    categories = sorted({c for (_, c, _) in out})
    value = {(n, c, k): 100 * float(np.mean(v, axis=0)[0]) for (n, c, k), v in out.items()}
    sets = [n for n in VARIANTS if all((n, c, k) in value for c in categories for k in shots)]
    if not sets:
        return
    print(f"\nleave-one-category-out on the mean over {', '.join(map(str, shots))} shots:")
    held = held_out_best(categories, sets, lambda o, n: np.mean([value[(n, o, k)] for k in shots]))
    for c, best in held.items():
        print(f"- held out {c}: chose '{best}' -> " + " / ".join(f"{value[(best, c, k)]:.1f}" for k in shots))
    for name, folds in Counter(held.values()).most_common():
        print(f"  {folds} of {len(categories)} folds: {name}")
    print("held-out mean " + " / ".join(f"{np.mean([value[(held[c], c, k)] for c in categories]):.1f}" for k in shots))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--selection", type=Path, nargs="+", required=True, help="folders with selection.csv")
    parser.add_argument("--fixed", type=Path, nargs="+", required=True, help="folders with the fixed rows")
    args = parser.parse_args()
    report(replay(args.selection, args.fixed))


if __name__ == "__main__":
    main()
