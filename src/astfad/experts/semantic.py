"""Semantic expert: DINOv2 patch tokens, cosine nearest-neighbour distance to the normal
patches (AnomalyDINO), discounted by the image's own look-alikes (self-match), with optional PCA
background masking of test images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from astfad.experts.base import KNNExpert, TensorLayoutError, flatten_patches, require_float

SELF_RADIUS = 3  # patches this close (Chebyshev, in grid steps) are a patch's own surroundings
SELF_WEIGHT = 0.5  # the share of a distance's excess over the self-match distance given up
SELF_CHUNK = 32  # images per similarity block (32 x 1024^2 floats at 448 px: 128 MiB)


def self_match_distances(feats: torch.Tensor, k: int, radius: int = SELF_RADIUS,
                         chunk: int | None = SELF_CHUNK) -> torch.Tensor:
    """(B, h, w): each patch's cosine distance to its k-th nearest patch of the same image among
    those more than `radius` patches away, so that a patch never meets itself or its neighbours and
    a defect must repeat k times on the part to look normal (2, the largest cosine distance, where
    the image has fewer than k such patches). Images go `chunk` at a time to bound the similarity
    blocks; None takes the batch in one product (the exported graph, which must keep a dynamic
    batch and so cannot trace a loop over it)."""
    if chunk is not None and len(feats) > chunk:
        return torch.cat([self_match_distances(feats[i:i + chunk], k, radius, None)
                          for i in range(0, len(feats), chunk)])
    b, d, h, w = feats.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=feats.device), torch.arange(w, device=feats.device),
                            indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    near = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    patches = F.normalize(feats.float().reshape(b, d, h * w), dim=1)
    sim = torch.bmm(patches.transpose(1, 2), patches).masked_fill(near, -1.0)
    kth = sim.topk(min(k, h * w), dim=2).values[..., -1]
    return (1.0 - kth).clamp_min(0.0).reshape(b, h, w)


def self_discount(dist: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Distances `dist` less SELF_WEIGHT of their excess over the self-match distances `own`:
    never raised, and a patch with no look-alike on its part keeps its distance."""
    return dist - SELF_WEIGHT * (dist - own.to(dist.dtype)).clamp_min(0.0)


class SemanticExpert(KNNExpert):
    name = "semantic"

    def __init__(self, mask_background: bool = False, seed: int = 0, self_match: int = 0) -> None:
        super().__init__("cosine", budget=None, seed=seed)
        self.mask_background = mask_background
        self.self_match = self_match
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

    def self_discounted(self, feats: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """`dist` (B, h, w) less SELF_WEIGHT of its excess over the self-match distance (unchanged
        with `self_match` 0): the same on test, normal and validation images, none of which meets
        its own patch or its neighbours."""
        return self_discount(dist, self_match_distances(feats, self.self_match)) if self.self_match else dist

    def distances(self, feats: torch.Tensor,
                  exclude: Sequence[int | None] | None = None) -> torch.Tensor:
        dist = self.self_discounted(feats, super().distances(feats, exclude))
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
