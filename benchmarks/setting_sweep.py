"""Which value of one detector setting serves the development categories best?

For every category, shot count, seed and value of --setting this fits one detector with every
strategy in --strategies (one fit per value, its experts shared by the strategies), maps the whole
test set and measures image AUROC (the configured image score), pixel AUROC and AUPRO (on every
second row and column of the evaluation grid, over the images with masks: 4x cheaper). Backbone
features are cached per category, so a setting that does not change them (blur_sigma,
subspace_variance, image_score, ...) costs one backbone pass per image in all. A value is then
chosen per strategy and shot count by leave-one-category-out (best mean image AUROC on the other
categories) and reported on the held-out one, next to the baseline value (today's default unless
--baseline says otherwise): the tuning protocol of benchmarks/README.md.

    OMP_NUM_THREADS=1 python benchmarks/setting_sweep.py --data ../shared/data --setting blur_sigma \
        --values 0 1 2 3 4 6 --shots 1 4 --seeds 0 1 2 --out runs/sweep_blur_real.json
    python benchmarks/setting_sweep.py --rows runs/sweep_blur_real.json runs/sweep_blur_gen.json

Rows are cached in --out (JSON): a rerun only re-evaluates; --rows pools several runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from astfad.config import DetectorConfig
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from cached_rows import cached_rows, recorded_rows
from protocol import held_out_best, probe_test_set, strided_metrics

MEASURES = ("image_auroc", "pixel_auroc", "aupro")
GRID_SETTINGS = ("eval_size", "aspect_ratio")  # the test masks are read once, on today's grid


def collect(data: Path, shots: list[int], seeds: list[int], strategies: list[str], setting: str,
            values: list[Any]) -> list[dict]:
    rows = []
    for category in scan_dataset(data):
        aspect, tests, strided = probe_test_set(category)
        cache: dict = {}
        for k in shots:
            for seed in seeds:
                train = [s.path for s in sample_shots(category.train, k, seed, "random")]
                for value in values:
                    det = Detector(strategies[0], cache=cache, aspect_ratio=aspect, seed=seed, **{setting: value})
                    det.fit(train, also=strategies[1:])
                    feats, expert_maps = det.maps_of(tests.images, tests.keys, "all")
                    for strategy in strategies:
                        maps = det.combine(strategy, expert_maps)
                        scores = det.scores(strategy, maps, feats.get("texture")).numpy()
                        metrics = strided_metrics(strided, scores, maps)
                        rows.append({"category": category.name, "shots": k, "seed": seed, "strategy": strategy,
                                     "setting": setting, "value": value, **{m: metrics[m] for m in MEASURES}})
                print(category.name, k, seed, flush=True)
    return rows


def report(rows: list[dict], baseline: Any = None) -> None:
    settings = sorted({r["setting"] for r in rows})
    if len(settings) != 1:
        raise SystemExit(f"rows of one setting at a time, got {settings}")
    setting = settings[0]
    categories = sorted({r["category"] for r in rows})
    values = sorted({r["value"] for r in rows}, key=lambda v: (str(type(v)), v))
    if baseline is None:
        baseline = getattr(DetectorConfig(), setting)
    for strategy in sorted({r["strategy"] for r in rows}):
        for k in sorted({r["shots"] for r in rows}):
            cells = [r for r in rows if r["strategy"] == strategy and r["shots"] == k]

            def mean(category: str, value: Any, measure: str = "image_auroc") -> float:
                return 100 * float(np.mean([r[measure] for r in cells if r["category"] == category and r["value"] == value]))

            print(f"\n{strategy}, {k} shot(s): image AUROC per category / mean image, pixel AUROC, AUPRO (%, mean over seeds)")
            print(f"| {setting} | " + " | ".join(categories) + " | mean |")
            print("|---|" + "---|" * (len(categories) + 1))
            for v in values:
                means = [np.mean([mean(c, v, m) for c in categories]) for m in MEASURES]
                print(f"| {v} | " + " | ".join(f"{mean(c, v):.1f}" for c in categories)
                      + " | " + " / ".join(f"{x:.1f}" for x in means) + " |")
            chosen = held_out_best(categories, values, lambda c, v: mean(c, v))
            print("leave-one-category-out: " + ", ".join(f"{c} {chosen[c]}" for c in categories))
            held = [np.mean([mean(c, chosen[c], m) for c in categories]) for m in MEASURES]
            line = "held-out " + " / ".join(f"{x:.1f}" for x in held)
            if baseline in values:
                base = [np.mean([mean(c, baseline, m) for c in categories]) for m in MEASURES]
                line += f" against {setting} {baseline}: " + " / ".join(f"{x:.1f}" for x in base)
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--setting", help="a DetectorConfig field, e.g. blur_sigma")
    parser.add_argument("--values", nargs="+", type=yaml.safe_load, help="values of --setting (YAML scalars)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["semantic", "subspace"])
    parser.add_argument("--baseline", type=yaml.safe_load, help="the value to compare with (default: today's)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these cached runs together")
    args = parser.parse_args()
    if args.rows:
        rows = recorded_rows(args.rows)
    else:
        if not args.setting or not args.values:
            parser.error("--setting and --values are needed to collect rows (or --rows to report)")
        if args.setting in GRID_SETTINGS:
            parser.error(f"--setting {args.setting} changes the evaluation grid, which this sweep keeps fixed")
        rows = cached_rows(args.out, lambda: collect(args.data, args.shots, args.seeds, args.strategies,
                                                     args.setting, args.values))
    report(rows, args.baseline)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
