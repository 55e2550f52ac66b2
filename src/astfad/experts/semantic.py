"""Semantic expert: DINOv2 patch tokens, cosine nearest-neighbour distance to the normal
patches (AnomalyDINO), with optional PCA background masking of test images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from astfad.experts.base import KNNExpert, TensorLayoutError, flatten_patches, require_float


class SemanticExpert(KNNExpert):
    name = "semantic"

    def __init__(self, mask_background: bool = False, seed: int = 0) -> None:
        super().__init__("cosine", budget=None, seed=seed)
        self.mask_background = mask_background
        self.pca_mean: torch.Tensor | None = None
        self.pca_direction: torch.Tensor | None = None

    def fit(self, feats: torch.Tensor, owners: torch.Tensor) -> None:
        super().fit(feats, owners)
        if self.mask_background:
            self._fit_background(feats)

    def _fit_background(self, feats: torch.Tensor) -> None:
        """First principal component of the reference tokens, signed so that the image centre is
        foreground: on object categories it separates object from background (AnomalyDINO)."""
        x = flatten_patches(feats)
        mean = x.mean(0)
        _, _, v = torch.pca_lowrank(x - mean, q=1, center=False, niter=4)
        direction = v[:, 0]
        h, w = feats.shape[2:]
        centre = feats[:, :, h // 4: h - h // 4, w // 4: w - w // 4]
        if ((flatten_patches(centre) - mean) @ direction).mean() < 0:
            direction = -direction
        self.pca_mean, self.pca_direction = mean, direction

    def foreground(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, h, w) bool: patches on the object side of the first principal component."""
        b, _, h, w = feats.shape
        proj = (flatten_patches(feats) - self.pca_mean) @ self.pca_direction
        return (proj > 0).reshape(b, h, w)

    def distances(self, feats: torch.Tensor,
                  exclude: Sequence[int | None] | None = None) -> torch.Tensor:
        dist = super().distances(feats, exclude)
        if self.mask_background and self.pca_direction is not None:
            dist = dist * self.foreground(feats)
        return dist

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """The bank's keys, and the background PCA pair of (D,) vectors when saved."""
        keys = super().check_tensors(tensors)
        pca = [k for k in ("pca_mean", "pca_direction") if k in tensors]
        if len(pca) == 1:
            raise TensorLayoutError(pca[0], "comes without its PCA partner")
        for key in pca:
            require_float(tensors, key, (tensors["bank"].shape[1],))
        return keys | set(pca)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        if self.pca_direction is not None:
            out.update(pca_mean=self.pca_mean, pca_direction=self.pca_direction)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_tensors(tensors)
        self.pca_mean = tensors.get("pca_mean")
        self.pca_direction = tensors.get("pca_direction")
