"""Time astfad.metrics on a category-sized case: 100 images at 256 x 256 with blob masks.

    python benchmarks/metrics.py [--images 100] [--size 256] [--sklearn]

Prints seconds per metric and for `evaluate` (which sorts the pixel scores once for all pixel
metrics). `--sklearn` also times scikit-learn's pixel AUROC/AP for comparison.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from astfad import metrics


def make_case(n_images: int, size: int, seed: int = 0):
    """Half the images normal; the others carry a few smooth blobs with brighter map values."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images // 2, n_images):
        field = ndimage.gaussian_filter(rng.standard_normal((size, size)), size / 32)
        masks[i] = field > np.quantile(field, 1 - rng.uniform(0.005, 0.08))
    noise = ndimage.gaussian_filter(rng.standard_normal(masks.shape).astype(np.float32), (0, 2, 2))
    maps = noise + masks * rng.uniform(0.0, 0.6, masks.shape).astype(np.float32)
    labels = masks.reshape(n_images, -1).any(1)
    scores = maps.reshape(n_images, -1).max(1) + rng.normal(0.0, 0.3, n_images)
    return labels, scores, masks, maps


def timed(name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    shown = f"{value:.4f}" if isinstance(value, float) else ""
    print(f"{name:<32} {seconds:7.3f} s  {shown}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sklearn", action="store_true", help="also time scikit-learn pixel metrics")
    args = parser.parse_args()

    labels, scores, masks, maps = make_case(args.images, args.size)
    print(f"{args.images} images of {args.size}x{args.size} = {masks.size / 1e6:.2f} M pixels, "
          f"{masks.mean():.2%} anomalous")
    timed("image_auroc", metrics.image_auroc, labels, scores)
    timed("average_precision", metrics.average_precision, labels, scores)
    timed("f1_max", metrics.f1_max, labels, scores)
    timed("pixel_auroc", metrics.pixel_auroc, masks, maps)
    timed("pixel_average_precision", metrics.pixel_average_precision, masks, maps)
    timed("pixel_f1_max", metrics.pixel_f1_max, masks, maps)
    timed("aupro (exact)", metrics.aupro, masks, maps)
    timed("aupro (num_thresholds=200)", metrics.aupro, masks, maps, num_thresholds=200)
    result = timed("evaluate (all metrics)", metrics.evaluate, labels, scores, masks, maps)
    print("  " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    if args.sklearn:
        from sklearn.metrics import average_precision_score, roc_auc_score
        timed("sklearn roc_auc_score (pixels)", lambda: float(roc_auc_score(masks.ravel(), maps.ravel())))
        timed("sklearn average_precision (pixels)",
              lambda: float(average_precision_score(masks.ravel(), maps.ravel())))


if __name__ == "__main__":
    main()
