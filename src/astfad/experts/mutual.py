"""Zero-shot mutual scoring (as in MuSc): no normal image at all, only a batch of unlabelled ones.

Anomalies are rare, so most of a patch's look-alikes in the OTHER images of a batch are normal.
Each patch gets, for every other image, its nearest-neighbour cosine distance to that image's
patches; the patch's score is the mean of the smallest `fraction` of those per-image distances (at
least `MIN_NEIGHBOURS` images). Taking a mean over several images rather than the single closest
one keeps a defect that a few other images share from vanishing, and an image is never matched
against itself.

`score_batch` puts a batch through the one scoring protocol (evaluation grid, blur, image-score
rule) and takes its thresholds from the batch itself, so `Detector.predict_zero_shot` and the
benchmark's `zero_shot` strategy score alike; `split_batches` is the batching both use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

from astfad.config import DetectorConfig
from astfad.experts.base import flatten_patches
from astfad.scoring import image_scores, to_eval_grid
from astfad.thresholds import ThresholdModel, typical_maps

MIN_BATCH = 8
MIN_NEIGHBOURS = 3
DEFAULT_FRACTION = 0.3
QUERY_ROWS = 4096

T = TypeVar("T")


def mutual_distances(feats: torch.Tensor, fraction: float = DEFAULT_FRACTION) -> torch.Tensor:
    """(B, h, w) zero-shot patch scores of a batch of (B, D, h, w) features (see module doc).

    Each pair of images is compared once: one similarity block gives both directions' nearest
    neighbours (its row maxima and its column maxima), half the products of one direction at a time."""
    b, _, h, w = feats.shape
    if b < MIN_BATCH:
        raise ValueError(f"zero-shot scoring needs a batch of at least {MIN_BATCH} images, got {b}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = h * w
    patches = F.normalize(flatten_patches(feats).float(), dim=1).reshape(b, n, -1)
    keep = min(b - 1, max(MIN_NEIGHBOURS, math.ceil(fraction * (b - 1))))
    # nearest[i, p, j]: cosine similarity of patch p of image i to its nearest patch of image j
    nearest = torch.full((b, n, b), -math.inf)
    for i in range(b - 1):
        later = b - 1 - i
        others = patches[i + 1:].reshape(-1, patches.shape[2])
        for start in range(0, n, QUERY_ROWS):
            query = patches[i, start:start + QUERY_ROWS]
            sim = (query @ others.T).reshape(len(query), later, n)
            nearest[i, start:start + len(query), i + 1:] = sim.amax(dim=2)
            back = sim.amax(dim=0)  # (later, n): images after i, nearest among these rows of i
            nearest[i + 1:, :, i] = torch.maximum(nearest[i + 1:, :, i], back)
    distance = (1.0 - nearest).clamp_min(0.0)  # an image against itself stays at +inf: never kept
    return distance.topk(keep, dim=2, largest=False).values.mean(dim=2).reshape(b, h, w)


def split_batches(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive batches of `max(size, MIN_BATCH)` items; a last batch under MIN_BATCH joins the
    one before (a single batch may stay short: the scorer then refuses it by name)."""
    size = max(size, MIN_BATCH)
    batches = [list(items[i:i + size]) for i in range(0, len(items), size)]
    if len(batches) > 1 and len(batches[-1]) < MIN_BATCH:
        batches[-2:] = [batches[-2] + batches[-1]]
    return batches


@dataclass
class BatchScores:
    """A zero-shot batch scored: (B, H, W) maps on the evaluation grid, (B,) image scores, and
    the image and pixel thresholds taken from the batch itself; `typical` are the maps of its
    more normal half (image score at most the median), what a display scale is fitted on."""

    maps: torch.Tensor
    scores: torch.Tensor
    threshold: float
    pixel_threshold: float
    typical: torch.Tensor


def score_batch(feats: torch.Tensor, grid: tuple[int, int], config: DetectorConfig,
                fraction: float = DEFAULT_FRACTION) -> BatchScores:
    """Score a batch of (B, D, h, w) semantic features against each other with the shared protocol
    (evaluation grid, blur, the top-1% rule unless `max` is configured: PatchCore's reweighting
    needs a bank). With no normal data the thresholds come from the batch, robustly: the image
    threshold from the median and MAD of its scores, the pixel threshold from the tail of its more
    normal half's pixels (manual thresholds in `config` win); a verdict means "unusual within this
    batch", which holds while defects are rare in it."""
    maps = to_eval_grid(mutual_distances(feats, fraction), grid, config.blur_sigma)
    scores = image_scores(maps, "max" if config.image_score == "max" else "top1",
                          config.score_border_pixels())
    model = ThresholdModel.fit_robust(scores, maps, config.seed)
    threshold = config.threshold if config.threshold is not None else model.image.threshold(config.target_fpr)
    pixel_threshold = config.pixel_threshold if config.pixel_threshold is not None else \
        model.pixel.threshold(config.pixel_target_fpr)
    return BatchScores(maps, scores, float(threshold), float(pixel_threshold), typical_maps(maps, scores))
