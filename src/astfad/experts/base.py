"""The expert protocol: patch features of normal images in, a patch distance map out.

Every expert of astfad is a nearest-neighbour expert over a memory bank; they differ in the
features (CNN stages or ViT tokens), the metric, the bank size and an optional learned transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from astfad.memory import MemoryBank


Exclusions = Sequence[int | torch.Tensor | None] | None


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
        """Build the bank from normal features; `owners` names where each patch's content came
        from, per image (N,) or per patch (N, h, w), so that normal data can be scored without its
        own content (leave-one-out)."""
        patches = flatten_patches(self.transform(feats))
        owners = owners.long()
        if owners.ndim == 1:
            owners = owners[:, None, None].expand(-1, *feats.shape[2:])
        self.bank = MemoryBank(patches, owners.reshape(-1).clone(), self.metric,
                               self.budget, self.projection_dim, self.seed)

    def _require_bank(self) -> MemoryBank:
        if self.bank is None:
            raise RuntimeError(f"the {self.name} expert is not fitted")
        return self.bank

    def distances(self, feats: torch.Tensor, exclude: Exclusions = None) -> torch.Tensor:
        """(B, h, w) nearest-neighbour distances; `exclude[b]` leaves an owner's patches out of
        image b's search: one owner for the whole image, or an (h, w) owner per patch; None
        searches the whole bank."""
        bank = self._require_bank()
        b, _, h, w = feats.shape
        queries = flatten_patches(self.transform(feats))
        if exclude is None or all(e is None for e in exclude):
            return bank.nearest(queries).reshape(b, h, w)
        per_owner = bank.nearest_per_owner(queries).reshape(b, h * w, -1)
        for i, owner in enumerate(exclude):
            if owner is not None:
                columns = torch.as_tensor(owner, dtype=torch.long).reshape(-1).expand(h * w)
                keep = columns < per_owner.shape[2]  # an owner the (subsampled) bank lacks
                per_owner[i, keep.nonzero()[:, 0], columns[keep]] = float("inf")
        return per_owner.min(dim=2).values.reshape(b, h, w)

    def to(self, device: torch.device | str) -> "KNNExpert":
        """The expert searching its bank on another device (CUDA uses chunked matrix products)."""
        self.bank = self._require_bank().to(device)
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        bank = self._require_bank()
        return {"bank": bank.features, "owners": bank.owners}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # the saved bank is already subsampled: no budget on reload
        self.bank = MemoryBank(tensors["bank"], tensors["owners"], self.metric)
