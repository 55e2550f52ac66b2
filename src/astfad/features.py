"""Patch features of images for the experts: one backbone pass per image, cached by image key.

A `Featurizer` owns a frozen backbone and the expert-specific reading of its output (PatchCore's
pooled stages for the texture expert, L2-normalised ViT tokens for the semantic expert). A cache
shared between detectors lets a benchmark evaluate many strategies, shot counts and seeds from a
single pass of each backbone over each image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from astfad.config import grid_for
from astfad.data.images import to_batch

FeatureCache = dict[tuple, torch.Tensor]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Featurizer:
    """Images -> (N, C, h, w) patch features on the CPU, float32, in batches, with a cache."""

    def __init__(self, backbone: torch.nn.Module, size: int, multiple: int,
                 read: Callable[[torch.Tensor], torch.Tensor], identity: str,
                 device: torch.device, batch_size: int, cache: FeatureCache | None = None) -> None:
        self.backbone = backbone.to(device)
        self.size = size
        self.multiple = multiple
        self.read = read
        self.identity = identity
        self.device = device
        self.batch_size = batch_size
        self.cache = cache if cache is not None else {}

    def grid(self, aspect: float) -> tuple[int, int]:
        return grid_for(self.size, aspect, self.multiple)

    def __call__(self, images: Sequence[np.ndarray], aspect: float,
                 keys: Sequence[str | None] | None = None) -> torch.Tensor:
        grid = self.grid(aspect)
        keys = list(keys) if keys is not None else [None] * len(images)
        out: list[torch.Tensor | None] = [
            self.cache.get((self.identity, grid, key)) if key is not None else None for key in keys]
        todo = [i for i, feat in enumerate(out) if feat is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            batch = to_batch([images[i] for i in chunk], grid).to(self.device)
            with torch.inference_mode():
                feats = self.read(batch).float().cpu()
            for i, feat in zip(chunk, feats):
                out[i] = feat.clone()
                if keys[i] is not None:
                    self.cache[(self.identity, grid, keys[i])] = out[i]
        if not out:
            raise ValueError("no images to extract features from")
        return torch.stack(out)  # type: ignore[arg-type]


def texture_reader(backbone: torch.nn.Module, pool: int, max_dims: int | None) -> Callable:
    """PatchCore's features: each stage averaged over a pool x pool neighbourhood, the stride-16
    stage upsampled to the stride-8 grid, concatenated, and (if wider than max_dims) reduced by
    adaptive average pooling over channels, a fixed projection that needs no fitting."""

    def read(batch: torch.Tensor) -> torch.Tensor:
        stages = backbone(batch)
        s8, s16 = stages["s8"], stages["s16"]
        if pool > 1:
            s8 = F.avg_pool2d(s8, pool, stride=1, padding=pool // 2, count_include_pad=False)
            s16 = F.avg_pool2d(s16, pool, stride=1, padding=pool // 2, count_include_pad=False)
        s16 = F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)
        feats = torch.cat([s8, s16], dim=1)
        if max_dims is not None and feats.shape[1] > max_dims:
            b, c, h, w = feats.shape
            flat = feats.permute(0, 2, 3, 1).reshape(-1, 1, c)
            feats = F.adaptive_avg_pool1d(flat, max_dims).reshape(b, h, w, max_dims).permute(0, 3, 1, 2)
        return feats

    return read


def semantic_reader(backbone: torch.nn.Module, layers: Sequence[int]) -> Callable:
    """ViT patch tokens of the chosen blocks after the final LayerNorm, each block L2-normalised
    and concatenated, so every block weighs the same in the cosine distance."""

    def read(batch: torch.Tensor) -> torch.Tensor:
        tokens, _ = backbone.forward_tokens(batch, layers, norm=True)
        return torch.cat([F.normalize(t, dim=1) for t in tokens], dim=1)

    return read
