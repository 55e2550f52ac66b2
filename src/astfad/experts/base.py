"""The expert protocol: patch features of normal images in, a patch distance map out.

Every expert of astfad is a nearest-neighbour expert over a memory bank; they differ in the
features (CNN stages or ViT tokens), the metric, the bank size and an optional learned transform.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from astfad.memory import MemoryBank


Exclusions = Sequence[int | torch.Tensor | None] | None
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class TensorLayoutError(ValueError):
    """A saved tensor that does not fit its expert: `key` (without the expert's prefix) and why."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"tensor {key} {problem}")
        self.key, self.problem = key, problem


def require_float(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
    """TensorLayoutError unless `tensors[key]` is a float tensor of `shape`."""
    if key not in tensors:
        raise TensorLayoutError(key, "is missing")
    got = tensors[key]
    if tuple(got.shape) != shape or not got.is_floating_point():
        raise TensorLayoutError(key, f"must be float {shape}, got {got.dtype} {tuple(got.shape)}")


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

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """The keys of a saved bank, checked: (N, D) float features and (N,) integer owners >= 0
        (TensorLayoutError otherwise)."""
        for key in ("bank", "owners"):
            if key not in tensors:
                raise TensorLayoutError(key, f"is missing (the memory bank of expert '{cls.name}')")
        bank, owners = tensors["bank"], tensors["owners"]
        if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0 or not bank.is_floating_point():
            raise TensorLayoutError("bank", f"must be a non-empty 2-D float tensor, got {bank.dtype} "
                                            f"{tuple(bank.shape)}")
        if owners.ndim != 1 or owners.shape[0] != bank.shape[0] or owners.dtype not in INT_DTYPES:
            raise TensorLayoutError("owners", f"must be 1-D integers, one per bank row ({bank.shape[0]}), "
                                              f"got {owners.dtype} {tuple(owners.shape)}")
        if int(owners.min()) < 0:
            raise TensorLayoutError("owners", "holds negative owners")
        return {"bank", "owners"}

    def tensors(self) -> dict[str, torch.Tensor]:
        bank = self._require_bank()
        return {"bank": bank.features, "owners": bank.owners}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        # the saved bank is already subsampled: no budget on reload
        self.bank = MemoryBank(tensors["bank"], tensors["owners"], self.metric)
