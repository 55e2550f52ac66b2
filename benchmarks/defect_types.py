"""Which defect types carry a category's figures? Image / pixel AUROC and AUPRO per defect type.

A category's pixel AUROC pools every pixel of every test image, so a defect type whose masks cover
a quarter of the image outweighs ten types of pinholes. For each defect type this scores that
type's images together with all good ones, with the strategy's own maps and image-score rule
(`auto`'s validated choice included), and prints the mean over seeds next to the pooled figures
(pixel measures on every second row and column, as the other probes).

    OMP_NUM_THREADS=1 python benchmarks/defect_types.py --data ../shared/data --category magnetic_tile \
        --strategy semantic --shots 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.metrics import evaluate
from astfad.scoring import image_scores
from protocol import probe_test_set

MEASURES = ("image_auroc", "pixel_auroc", "aupro")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", required=True)
    parser.add_argument("--strategy", default="semantic")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    found = [c for c in scan_dataset(args.data) if c.name == args.category]
    if not found:
        raise SystemExit(f"{args.data}: no category named '{args.category}'")
    category = found[0]
    aspect, tests, strided = probe_test_set(category)
    types = np.array([s.defect_type for s in tests.samples])
    kinds = sorted(set(types) - {"good"})
    good = types == "good"
    figures: dict[str, list[list[float]]] = {kind: [] for kind in [*kinds, "all"]}
    cache: dict = {}
    for seed in args.seeds:
        train = [s.path for s in sample_shots(category.train, args.shots, seed, "random")]
        det = Detector(args.strategy, cache=cache, aspect_ratio=aspect, seed=seed).fit(train)
        _, expert_maps = det.maps_of(tests.images, tests.keys, "all")
        maps = det.combine(det.strategy, expert_maps)
        scores = image_scores(maps, det.image_score, det.score_border).numpy()
        maps = maps[:, ::2, ::2].numpy()
        for kind in figures:
            keep = np.ones(len(types), bool) if kind == "all" else good | (types == kind)
            result = evaluate(tests.labels[keep], scores[keep], strided.masks[keep], maps[keep])
            figures[kind].append([100 * result[m] for m in MEASURES])
        print(f"seed {seed}: {det.strategy}, image score {det.image_score}", flush=True)
    print(f"\n{category.name}, {args.strategy}, {args.shots} shot(s), {len(args.seeds)} seed(s); each type "
          f"with the {int(good.sum())} good images")
    print("| defect type | images | share of the image in the mask | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, values in figures.items():
        chosen = np.ones(len(types), bool) if kind == "all" else types == kind
        chosen &= ~good
        share = float(strided.masks[chosen].mean())
        mean = np.mean(values, axis=0)
        print(f"| {kind} | {int(chosen.sum())} | {share:.3f} | " + " | ".join(f"{v:.1f}" for v in mean) + " |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
