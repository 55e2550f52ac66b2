"""Does the pixel threshold hold the per-pixel false-positive rate it is asked for, and what do the
masks look like at stricter ones?

The pixel threshold is a generalised Pareto tail fitted to the normal maps' pixels (held-out shots
and views), read at `pixel_target_fpr` (0.1%). Held-out shots are quieter than new good parts, so
the benchmark's masks cover 0.5-0.6% of good parts' pixels at that target (README "Verdicts"). Here
the same fitted tail is read at the target divided by each factor of SCALES, and per (category,
shots, seed, strategy) the masks are measured on the test images: the share of good images' pixels
inside the mask (pixel FPR) and the mask IoU / Dice on the defective ones (`verdict_metrics`, as the
benchmark computes them; at most --max-test good and defective images, evaluation grid).

A factor is then chosen by leave-one-category-out at each shot count: the highest mean mask IoU on
the other categories among factors whose mean pixel FPR there is at most twice the target (the
lowest pixel FPR when none is), applied to the held-out category.

    OMP_NUM_THREADS=1 python benchmarks/pixel_threshold_models.py --data ../shared/data --shots 1 4 16 \
        --seeds 0 1 2 --out runs/pixel_thresholds.json
    python benchmarks/pixel_threshold_models.py --rows runs/pixel_thresholds.json runs/pixel_thresholds_gen.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from astfad.config import DetectorConfig, experts_of
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.metrics import verdict_metrics
from cached_rows import cached_rows, recorded_rows
from protocol import lowest_rate_best, probe_test_set

SCALES = (1, 2, 5, 10, 20, 50, 100)
MEASURES = ("pixel_fpr", "mask_iou", "mask_dice")


def collect(data: Path, shots: list[int], seeds: list[int], max_test: int, strategies: list[str]) -> list[dict]:
    rows = []
    target = DetectorConfig().pixel_target_fpr
    for category in scan_dataset(data):
        aspect, tests, _ = probe_test_set(category)
        rng = np.random.default_rng(0)
        good = np.flatnonzero(tests.labels == 0)
        bad = np.flatnonzero((tests.labels == 1) & tests.pixel_valid)
        pick = np.concatenate([np.sort(rng.choice(xs, min(max_test, len(xs)), replace=False)) for xs in (good, bad)])
        images, keys = [tests.images[i] for i in pick], [tests.keys[i] for i in pick]
        labels, masks = tests.labels[pick], tests.masks[pick]
        cache: dict = {}
        for k in shots:
            for seed in seeds:
                train = [s.path for s in sample_shots(category.train, k, seed)]
                det = Detector(strategies[0], cache=cache, seed=seed, aspect_ratio=aspect)
                det.fit(train, also=sorted({e for s in strategies for e in experts_of(s)}))
                _, maps = det.maps_of(images, keys, "all")
                for strategy in strategies:
                    tail = det.threshold_models[strategy].pixel
                    combined = det.combine(strategy, maps).numpy()
                    for scale in SCALES:
                        figures = verdict_metrics(labels, np.zeros(len(labels)), None, masks, combined,
                                                  tail.threshold(target / scale))
                        rows.append({"category": category.name, "shots": k, "seed": seed, "strategy": strategy,
                                     "scale": scale, **{m: figures[m] for m in MEASURES}})
                print(category.name, k, seed, flush=True)
    return rows


def evaluate(rows: list[dict], target: float) -> None:
    for shots in sorted({r["shots"] for r in rows}):
        cells = [r for r in rows if r["shots"] == shots]
        categories = sorted({r["category"] for r in cells})
        table = {(c, s): np.nanmean([[r[m] for m in MEASURES] for r in cells
                                     if r["category"] == c and r["scale"] == s], axis=0)
                 for c in categories for s in SCALES}
        print(f"\n## {shots} shot(s): pixel FPR / mask IoU / Dice (%) on the test images, the tail read at "
              f"{target:g} / factor (mean over seeds and strategies)")
        print("| factor | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for s in SCALES:
            values = [table[(c, s)] for c in categories]
            print(f"| {s} | " + " | ".join(f"{v[0]:.2%} / {100 * v[1]:.1f} / {100 * v[2]:.1f}" for v in values)
                  + f" | {np.mean([v[0] for v in values]):.2%} / {100 * np.mean([v[1] for v in values]):.1f} / "
                    f"{100 * np.mean([v[2] for v in values]):.1f} |")
        held = []
        for c in categories:
            others = [o for o in categories if o != c]
            mean = {s: np.mean([table[(o, s)] for o in others], axis=0) for s in SCALES}
            chosen = lowest_rate_best(SCALES, mean.__getitem__, 2 * target)
            held.append(table[(c, chosen)])
            print(f"- {c}: factor {chosen} chosen on the others -> pixel FPR {held[-1][0]:.2%}, "
                  f"IoU {100 * held[-1][1]:.1f}, Dice {100 * held[-1][2]:.1f}")
        print(f"held out: pixel FPR {np.mean([h[0] for h in held]):.2%}, IoU {100 * np.mean([h[1] for h in held]):.1f}, "
              f"Dice {100 * np.mean([h[2] for h in held]):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--strategies", nargs="+", default=["semantic", "subspace"])
    parser.add_argument("--out", type=Path, default=Path("runs/pixel_thresholds.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these recorded runs together")
    args = parser.parse_args()
    rows = recorded_rows(args.rows) if args.rows else cached_rows(
        args.out, lambda: collect(args.data, args.shots, args.seeds, args.max_test, args.strategies))
    evaluate(rows, DetectorConfig().pixel_target_fpr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
