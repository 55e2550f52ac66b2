"""The expert protocol: patch features of normal images in, a patch distance map out.

Every expert of astfad is a nearest-neighbour expert over a memory bank; they differ in the
features (CNN stages or ViT tokens), the metric, the bank size and an optional learned transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from astfad.memory import MemoryBank


def flatten_patches(feats: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N * h * w, C), rows in image-major order."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


class KNNExpert:
    """Nearest-neighbour distance of each test patch to the normal patches."""

    name = "knn"

    def __init__(self, metric: str, budget: int | None = None, projection_dim: int = 128,
                 seed: int = 0) -> None:
        self.metric = metric
        self.budget = budget
        self.projection_dim = projection_dim
        self.seed = seed
        self.bank: MemoryBank | None = None

    def transform(self, feats: torch.Tensor) -> torch.Tensor:
        """Hook for experts that map features before the search (the adapter)."""
        return feats

    def fit(self, feats: torch.Tensor, owners: torch.Tensor) -> None:
        """Build the bank from normal features; `owners[i]` names the fitted image feats[i] came
        from (rotated views share their source's owner), for leave-one-out scoring."""
        patches = flatten_patches(self.transform(feats))
        per_image = feats.shape[2] * feats.shape[3]
        self.bank = MemoryBank(patches, owners.long().repeat_interleave(per_image), self.metric,
                               self.budget, self.projection_dim, self.seed)

    def _require_bank(self) -> MemoryBank:
        if self.bank is None:
            raise RuntimeError(f"the {self.name} expert is not fitted")
        return self.bank

    def distances(self, feats: torch.Tensor,
                  exclude: Sequence[int | None] | None = None) -> torch.Tensor:
        """(B, h, w) nearest-neighbour distances; `exclude[b]` leaves that owner's patches out
        of image b's search (leave-one-out), None searches the whole bank."""
        bank = self._require_bank()
        b, _, h, w = feats.shape
        queries = flatten_patches(self.transform(feats))
        if exclude is None or all(e is None for e in exclude):
            return bank.nearest(queries).reshape(b, h, w)
        out = torch.empty(b, h * w)
        per_owner = bank.nearest_per_owner(queries).reshape(b, h * w, -1)
        for i, owner in enumerate(exclude):
            dist = per_owner[i]
            if owner is not None:
                dist = dist.clone()
                dist[:, owner] = float("inf")
            out[i] = dist.min(dim=1).values
        return out.reshape(b, h, w)

    def tensors(self) -> dict[str, torch.Tensor]:
        bank = self._require_bank()
        return {"bank": bank.features, "owners": bank.owners}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # the saved bank is already subsampled: no budget on reload
        self.bank = MemoryBank(tensors["bank"], tensors["owners"], self.metric)
