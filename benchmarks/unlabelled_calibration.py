"""Can thresholds be calibrated on unlabelled production parts, most of them good?

With one good part the normal evidence is views of that part, which agree far more than different
good parts do: the image threshold sits too low and 17% of good test parts are flagged (README,
"Verdicts and thresholds"). `astfad calibrate --normal` fixes that with more good parts, but a line
often has many parts that nobody has labelled. `calibrate --unlabelled` fits the image threshold
robustly (median and MAD, `ThresholdModel.fit_robust`), so that a minority of defective parts among
them moves it little.

This replays the rows of `threshold_models.py` (each cell's normal scores from the shots and its
test images' scores with labels): per cell and repeat, a calibration set is drawn from the test
images, half the good ones plus defective ones at a `--defect-rates` share of the set, and the
threshold is evaluated on the test images it did not see (the other good half and the remaining
defective ones). A category whose good half is under MIN_BATCH images (the least `calibrate
--unlabelled` accepts) is left out and named. Compared, at the same target false-positive rate:
the fitted model (the shots' held-out scores, today's default), `calibrate --normal` on the
calibration set's good parts only (labelled), and `calibrate --unlabelled` on the whole calibration
set. The model code is the library's (`astfad.thresholds`), so the figures are what the commands
would give on these image scores; the pixel threshold is not replayed (the rows hold no maps).
`--choose-widening` chooses each calibration's tail widening by leave-one-category-out instead
(the mean false-positive rate on the other categories closest to the target): how
CALIBRATION_WIDENING was chosen.

    python benchmarks/unlabelled_calibration.py --rows runs/thresholds_1.json runs/thresholds_gen_1.json
    python benchmarks/unlabelled_calibration.py --rows <real and generated rows at 1, 4, 16 shots> \
        --defect-rates 0 0.1 0.2 --choose-widening 1 1.25 1.5 1.75 2 2.5 --repeats 10
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from astfad.experts.mutual import MIN_BATCH
from astfad.thresholds import CALIBRATION_WIDENING, TAIL_WIDENING, ScoreModel
from cached_rows import recorded_rows

METHODS = ("fitted on the shots", "calibrate --normal (good parts only)", "calibrate --unlabelled")


def method_thresholds(row: dict, calibration: np.ndarray, good: np.ndarray, fpr: float,
                      widening: float | None = None) -> dict[str, float]:
    """Each method's image threshold for one cell and calibration set: the library's models
    (`Detector.fit`, `calibrate`, `calibrate --unlabelled`), or with `widening` for the two
    calibrations' tails instead of theirs."""
    return {METHODS[0]: ScoreModel.fit(np.asarray(row["normal"]), TAIL_WIDENING).threshold(fpr),
            METHODS[1]: ScoreModel.fit(calibration[good], widening or CALIBRATION_WIDENING).threshold(fpr),
            METHODS[2]: ScoreModel.fit_robust(calibration, widening or TAIL_WIDENING).threshold(fpr)}


def replay(rows: list[dict], rate: float, fpr: float, repeats: int,
           widening: float | None = None) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(category, method) -> (FPR, recall) on the held-out test images, per cell and repeat."""
    out: dict = {}
    for row in rows:
        scores, labels = np.asarray(row["test"], float), np.asarray(row["labels"], bool)
        goods, bads = np.flatnonzero(~labels), np.flatnonzero(labels)
        rng = np.random.default_rng([row["seed"], row["shots"], int(rate * 1000)])
        for _ in range(repeats):
            cal_good = rng.choice(goods, len(goods) // 2, replace=False)
            count = int(round(rate * len(cal_good) / (1 - rate)))
            cal_bad = rng.choice(bads, min(count, len(bads) - 1), replace=False)
            held_good = np.setdiff1d(goods, cal_good)
            held_bad = np.setdiff1d(bads, cal_bad)
            calibration = np.concatenate([scores[cal_good], scores[cal_bad]])
            is_good = np.arange(len(calibration)) < len(cal_good)
            for method, t in method_thresholds(row, calibration, is_good, fpr, widening).items():
                out.setdefault((row["category"], method), []).append(
                    (float(np.mean(scores[held_good] > t)), float(np.mean(scores[held_bad] > t))))
    return out


def choose_widening(rows: list[dict], categories: list[str], widenings: list[float], rates: list[float],
                    fpr: float, repeats: int) -> None:
    """For each calibration and held-out category: the widening whose mean false-positive rate on
    the other categories (shot counts and defect shares pooled) is closest to the target, and what
    it gives on the held-out category, next to the library's widening."""
    cells = {(w, shots, rate): replay([r for r in rows if r["shots"] == shots], rate, fpr, repeats, w)
             for w in widenings for shots in sorted({r["shots"] for r in rows}) for rate in rates}

    def mean(method: str, category: str, w: float, shots: int | None = None) -> np.ndarray:
        return np.mean([np.mean(table[(category, method)], axis=0) for (width, k, _), table in cells.items()
                        if width == w and shots in (None, k)], axis=0)

    for method in METHODS[1:]:
        print(f"\n## {method}: widening chosen on the other categories (mean FPR closest to {fpr:.0%})")
        chosen = {c: min(widenings, key=lambda w: abs(np.mean([mean(method, o, w)[0] for o in categories
                                                                 if o != c]) - fpr)) for c in categories}
        print("; ".join(f"{c} {w:g}" for c, w in chosen.items()))
        for shots in sorted({r["shots"] for r in rows}):
            held = np.mean([mean(method, c, chosen[c], shots) for c in categories], axis=0)
            today = np.mean([mean(method, c, TAIL_WIDENING, shots) for c in categories], axis=0)
            print(f"{shots} shot(s), held out: FPR {held[0]:.1%} / recall {held[1]:.0%}; "
                  f"widening {TAIL_WIDENING:g} (the shots'): {today[0]:.1%} / {today[1]:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=Path, nargs="+", required=True, help="threshold_models.py runs")
    parser.add_argument("--defect-rates", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2])
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rule", default="top1", help="the rows' image-score rule to replay (default top1)")
    parser.add_argument("--widening", type=float, default=None,
                        help="one image tail widening for both calibrations (default: the library's, "
                             f"{CALIBRATION_WIDENING:g} for good parts, {TAIL_WIDENING:g} for unsorted ones)")
    parser.add_argument("--choose-widening", type=float, nargs="+",
                        help="instead: choose each calibration's widening among these by leave-one-category-out")
    args = parser.parse_args()
    rows = [r for r in recorded_rows(args.rows) if r.get("rule", "top1") == args.rule]
    few = sorted({r["category"] for r in rows if (len(r["labels"]) - sum(r["labels"])) // 2 < MIN_BATCH})
    if few:
        print(f"left out, fewer than {2 * MIN_BATCH} good test images: {', '.join(few)}")
    rows = [r for r in rows if r["category"] not in few]
    categories = sorted({r["category"] for r in rows})
    if args.choose_widening:
        choose_widening(rows, categories, args.choose_widening, args.defect_rates, args.fpr, args.repeats)
        return
    for shots in sorted({r["shots"] for r in rows}):
        for rate in args.defect_rates:
            table = replay([r for r in rows if r["shots"] == shots], rate, args.fpr, args.repeats, args.widening)
            print(f"\n## {shots} shot(s), {rate:.0%} of the calibration set defective: held-out FPR / recall "
                  f"at a {args.fpr:.0%} target (mean over seeds, strategies, {args.repeats} draws)")
            print("| method | " + " | ".join(categories) + " | mean |")
            print("|---|" + "---|" * (len(categories) + 1))
            for method in METHODS:
                cells = [np.mean(table[(c, method)], axis=0) for c in categories]
                mean = np.mean(cells, axis=0)
                print(f"| {method} | " + " | ".join(f"{f:.1%} / {r:.0%}" for f, r in cells)
                      + f" | {mean[0]:.1%} / {mean[1]:.0%} |")


if __name__ == "__main__":
    main()
