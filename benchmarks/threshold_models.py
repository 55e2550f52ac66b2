"""Which model of normal image scores gives thresholds that hold their false-positive rate?

Collects, per (category, shots, seed, strategy), the held-out normal scores a detector fits its
threshold model on and the scores of the category's test images (subsampled to at most --max-test
per label), then compares score models by leave-one-category-out, at each shot count alone (one
shot's normal evidence is views of a single part, much tighter than new parts): for each category,
the model chosen on the OTHER categories is applied to it. The rule: the highest mean recall among models
whose mean false-positive rate on the other categories stays within `--tolerance` of the target
(the lowest, so the closest to the target, when none does). Closest-to-target alone drifts, on a finer grid of
widenings, to thresholds so high that nothing is ever flagged.
Nothing here is tuned on the category a figure is reported for. The table's last row is a bound,
not a model: the recall at the threshold fitted on the test's own good parts, what the best model
could reach with that image score.

    python benchmarks/threshold_models.py --data ../shared/data --shots 1 4 --seeds 0 1 2 --out runs/thresholds.json
    python benchmarks/threshold_models.py --rows runs/thresholds.json runs/thresholds_gen.json

The default strategies are `auto`'s candidates (semantic, subspace), each expert fitted once per
cell (`Detector.fit(also=...)`). Each strategy's normal and test maps are scored under every
image-score rule of `--image-scores` (default the top-1% mean and the maximum, the two `auto`
chooses between), and each rule's models are compared on their own: a threshold fitted to the
maximum's normal scores may need another widening than the top-1% mean's. Rows recorded before
the rules were recorded are the top-1% mean's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from astfad.benchmark import category_aspect
from astfad.config import experts_of
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.data.images import load_image
from astfad.detector import Detector
from astfad.scoring import image_scores
from astfad.selection import MAP_SCORE_RULES
from cached_rows import cached_rows, recorded_rows
from protocol import lowest_rate_best


def collect(data: Path, shots: list[int], seeds: list[int], max_test: int, strategies: list[str],
            rules: list[str]) -> list[dict]:
    rows = []
    for category in scan_dataset(data):
        good = [s for s in category.test if not s.label]
        bad = [s for s in category.test if s.label]
        rng = np.random.default_rng(0)
        pick = lambda xs: [xs[i] for i in sorted(rng.choice(len(xs), min(max_test, len(xs)), replace=False))]
        test = pick(good) + pick(bad)
        images = [load_image(s.path) for s in test]
        keys = [str(s.path) for s in test]
        labels = [s.label for s in test]
        cache: dict = {}
        for k in shots:
            for seed in seeds:
                train = sample_shots(category.train, k, seed)
                det = Detector(strategies[0], cache=cache, seed=seed, aspect_ratio=category_aspect(category))
                captured = {}
                original = det._fit_thresholds

                def spy(normal_maps, normal_scores, original=original):
                    captured.update({(n, rule): image_scores(det.combine(n, normal_maps), rule, det.score_border).tolist()
                                     for n in strategies for rule in rules})
                    return original(normal_maps, normal_scores)

                det._fit_thresholds = spy
                det.fit([s.path for s in train], also=sorted({e for s in strategies for e in experts_of(s)}))
                _, maps = det.maps_of(images, keys, "all")
                for strategy in strategies:
                    for rule in rules:
                        scores = image_scores(det.combine(strategy, maps), rule, det.score_border)
                        rows.append({"category": category.name, "shots": k, "seed": seed, "strategy": strategy,
                                     "rule": rule, "normal": captured[(strategy, rule)], "test": scores.tolist(),
                                     "labels": labels})
                print(category.name, k, seed, flush=True)
    return rows


def _robust(x: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(x))
    scale = 1.4826 * float(np.median(np.abs(x - centre)))
    return centre, scale if scale > 0 else float(x.std(ddof=1))


def threshold(model: str, normal: list[float], fpr: float) -> float:
    """`model` is a family name, optionally `@c`: the tail's z-value widened by the factor c."""
    model, _, widen = model.partition("@")
    x = np.asarray(normal, dtype=np.float64)
    z = float(stats.norm.isf(fpr)) * (float(widen) if widen else 1.0)
    positive = (x > 0).all()
    if model == "gaussian":
        return x.mean() + z * x.std(ddof=1)
    if model == "robust":
        c, s = _robust(x)
        return c + z * s
    if model in ("lognormal", "robust_lognormal") and positive:
        lx = np.log(x)
        c, s = (lx.mean(), lx.std(ddof=1)) if model == "lognormal" else _robust(lx)
        return float(np.exp(c + z * s))
    if model in ("lognormal", "robust_lognormal"):
        return threshold(("gaussian" if model == "lognormal" else "robust") + (f"@{widen}" if widen else ""),
                         normal, fpr)
    if model == "max":
        return float(x.max())
    raise ValueError(model)


MODELS = ("gaussian", "robust", "lognormal", "robust_lognormal", "max",
          *(f"{family}@{c}" for family in ("gaussian", "lognormal")
            for c in (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)))


BOUND = "bound: fitted on the test's good parts"


def test_fitted(test: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """The threshold that flags at most `fpr` of the test's good parts: what the best model of
    normal scores could reach with this image score (a bound for comparing rules, not a model)."""
    good = np.sort(test[~labels])
    return float(good[len(good) - 1 - int(np.floor(fpr * len(good)))])


def choose(table: dict, others: list[str], fpr: float, tolerance: float) -> str:
    """The model of the rule in the module doc, chosen on the categories `others`."""
    mean = {m: np.mean([table[(m, o)] for o in others], axis=0) for m in MODELS}
    return lowest_rate_best(MODELS, mean.__getitem__, fpr + tolerance)


def evaluate(rows: list[dict], fpr: float, tolerance: float) -> None:
    for shots in sorted({r["shots"] for r in rows}):
        for rule in sorted({r.get("rule", "top1") for r in rows}):
            print(f"\n## {shots} shot(s), image score {rule}")
            evaluate_shots([r for r in rows if r["shots"] == shots and r.get("rule", "top1") == rule], fpr, tolerance)


def evaluate_shots(rows: list[dict], fpr: float, tolerance: float) -> None:
    out: dict = {}
    for r in rows:
        test, labels = np.asarray(r["test"]), np.asarray(r["labels"], bool)
        for m in (*MODELS, BOUND):
            t = test_fitted(test, labels, fpr) if m == BOUND else threshold(m, r["normal"], fpr)
            out.setdefault((r["category"], r["strategy"], m), []).append(
                (np.mean(test[~labels] > t), np.mean(test[labels] > t)))
    categories = sorted({r["category"] for r in rows})
    strategies = sorted({r["strategy"] for r in rows})
    print(f"\ntarget false-positive rate {fpr}: test FPR / recall per model (mean over seeds and strategies)")
    print("| model | " + " | ".join(categories) + " | mean |")
    print("|---|" + "---|" * (len(categories) + 1))
    table = {}
    for m in (*MODELS, BOUND):
        cells = []
        for c in categories:
            vals = np.array([v for s in strategies for v in out[(c, s, m)]])
            table[(m, c)] = vals.mean(axis=0)
            cells.append(f"{vals[:, 0].mean():.3f} / {vals[:, 1].mean():.2f}")
        allv = np.array([table[(m, c)] for c in categories])
        print(f"| {m} | " + " | ".join(cells) + f" | {allv[:, 0].mean():.3f} / {allv[:, 1].mean():.2f} |")
    print(f"\nleave-one-category-out: model chosen on the other categories (highest recall with mean FPR "
          f"<= {fpr + tolerance:.3f})")
    chosen = []
    for c in categories:
        others = [o for o in categories if o != c]
        best = choose(table, others, fpr, tolerance)
        chosen.append(table[(best, c)])
        print(f"- {c}: chose {best} on {', '.join(others)} -> FPR {chosen[-1][0]:.3f}, recall {chosen[-1][1]:.2f}")
    print(f"mean over held-out categories: FPR {np.mean([v[0] for v in chosen]):.3f}, "
          f"recall {np.mean([v[1] for v in chosen]):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="how far above the target a model's mean FPR may be to be chosen (default 0.02)")
    parser.add_argument("--strategies", nargs="+", default=["semantic", "subspace"])
    parser.add_argument("--image-scores", nargs="+", default=list(MAP_SCORE_RULES), choices=MAP_SCORE_RULES)
    parser.add_argument("--out", type=Path, default=Path("runs/thresholds.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these recorded runs together")
    args = parser.parse_args()
    rows = recorded_rows(args.rows) if args.rows else cached_rows(
        args.out, lambda: collect(args.data, args.shots, args.seeds, args.max_test, args.strategies,
                                                args.image_scores))
    evaluate(rows, args.fpr, args.tolerance)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
