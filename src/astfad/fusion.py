"""Normalisers fitted on normal data only, and the fusion rules.

The seed paper min-max normalised each fused map on its own image, which erases the image score's
scale (every image gets a hot spot) and cancels one expert's signal with the other's noise. Here
each expert's smoothed map is normalised with statistics of NORMAL maps (held-out shots or
augmented views), the same for every test image, so a normal image stays low on both experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from astfad.config import experts_of, parse_strategy

MAD_TO_STD = 1.4826


@dataclass
class Normaliser:
    """Location and scale of an expert's normal map values, plus their median (> 0) for the
    multiplicative rule, which needs positive scores."""

    center: float
    scale: float
    median: float

    @classmethod
    def fit(cls, normal_maps: torch.Tensor, kind: str = "zscore") -> "Normaliser":
        values = normal_maps.flatten().double()
        if values.numel() == 0:
            raise ValueError("cannot fit a normaliser without normal maps")
        median = float(values.median())
        if kind == "robust":
            center = median
            scale = MAD_TO_STD * float((values - median).abs().median())
        else:
            center, scale = float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0
        eps = 1e-6 * max(abs(center), 1.0)
        return cls(center, max(scale, eps), max(median, eps))

    def standardise(self, maps: torch.Tensor) -> torch.Tensor:
        return (maps - self.center) / self.scale

    def ratio(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.clamp_min(0) / self.median

    def to_list(self) -> list[float]:
        return [self.center, self.scale, self.median]

    @classmethod
    def from_list(cls, values: list[float]) -> "Normaliser":
        return cls(*map(float, values))


def fuse(strategy: str, maps: dict[str, torch.Tensor], normalisers: dict[str, Normaliser]) -> torch.Tensor:
    """Combine a fusion's pair of experts' maps on one grid (alpha weighs the first, texture by
    default), each in units of its own normal statistics."""
    rule, alpha = parse_strategy(strategy)
    first, second = experts_of(strategy)
    a, b = maps[first], maps[second]
    if a.shape != b.shape:
        raise ValueError(f"maps must share one grid, got {tuple(a.shape)} and {tuple(b.shape)}")
    norm_a, norm_b = normalisers[first], normalisers[second]
    if rule == "fusion_mul":
        return norm_a.ratio(a) * norm_b.ratio(b)
    t, s = norm_a.standardise(a), norm_b.standardise(b)
    if rule == "fusion_add":
        return t + s
    if rule == "fusion_max":
        return torch.maximum(t, s)
    if rule == "fusion_weighted_sum":
        return alpha * t + (1 - alpha) * s
    raise ValueError(f"'{strategy}' is not a fusion strategy")
