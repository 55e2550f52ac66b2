"""Should the semantic expert's kNN distance be read relative to the density of the normal bank?

A test patch whose nearest normal patch is itself a rare one (an edge, a thread, a printed mark:
far from every other normal patch) gets a large distance although it is normal. Normalising by the
neighbour's own isolation, as local-outlier scores do, would lower such false alarms. For every
bank patch j, r_j = its cosine distance to the nearest bank patch of another owner (another shot,
or with one shot another quadrant), and a test patch with nearest neighbour j and distance d scores
  - `d`: today's semantic expert;
  - `d-0.5r`, `d-r`: the distance minus (half) the neighbour's isolation;
  - `d/(r+m)`: the ratio to it, m the bank's median r (a floor for dense neighbours).
Test images are read on the category's grid (not each on its own); maps and image scores follow
the shared protocol (top-1% mean, and the maximum in a fourth column), pixel measures on every
second row and column. Prints image / pixel AUROC / AUPRO per category and variant, and the
leave-one-category-out choice per shot count (best mean image AUROC on the other categories).

    OMP_NUM_THREADS=1 python benchmarks/knn_density.py --data ../shared/data --out runs/knn_density_real.json
    python benchmarks/knn_density.py --rows runs/knn_density_real.json runs/knn_density_gen.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.metrics import image_auroc
from astfad.scoring import image_scores, to_eval_grid
from cached_rows import cached_rows, recorded_rows
from protocol import held_out_best, probe_test_set, strided_metrics

VARIANTS = ("d", "d-0.5r", "d-r", "d/(r+m)")
CHUNK = 2048


def isolation(features: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """(N,) cosine distance of each bank row to its nearest row of another owner."""
    rows = F.normalize(features.float(), dim=1)
    out = torch.empty(len(rows))
    for start in range(0, len(rows), CHUNK):
        sims = rows[start:start + CHUNK] @ rows.T
        sims[owners[start:start + CHUNK, None] == owners[None, :]] = -1.0
        out[start:start + CHUNK] = 1.0 - sims.max(dim=1).values
    return out.clamp_min(0.0)


def variant_distances(det: Detector, feats: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, h, w) patch scores of every variant for test features (B, D, h, w)."""
    bank = det.experts["semantic"].bank
    r = isolation(bank.features, bank.owners)
    b, d, h, w = feats.shape
    dist, idx = bank.search(feats.permute(0, 2, 3, 1).reshape(-1, d), 1)
    dist, rn, median = dist[:, 0], r[idx[:, 0]], float(r.median())
    raw = {"d": dist, "d-0.5r": dist - 0.5 * rn, "d-r": dist - rn, "d/(r+m)": dist / (rn + median)}
    return {name: value.reshape(b, h, w) for name, value in raw.items()}


def collect(data: Path, shots: list[int], seeds: list[int]) -> list[dict]:
    rows = []
    for category in scan_dataset(data):
        aspect, tests, strided = probe_test_set(category)
        cache: dict = {}
        feats = None
        for k in shots:
            for seed in seeds:
                train = [s.path for s in sample_shots(category.train, k, seed, "random")]
                det = Detector("semantic", cache=cache, aspect_ratio=aspect, seed=seed).fit(train)
                if feats is None:
                    feats = torch.cat([det.features("semantic", tests.images[i:i + 16], tests.keys[i:i + 16])
                                       for i in range(0, len(tests.images), 16)])
                row = {"category": category.name, "shots": k, "seed": seed}
                for name, raw in variant_distances(det, feats).items():
                    maps = to_eval_grid(raw, det.eval_grid(), det.config.blur_sigma)
                    figures = strided_metrics(strided, image_scores(maps, "top1", det.score_border).numpy(), maps)
                    row[name] = [figures["image_auroc"], figures["pixel_auroc"], figures["aupro"],
                                 image_auroc(tests.labels, image_scores(maps, "max", det.score_border).numpy())]
                rows.append(row)
                print(category.name, k, seed, {n: round(100 * row[n][0], 1) for n in VARIANTS}, flush=True)
    return rows


def report(rows: list[dict]) -> None:
    categories = sorted({r["category"] for r in rows})
    for k in sorted({r["shots"] for r in rows}):
        value = {(c, v): 100 * np.mean([r[v] for r in rows if r["category"] == c and r["shots"] == k], axis=0)
                 for c in categories for v in VARIANTS}
        print(f"\n{k} shot(s): image AUROC per category; mean image / pixel AUROC / AUPRO / image AUROC (max)")
        print("| variant | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for v in VARIANTS:
            mean = np.mean([value[(c, v)] for c in categories], axis=0)
            print(f"| {v} | " + " | ".join(f"{value[(c, v)][0]:.1f}" for c in categories)
                  + " | " + " / ".join(f"{x:.1f}" for x in mean) + " |")
        chosen = held_out_best(categories, VARIANTS, lambda c, v: value[(c, v)][0])
        print("leave-one-category-out: " + ", ".join(f"{c} {chosen[c]}" for c in categories))
        print(f"held out {np.mean([value[(c, chosen[c])][0] for c in categories]):.1f}, "
              f"d {np.mean([value[(c, 'd')][0] for c in categories]):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/knn_density.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these recorded runs together")
    args = parser.parse_args()
    if args.rows:
        rows = recorded_rows(args.rows)
    else:
        rows = cached_rows(args.out, lambda: collect(args.data, args.shots, args.seeds))
    report(rows)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
