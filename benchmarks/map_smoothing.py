"""How much should the anomaly maps be smoothed (`blur_sigma`) before they are scored?

PatchCore's Gaussian (sigma 4 on a 256 px grid) is the default, inherited, never chosen here. A
wide blur hides a defect of a few pixels (a pin-hole on a board) in its surroundings; no blur
leaves the patch grid's blocks and single noisy patches. For every category, shot count and seed
this fits one detector with every strategy in --strategies (one fit, its experts shared), maps
the whole test set once unsmoothed, and scores the maps smoothed with each sigma in --sigmas
(image AUROC of the top-1% rule; pixel AUROC and AUPRO on every second row and column of the
evaluation grid, 4x cheaper, over the images with masks). Smoothing is linear, so blurring the
normalised map equals normalising the blurred one: one mapping serves every sigma. A sigma is then
chosen per strategy by leave-one-category-out (best mean image AUROC on the other categories) and
reported on the held-out one.

    OMP_NUM_THREADS=1 python benchmarks/map_smoothing.py --data ../shared/data --shots 1 4 \
        --seeds 0 1 2 --out runs/smoothing_real.json
    python benchmarks/map_smoothing.py --rows runs/smoothing_real.json runs/smoothing_gen.json

Rows are cached in --out (JSON): a rerun only re-evaluates; --rows pools several runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from astfad.benchmark import category_aspect, load_test_set
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.metrics import evaluate
from astfad.scoring import gaussian_blur, image_scores
from cached_rows import cached_rows
from protocol import held_out_best

MEASURES = ("image_auroc", "pixel_auroc", "aupro")
PIXEL_STRIDE = 2


def collect(data: Path, shots: list[int], seeds: list[int], strategies: list[str], sigmas: list[float]) -> list[dict]:
    rows = []
    for category in scan_dataset(data):
        aspect = category_aspect(category)
        cache: dict = {}
        probe = Detector(strategies[0], cache=cache, aspect_ratio=aspect)
        probe.aspect = aspect
        tests = load_test_set(category, probe.eval_grid(), print)
        valid = torch.from_numpy(tests.pixel_valid)
        masks = tests.masks[tests.pixel_valid][:, ::PIXEL_STRIDE, ::PIXEL_STRIDE]
        for k in shots:
            for seed in seeds:
                train = [s.path for s in sample_shots(category.train, k, seed, "random")]
                det = Detector(strategies[0], cache=cache, aspect_ratio=aspect, seed=seed, blur_sigma=0.0)
                det.fit(train, also=strategies[1:])
                feats = det.extract(tests.images, tests.keys, "all")
                expert_maps = det.expert_maps(feats)
                for strategy in strategies:
                    raw = det.combine(strategy, expert_maps)
                    for sigma in sigmas:
                        maps = gaussian_blur(raw, sigma)
                        scores = image_scores(maps).numpy()
                        pixel = evaluate(tests.labels[tests.pixel_valid], scores[tests.pixel_valid], masks,
                                         maps[valid][:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].numpy())
                        metrics = {**evaluate(tests.labels, scores), "pixel_auroc": pixel["pixel_auroc"],
                                   "aupro": pixel["aupro"]}
                        rows.append({"category": category.name, "shots": k, "seed": seed, "strategy": strategy,
                                     "sigma": sigma, **{m: metrics[m] for m in MEASURES}})
                print(category.name, k, seed, flush=True)
    return rows


def report(rows: list[dict]) -> None:
    categories = sorted({r["category"] for r in rows})
    sigmas = sorted({r["sigma"] for r in rows})
    default = 4.0 if 4.0 in sigmas else sigmas[0]
    for strategy in sorted({r["strategy"] for r in rows}):
        for k in sorted({r["shots"] for r in rows}):
            cells = [r for r in rows if r["strategy"] == strategy and r["shots"] == k]

            def mean(category: str, sigma: float, measure: str = "image_auroc") -> float:
                return 100 * float(np.mean([r[measure] for r in cells if r["category"] == category and r["sigma"] == sigma]))

            print(f"\n{strategy}, {k} shot(s): image AUROC per category / mean image, pixel AUROC, AUPRO (%, mean over seeds)")
            print("| sigma | " + " | ".join(categories) + " | mean |")
            print("|---|" + "---|" * (len(categories) + 1))
            for s in sigmas:
                means = [np.mean([mean(c, s, m) for c in categories]) for m in MEASURES]
                print(f"| {s:g} | " + " | ".join(f"{mean(c, s):.1f}" for c in categories)
                      + " | " + " / ".join(f"{v:.1f}" for v in means) + " |")
            chosen = held_out_best(categories, sigmas, lambda c, s: mean(c, s))
            held = {m: [mean(c, chosen[c], m) for c in categories] for m in MEASURES}
            base = {m: [mean(c, default, m) for c in categories] for m in MEASURES}
            print("leave-one-category-out: " + ", ".join(f"{c} {chosen[c]:g}" for c in categories))
            print("held-out " + " / ".join(f"{np.mean(held[m]):.1f}" for m in MEASURES)
                  + f" against sigma {default:g}: " + " / ".join(f"{np.mean(base[m]):.1f}" for m in MEASURES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=["semantic", "subspace"])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0, 6.0])
    parser.add_argument("--out", type=Path, default=Path("runs/smoothing.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these cached runs together")
    args = parser.parse_args()
    if args.rows:
        rows = [row for path in args.rows for row in json.loads(path.read_text())]
    else:
        rows = cached_rows(args.out, lambda: collect(args.data, args.shots, args.seeds, args.strategies, args.sigmas))
    report(rows)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
