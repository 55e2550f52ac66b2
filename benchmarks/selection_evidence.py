"""Which selection rule should `auto` use? Records every auto cell's validation and what each of its
choices would score on the test set, then replays rules on the records.

For every category, shot count and seed this fits `Detector("auto")` as the benchmark does and
keeps its validation terms (selection.validation_terms: the pixel and image terms of each candidate
and its validation images' scores under each image-score rule), the choice it made, and, for every
candidate expert and image-score rule, the test set's image AUROC (pixel AUROC and AUPRO once per
expert, on every second row and column of the evaluation grid). Test features are cached per
category, so one backbone pass per test image (two above 4 shots, the test-time flip).

Then each rule of RULES is replayed on the records: its choice of expert and image-score rule in
every cell, read off the recorded test figures. Prints, per shot count, each rule's image AUROC per
category and its mean image / pixel AUROC / AUPRO, the fixed experts and the per-category oracle,
and the leave-one-category-out choice of the rule (best mean image AUROC on the other categories,
over every shot count and at each shot count alone) with its held-out mean: the tuning protocol of
benchmarks/README.md. The `current` rule must reproduce the recorded choices (checked) when the
records were made under today's rule; `--recorded-rule` names the rule they were made under
(`--recorded-image-score` the image-score policy). The
`current` rule's experts are also replayed under each image-score policy of IMAGE_SCORE_POLICIES
(`current, <policy>`: validated, validated with a margin the maximum must lead the top-1% mean by
(in normal spreads, or a bootstrap lower bound above zero), or the maximum above 4 or 8 shots as
`auto_max_score_above` sets it), chosen by leave-one-category-out among themselves.

    OMP_NUM_THREADS=1 python benchmarks/selection_evidence.py --data ../shared/data --shots 1 4 16 \
        --seeds 0 1 2 --out runs/selection_real.json
    python benchmarks/selection_evidence.py --rows runs/selection_real.json runs/selection_gen.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.metrics import image_auroc
from astfad.scoring import image_scores
from astfad.selection import (BOOTSTRAP_RESAMPLES, DEFAULT_STRATEGY, FAMILY_ERROR, MAP_SCORE_RULES,
                              choose_image_score, choose_strategy, min_gain, separation)
from cached_rows import cached_rows, recorded_rows
from protocol import held_out_best, probe_test_set, strided_metrics



def collect(data: Path, shots: list[int], seeds: list[int], partial: Path) -> list[dict[str, Any]]:
    """The records; each cell is also written to `partial` as it comes, and a rerun after a stop
    continues from there."""
    rows = json.loads(partial.read_text()) if partial.exists() else []
    done = {(r["category"], r["shots"], r["seed"]) for r in rows}
    for category in scan_dataset(data):
        if all((category.name, k, seed) in done for k in shots for seed in seeds):
            continue
        aspect, tests, strided = probe_test_set(category)
        cache: dict = {}
        for k in shots:
            for seed in seeds:
                if (category.name, k, seed) in done:
                    continue
                train = [s.path for s in sample_shots(category.train, k, seed, "random")]
                det = Detector("auto", cache=cache, aspect_ratio=aspect, seed=seed).fit(train)
                _, expert_maps = det.maps_of(tests.images, tests.keys, "all")
                test = {}
                for name in det.selection_terms:
                    maps = det.combine(name, expert_maps)
                    figures = strided_metrics(strided, image_scores(maps, "top1", det.score_border).numpy(), maps)
                    test[name] = {"pixel_auroc": figures["pixel_auroc"], "aupro": figures["aupro"],
                                  **{rule: image_auroc(tests.labels, image_scores(maps, rule, det.score_border).numpy())
                                     for rule in MAP_SCORE_RULES}}
                rows.append({"category": category.name, "shots": k, "seed": seed, "choice": det.strategy,
                             "image_score": det.image_score, "test": test,
                             "terms": {n: {key: v.tolist() for key, v in term.items()}
                                       for n, term in det.selection_terms.items()}})
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(rows))
                print(category.name, k, seed, det.strategy, det.image_score, flush=True)
    return rows


Terms = dict[str, dict[str, np.ndarray]]
Rule = Callable[[Terms, int, int], str]  # (terms, seed, shots) -> the expert chosen; the image-score rule follows it


def current(terms: Terms, seed: int, shots: int) -> str:
    """Today's rule: the pixel measure's bootstrap, and a challenger's mean gain above
    selection.min_gain(shots)."""
    return choose_strategy(terms, DEFAULT_STRATEGY, seed, min_gain=min_gain(shots)).choice


def with_min_gain(gain: float) -> Rule:
    """The bootstrap rule with a challenger's mean gain required to exceed `gain` at every shot count."""
    def rule(terms: Terms, seed: int, shots: int) -> str:
        return choose_strategy(terms, DEFAULT_STRATEGY, seed, min_gain=gain).choice
    return rule


def with_margin(margin: float) -> Rule:
    """The bootstrap rule with the challenger's lower bound, not its mean, required to exceed `margin`."""
    def rule(terms: Terms, seed: int, shots: int) -> str:
        scores = choose_strategy(terms, DEFAULT_STRATEGY, seed).scores
        winners = [n for n, s in scores.items() if n != DEFAULT_STRATEGY and s["gain_low"] > margin]
        return max(winners, key=lambda n: scores[n]["score"]) if winners else DEFAULT_STRATEGY
    return rule


def best_separation(term: dict[str, np.ndarray], normal: np.ndarray | slice = slice(None),
                    anomalous: np.ndarray | slice = slice(None)) -> float:
    """A candidate's separation under its better image-score rule (on a resample of its images)."""
    return max(separation(term[f"normal_{r}"][normal], term[f"anomalous_{r}"][anomalous]) for r in MAP_SCORE_RULES)


def by_separation(terms: Terms, seed: int, shots: int) -> str:
    """The candidate whose image scores separate the validation anomalies furthest (the default
    on a tie)."""
    return max(terms, key=lambda n: (best_separation(terms[n]), n == DEFAULT_STRATEGY))


def by_separation_bootstrap(terms: Terms, seed: int, shots: int) -> str:
    """The default unless a candidate's best separation beats the default's on the bootstrap's
    (5 / C)th percentile over joint resamples of the normal and the anomalous images (the
    pixel rule's margin, applied to the image scores)."""
    rng = np.random.default_rng(seed)
    n, m = len(terms[DEFAULT_STRATEGY]["normal_top1"]), len(terms[DEFAULT_STRATEGY]["anomalous_top1"])
    draws = [(rng.integers(0, n, n), rng.integers(0, m, m)) for _ in range(BOOTSTRAP_RESAMPLES // 4)]
    lower = FAMILY_ERROR / max(1, len(terms) - 1)
    base = np.array([best_separation(terms[DEFAULT_STRATEGY], a, b) for a, b in draws])
    gains = {name: np.array([best_separation(term, a, b) for a, b in draws]) - base
             for name, term in terms.items() if name != DEFAULT_STRATEGY}
    winners = [name for name, gain in gains.items() if np.percentile(gain, lower) > 0]
    return max(winners, key=lambda name: gains[name].mean()) if winners else DEFAULT_STRATEGY


def pixel_with_separation_veto(terms: Terms, seed: int, shots: int) -> str:
    """The bootstrap rule's choice, unless the default's image scores separate the anomalies
    further than the chosen candidate's: a challenger must win on both."""
    choice = with_min_gain(0.0)(terms, seed, shots)
    return DEFAULT_STRATEGY if best_separation(terms[choice]) < best_separation(terms[DEFAULT_STRATEGY]) else choice


ImageScorePolicy = Callable[[dict[str, np.ndarray], int], str]  # (chosen expert's term, shots) -> rule
TODAY = "validated at every shot count"
BEFORE_LOG = "validated, by the spread separation at one shot too (before ONE_SHOT_LOG_MARGIN)"
SEPARATION_MARGINS = (0.25, 0.5, 1.0, 2.0, 4.0)  # normal spreads by which the maximum must lead the top-1% mean
LOG_MARGINS = (0.0, 0.02, 0.05, 0.1)  # the same on the median log ratio to the normal mean, at every shot count
IMAGE_SCORE_POLICIES: dict[str, ImageScorePolicy] = {
    TODAY: lambda term, shots: choose_image_score(term, "top1", shots)["choice"],
    BEFORE_LOG: lambda term, shots: choose_image_score(term, "top1", shots, one_shot_log_margin=None)["choice"],
    **{f"validated up to {bound} shots, then the maximum (auto_max_score_above {bound})":
       (lambda term, shots, bound=bound: choose_image_score(term, "top1", shots, bound)["choice"]) for bound in (4, 8)},
    **{f"validated, the maximum's separation gain > {m:g}":
       (lambda term, shots, m=m: choose_image_score(term, "top1", shots, min_gain=m, one_shot_log_margin=None)["choice"]) for m in SEPARATION_MARGINS},
    "validated, the maximum's bootstrap lower bound > 0":
        lambda term, shots: choose_image_score(term, "top1", shots, bootstrap=True, one_shot_log_margin=None)["choice"],
    # shots=1 makes choose_image_score compare by the log ratio at every shot count
    **{f"validated, log ratio, the maximum's lead > {m:g}":
       (lambda term, shots, m=m: choose_image_score(term, "top1", 1, one_shot_log_margin=m)["choice"]) for m in LOG_MARGINS},
    "top1 always": lambda term, shots: "top1",
    "max always": lambda term, shots: "max"}


MARGINS = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1)
RULES: dict[str, Rule] = {"current": current, "separation": by_separation,
                          "separation, bootstrap": by_separation_bootstrap,
                          "pixel, separation veto": pixel_with_separation_veto,
                          "pixel, no minimum gain": with_min_gain(0.0),
                          **{f"pixel, lower bound > {m:g}": with_margin(m) for m in MARGINS},
                          **{f"pixel, mean gain > {m:g}": with_min_gain(m) for m in MARGINS}}
# the options leave-one-category-out chooses among ("current" is itself a choice per shot count)
FAMILIES = {"every rule": [name for name in RULES if name != "current"],
            "minimum mean gain": ["pixel, no minimum gain", *(f"pixel, mean gain > {m:g}" for m in MARGINS)],
            # where the maximum takes over (the fixed rules are printed for reference only)
            "image-score policy": [f"current, {policy}" for policy in IMAGE_SCORE_POLICIES
                           if "always" not in policy and "validated," not in policy],
    # how far the maximum must lead before it replaces the top-1% mean
    "image-score margin": [f"current, {policy}" for policy in IMAGE_SCORE_POLICIES
                           if policy == TODAY or "validated," in policy]}


def replay(rows: list[dict[str, Any]], rules: dict[str, Rule], recorded: str = "current",
           recorded_score: str = TODAY) -> dict[tuple[str, str, int], list[tuple]]:
    """{(rule, category, shots): [(image AUROC, pixel AUROC, AUPRO) per seed]}, each rule's expert
    scored with the image-score rule today's `auto` takes on it, and the `current` rule's expert
    under every policy of IMAGE_SCORE_POLICIES (`current, <policy>`); the fixed experts (top-1%
    mean) under `<expert>` and their per-category oracle under `oracle`."""
    out: dict[tuple[str, str, int], list[tuple]] = {}
    for row in rows:
        terms = {n: {k: np.asarray(v, float) for k, v in t.items()} for n, t in row["terms"].items()}
        test, key = row["test"], (row["category"], row["shots"])

        def figures(expert: str, rule: str) -> tuple[float, float, float]:
            return test[expert][rule], test[expert]["pixel_auroc"], test[expert]["aupro"]
        chosen = {}
        for name, rule in rules.items():
            expert = chosen[name] = rule(terms, row["seed"], row["shots"])
            score = IMAGE_SCORE_POLICIES[TODAY](terms[expert], row["shots"])
            if name == recorded:
                then = IMAGE_SCORE_POLICIES[recorded_score](terms[expert], row["shots"])
                if (expert, then) != (row["choice"], row["image_score"]):
                    raise SystemExit(f"the rule '{recorded}' with '{recorded_score}' does not reproduce {key} seed "
                                     f"{row['seed']}: {expert}/{then} against {row['choice']}/{row['image_score']}")
            out.setdefault((name, *key), []).append(figures(expert, score))
        expert = chosen["current"] if "current" in chosen else current(terms, row["seed"], row["shots"])
        for policy, choose in IMAGE_SCORE_POLICIES.items():
            out.setdefault((f"current, {policy}", *key), []).append(figures(expert, choose(terms[expert], row["shots"])))
        for expert in test:
            out.setdefault((expert, *key), []).append(figures(expert, "top1"))
    experts = list(rows[0]["test"])
    for category, shots in {(r["category"], r["shots"]) for r in rows}:
        best = max(experts, key=lambda e: np.mean([f[0] for f in out[(e, category, shots)]]))
        out[("oracle", category, shots)] = out[(best, category, shots)]
    return out


def report(rows: list[dict[str, Any]], recorded: str = "current", recorded_score: str = TODAY) -> None:
    results = replay(rows, RULES, recorded, recorded_score)
    shot_counts = sorted({r["shots"] for r in rows})
    # categories recorded at every shot count (a run still in progress lacks some)
    categories = sorted(c for c in {r["category"] for r in rows}
                        if all((c, k) in {(r["category"], r["shots"]) for r in rows} for k in shot_counts))
    names = [*RULES, *(f"current, {policy}" for policy in IMAGE_SCORE_POLICIES), *rows[0]["test"], "oracle"]

    def mean(name: str, category: str, shots: int, measure: int = 0) -> float:
        return 100 * float(np.mean([f[measure] for f in results[(name, category, shots)]]))
    for k in shot_counts:
        print(f"\n{k} shot(s): image AUROC per category (mean over seeds), mean image AUROC of the categories "
              f"(mean ± std over seeds) / pixel AUROC / AUPRO (%)")
        print("| rule | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for name in names:
            means = [np.mean([mean(name, c, k, m) for c in categories]) for m in range(3)]
            per_seed = 100 * np.mean([[f[0] for f in results[(name, c, k)]] for c in categories], axis=0)
            print(f"| {name} | " + " | ".join(f"{mean(name, c, k):.1f}" for c in categories)
                  + f" | {means[0]:.1f} ± {per_seed.std():.1f} / {means[1]:.1f} / {means[2]:.1f} |")
    def held_out(family: str, scope: list[int]) -> dict[str, str]:
        chosen = held_out_best(categories, FAMILIES[family],
                               lambda c, name: np.mean([mean(name, c, k) for k in scope]))
        print(f"\nleave-one-category-out among {family}, over {'/'.join(map(str, scope))} shot(s): "
              + ", ".join(f"{c} {chosen[c]}" for c in categories))
        return chosen
    for family in FAMILIES:
        pooled = held_out(family, shot_counts)
        for k in shot_counts:
            alone = held_out(family, [k])
            for label, chosen in (("over every shot count", pooled), (f"at {k} shot(s) alone", alone)):
                print(f"{k} shot(s), {family}, chosen {label}: held out "
                      f"{np.mean([mean(chosen[c], c, k) for c in categories]):.2f}, "
                      f"current {np.mean([mean('current', c, k) for c in categories]):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/selection_evidence.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these recorded runs together")
    parser.add_argument("--recorded-rule", default="current", choices=list(RULES),
                        help="the rule the records were made under, which must reproduce their choices")
    parser.add_argument("--recorded-image-score", default=TODAY, choices=list(IMAGE_SCORE_POLICIES),
                        help="the image-score policy the records were made under (records before "
                             "ONE_SHOT_LOG_MARGIN: the spread separation at one shot too)")
    args = parser.parse_args()
    if args.rows:
        rows = recorded_rows(args.rows)
    else:
        rows = cached_rows(args.out, lambda: collect(args.data, args.shots, args.seeds,
                                                           args.out.with_suffix(".partial.json")))
    report(rows, args.recorded_rule, args.recorded_image_score)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
