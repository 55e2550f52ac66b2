"""Zero-shot mutual scoring (as in MuSc): no normal image at all, only a batch of unlabelled ones.

Anomalies are rare, so most of a patch's look-alikes in the OTHER images of a batch are normal.
Each patch gets, for every other image, its nearest-neighbour cosine distance to that image's
patches; the patch's score is the mean of the smallest `fraction` of those per-image distances (at
least `MIN_NEIGHBOURS` images). Taking a mean over several images rather than the single closest
one keeps a defect that a few other images share from vanishing, and an image is never matched
against itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from astfad.experts.base import flatten_patches

MIN_BATCH = 8
MIN_NEIGHBOURS = 3
DEFAULT_FRACTION = 0.3
QUERY_ROWS = 4096


def mutual_distances(feats: torch.Tensor, fraction: float = DEFAULT_FRACTION) -> torch.Tensor:
    """(B, h, w) zero-shot patch scores of a batch of (B, D, h, w) features (see module doc)."""
    b, _, h, w = feats.shape
    if b < MIN_BATCH:
        raise ValueError(f"zero-shot scoring needs a batch of at least {MIN_BATCH} images, got {b}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    patches = F.normalize(flatten_patches(feats).float(), dim=1).reshape(b, h * w, -1)
    keep = min(b - 1, max(MIN_NEIGHBOURS, math.ceil(fraction * (b - 1))))
    out = torch.empty(b, h * w)
    for i in range(b):
        others = torch.cat([patches[:i], patches[i + 1:]]).reshape(-1, patches.shape[2])
        for start in range(0, h * w, QUERY_ROWS):
            query = patches[i, start:start + QUERY_ROWS]
            nearest = (query @ others.T).reshape(len(query), b - 1, h * w).amax(dim=2)
            distance = (1.0 - nearest).clamp_min(0.0)
            out[i, start:start + QUERY_ROWS] = distance.topk(keep, dim=1, largest=False).values.mean(dim=1)
    return out.reshape(b, h, w)
