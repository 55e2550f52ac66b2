"""Does the test batch's own evidence (MuSc-style mutual scoring) help the few-shot semantic expert?

A patch far from every normal reference may still be normal: a variation the few shots do not
show but most other parts of the batch do. This probe scores each test patch by
  - `semantic`: its cosine distance to the nearest normal reference (the few-shot expert, its
    self-match off);
  - `mutual`: the zero-shot mutual score within its batch (experts/mutual.py, no shot used);
  - `min`: the smaller of the two (a normal look-alike in the shots OR in most of the batch);
  - `mean`: their average;
  - `self`: its cosine distance to the k-th nearest patch (`--self-k`) of its OWN image farther
    than SELF_RADIUS patches away (experts/semantic.py; a batch of one: a structure the shots
    lack but the part repeats, a pad, a thread, a texture, is normal; a defect is usually unique);
  - `min_self`: the smaller of `semantic` and `self`; `mean_self`: the mean of `semantic` and
    `min_self`, which is the semantic expert's self-match (`self_discount`, `self_match` k);
on seeded random batches of BATCH test images, with the shared protocol (evaluation grid, blur,
top-1% image score), and prints image AUROC / pixel AUROC / AUPRO per category and the rule a
leave-one-category-out choice makes (best mean image AUROC on the other categories).

Test features are extracted once per category and kept in --cache (float16), so reruns are cheap.

The development test sets are 60-80% defective, the opposite of a production batch, where the mutual
evidence's assumption (defects are rare) holds. `--defect-share 0.1` composes the batches like a
line's: every defective image is scored in a batch of round(0.1 x BATCH) defective images and good
ones, and every good image in a batch of good ones plus that many defective images.

    OMP_NUM_THREADS=1 python benchmarks/batch_evidence.py --data ../shared/data --shots 1 4 \
        --seeds 0 1 2 --cache runs/feature_cache --out runs/batch_evidence.json
    python benchmarks/batch_evidence.py --rows runs/batch_evidence.json runs/batch_evidence_gen.json

The self-match's k: `--self-k 1 2 4 8 --rules semantic mean_self` scores each self rule once per k
(one fit and kNN pass per cell serve them all); a self rule is labelled with its k (`mean_self
k8`, also across runs reported together with `--rows`), so the leave-one-category-out choice is
among the k values.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from astfad.benchmark import category_aspect, load_test_set
from astfad.config import DetectorConfig
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.experts.mutual import mutual_distances, split_batches
from astfad.experts.semantic import self_discount, self_match_distances
from astfad.scoring import image_scores, to_eval_grid
from cached_rows import cached_rows, recorded_rows
from protocol import held_out_best

BATCH = 32
RULES = ("semantic", "mutual", "min", "mean", "self", "min_self", "mean_self")
SELF_RULES = {"self", "min_self", "mean_self"}
BATCH_RULES = {"mutual", "min", "mean"}


def test_features(det: Detector, tests, cache: Path, name: str) -> torch.Tensor:
    path = cache / f"{name}_semantic.pt"
    if path.is_file():
        return torch.load(path).float()
    feats = torch.cat([det.features("semantic", tests.images[i:i + 16], tests.keys[i:i + 16])
                       for i in range(0, len(tests.images), 16)])
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(feats.half(), path)
    return feats


def batch_mutual(feats: torch.Tensor, labels: np.ndarray, rng: np.random.Generator,
                 defect_share: float | None) -> torch.Tensor:
    """(N, h, w) mutual scores of every test image within its batch (see the module doc)."""
    n = len(labels)
    mutual = torch.empty(n, *feats.shape[-2:])
    if defect_share is None:
        for batch in split_batches(rng.permutation(n).tolist(), BATCH):
            mutual[batch] = mutual_distances(feats[batch])
        return mutual
    good, bad = np.flatnonzero(labels == 0), rng.permutation(np.flatnonzero(labels == 1))
    k = max(1, round(defect_share * BATCH))
    for start in range(0, len(bad), k):  # each defective image among good parts
        scored = bad[start:start + k].tolist()
        batch = scored + rng.choice(good, min(len(good), BATCH - len(scored)), replace=False).tolist()
        mutual[scored] = mutual_distances(feats[batch])[:len(scored)]
    for chunk in np.array_split(rng.permutation(good), max(1, -(-len(good) // (BATCH - k)))):
        batch = chunk.tolist() + rng.choice(bad, min(len(bad), k), replace=False).tolist()
        mutual[chunk.tolist()] = mutual_distances(feats[batch])[:len(chunk)]
    return mutual


def collect(data: Path, shots: list[int], seeds: list[int], cache: Path, defect_share: float | None,
            rules: list[str], categories: list[str] | None, self_ks: list[int]) -> list[dict]:
    rows = []
    for category in scan_dataset(data):
        if categories and category.name not in categories:
            continue
        aspect = category_aspect(category)
        probe = Detector("semantic", aspect_ratio=aspect, self_match=0)
        probe.aspect = aspect
        tests = load_test_set(category, probe.eval_grid(), print)
        feats = test_features(probe, tests, cache, category.name)
        grid, n = probe.eval_grid(), len(tests.labels)
        owns = {j: self_match_distances(feats, j) for j in self_ks} if SELF_RULES & set(rules) else {}
        for seed in seeds:
            mutual = batch_mutual(feats, tests.labels, np.random.default_rng(seed), defect_share) \
                if BATCH_RULES & set(rules) else None
            for k in shots:
                train = [s.path for s in sample_shots(category.train, k, seed, "random")]
                det = Detector("semantic", aspect_ratio=aspect, seed=seed, self_match=0).fit(train)
                fewshot = torch.cat([det.experts["semantic"].distances(feats[i:i + 32]) for i in range(0, n, 32)])
                patch = {"semantic": lambda own: fewshot, "mutual": lambda own: mutual,
                         "min": lambda own: torch.minimum(fewshot, mutual), "mean": lambda own: (fewshot + mutual) / 2,
                         "self": lambda own: own, "min_self": lambda own: torch.minimum(fewshot, own),
                         "mean_self": lambda own: self_discount(fewshot, own)}
                # each self rule once per k (one fit and one kNN pass serve every k)
                for rule, self_k in [(r, j) for r in rules for j in (self_ks if r in SELF_RULES else [None])]:
                    raw = patch[rule](owns.get(self_k))
                    maps = to_eval_grid(raw, grid, det.config.blur_sigma)
                    scores = image_scores(maps, "top1", det.score_border).numpy()
                    metrics = tests.metrics(scores, maps.numpy())
                    rows.append({"category": category.name, "shots": k, "seed": seed, "rule": rule,
                                 **({"self_k": self_k} if self_k is not None else {}),
                                 **{m: metrics[m] for m in ("image_auroc", "pixel_auroc", "aupro")}})
                print(category.name, k, seed, flush=True)
    return rows


def label(row: dict) -> str:
    """The row's rule, with its self-match k where it has one: runs with several `--self-k`
    reported together (`--rows`) compare the k values as rules."""
    return f"{row['rule']} k{row['self_k']}" if "self_k" in row else row["rule"]


def report(rows: list[dict]) -> None:
    categories = sorted({r["category"] for r in rows})
    rules = sorted({label(r) for r in rows}, key=lambda name: (RULES.index(name.split()[0]), name))
    for k in sorted({r["shots"] for r in rows}):
        value = {}
        for c in categories:
            for rule in rules:
                cells = [r for r in rows if r["category"] == c and r["shots"] == k and label(r) == rule]
                value[(c, rule)] = [100 * float(np.mean([r[m] for r in cells]))
                                    for m in ("image_auroc", "pixel_auroc", "aupro")]
        print(f"\n{k} shot(s), batches of {BATCH}: image AUROC / pixel AUROC / AUPRO (%, mean over seeds)")
        print("| rule | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for rule in rules:
            cells = [value[(c, rule)] for c in categories]
            mean = np.mean(cells, axis=0)
            print(f"| {rule} | " + " | ".join("/".join(f"{v:.1f}" for v in cell) for cell in cells)
                  + " | " + "/".join(f"{v:.1f}" for v in mean) + " |")
        held = []
        for c, best in held_out_best(categories, rules, lambda o, r: value[(o, r)][0]).items():
            held.append(value[(c, best)][0])
            print(f"- {c}: {best} chosen on the others -> image AUROC {held[-1]:.1f}")
        print(f"mean held-out image AUROC {np.mean(held):.1f} vs semantic "
              f"{np.mean([value[(c, 'semantic')][0] for c in categories]):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=Path("runs/feature_cache"))
    parser.add_argument("--out", type=Path, default=Path("runs/batch_evidence.json"))
    parser.add_argument("--defect-share", type=float, default=None,
                        help="compose batches with this share of defective images (default: random batches)")
    parser.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    parser.add_argument("--categories", nargs="+", default=None, help="default: every category")
    parser.add_argument("--self-k", type=int, nargs="+", default=[DetectorConfig().self_match],
                        help="the self rules' k-th nearest patch, one or more values compared as rules "
                             "(default: the detector's self_match)")
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these recorded runs together")
    args = parser.parse_args()
    if args.rows:
        rows = recorded_rows(args.rows)
    else:
        rows = cached_rows(args.out, lambda: collect(args.data, args.shots, args.seeds, args.cache,
                                                     args.defect_share, args.rules, args.categories, args.self_k))
    report(rows)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
