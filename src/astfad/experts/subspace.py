"""Subspace expert (as in SubspaceAD): distance of each patch to the principal subspace of the
normal patch tokens. No bank to search: predict is the backbone forward plus one matrix product.

Per feature block (the semantic family concatenates `blocks` L2-normalised ViT blocks of equal
width), PCA of the normal tokens keeps the fewest components that explain
`variance` of the variance (at least `min_components`, which matters with one shot); a patch's
score is the norm of its residual outside the subspaces, summed in quadrature over blocks.

Leave-one-out costs almost nothing: the expert keeps, per owner, the sums that make up the mean
and covariance, so the subspace "without owner o" is the eigendecomposition of the totals minus
owner o's part, no refitting on data.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from astfad.experts.base import Exclusions, TensorLayoutError, flatten_patches, require_float

DEFAULT_VARIANCE = 0.99
MIN_COMPONENTS = 8


class SubspaceExpert:
    name = "subspace"

    def __init__(self, variance: float = DEFAULT_VARIANCE, min_components: int = MIN_COMPONENTS,
                 blocks: int = 1) -> None:
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"subspace variance must be in (0, 1], got {variance}")
        self.variance = variance
        self.min_components = min_components
        self.blocks = blocks
        self.mean: torch.Tensor | None = None  # (D,)
        self.basis: torch.Tensor | None = None  # (D, D) block-diagonal projector onto the residual
        self._counts: torch.Tensor | None = None  # per owner: (O,)
        self._sums: torch.Tensor | None = None  # (O, D)
        self._outer: torch.Tensor | None = None  # (O, D, D)
        self._held_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _blocks(self, dim: int) -> list[slice]:
        if dim % self.blocks:
            raise ValueError(f"feature width {dim} does not split into {self.blocks} equal blocks")
        step = dim // self.blocks
        return [slice(i, i + step) for i in range(0, dim, step)]

    def _residual_projector(self, count: torch.Tensor, sums: torch.Tensor, outer: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, I - V V^T per block) from the sufficient statistics of the normal tokens."""
        mean = sums / count
        cov = outer / count - torch.outer(mean, mean)
        projector = torch.zeros_like(cov)
        for block in self._blocks(cov.shape[0]):
            values, vectors = torch.linalg.eigh(cov[block, block])
            values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
            explained = torch.cumsum(values, 0) / values.sum().clamp_min(1e-12)
            keep = int(torch.searchsorted(explained, torch.tensor(self.variance, dtype=explained.dtype))) + 1
            keep = min(max(keep, self.min_components), values.numel())
            v = vectors[:, :keep]
            projector[block, block] = torch.eye(v.shape[0], dtype=v.dtype) - v @ v.T
        return mean, projector

    def fit(self, feats: torch.Tensor, owners: torch.Tensor) -> None:
        """Fit on normal features (N, D, h, w); `owners` per image (N,) or per patch (N, h, w)."""
        x = flatten_patches(feats).double()
        owners = owners.long()
        if owners.ndim == 1:
            owners = owners[:, None, None].expand(-1, *feats.shape[2:])
        owners = owners.reshape(-1)
        count = int(owners.max()) + 1
        self._counts = torch.bincount(owners, minlength=count).double()
        self._sums = torch.zeros(count, x.shape[1], dtype=torch.float64).index_add_(0, owners, x)
        self._outer = torch.stack([x[owners == o].T @ x[owners == o] for o in range(count)])
        self._held_out = {}
        self.mean, self.basis = self._residual_projector(self._counts.sum(), self._sums.sum(0), self._outer.sum(0))

    def _projector_without(self, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        if owner not in self._held_out:
            rest = self._counts.sum() - self._counts[owner]
            if rest <= 0:
                raise ValueError("cannot leave out the only owner of the subspace")
            self._held_out[owner] = self._residual_projector(
                rest, self._sums.sum(0) - self._sums[owner], self._outer.sum(0) - self._outer[owner])
        return self._held_out[owner]

    @staticmethod
    def _residual(x: torch.Tensor, mean: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm((x - mean) @ projector, dim=-1)

    def distances(self, feats: torch.Tensor, exclude: Exclusions = None) -> torch.Tensor:
        """(B, h, w) residual norms; `exclude[b]` scores image b (or each of its patches) against
        the subspace fitted without that owner."""
        if self.mean is None:
            raise RuntimeError("the subspace expert is not fitted")
        b, _, h, w = feats.shape
        if exclude is None or all(e is None for e in exclude):  # one product, traceable for export
            x = flatten_patches(feats).float()
            return self._residual(x, self.mean.float(), self.basis.float()).reshape(b, h, w)
        x = flatten_patches(feats).double().reshape(b, h * w, -1)
        out = torch.empty(b, h * w, dtype=torch.float64)
        for i in range(b):
            owner = exclude[i]
            if owner is None:
                out[i] = self._residual(x[i], self.mean, self.basis)
                continue
            per_patch = torch.as_tensor(owner, dtype=torch.long).reshape(-1).expand(h * w)
            for o in per_patch.unique().tolist():
                rows = per_patch == o
                if self._sums is None or o >= len(self._counts):  # an owner this expert never saw
                    out[i, rows] = self._residual(x[i, rows], self.mean, self.basis)
                else:
                    out[i, rows] = self._residual(x[i, rows], *self._projector_without(o))
        return out.float().reshape(b, h, w)

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """No bank: a mean of D values and a (D, D) residual projector."""
        mean = tensors.get("mean")
        if mean is None or mean.ndim != 1:
            raise TensorLayoutError("mean", "must be a 1-D float tensor (the normal tokens' mean)")
        require_float(tensors, "mean", (mean.shape[0],))
        require_float(tensors, "projector", (mean.shape[0],) * 2)
        return {"mean", "projector"}

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.mean is None:
            raise RuntimeError("the subspace expert is not fitted")
        return {"mean": self.mean.float(), "projector": self.basis.float()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean, self.basis = tensors["mean"].double(), tensors["projector"].double()
        self._counts = self._sums = self._outer = None
        self._held_out = {}

    def to(self, device: torch.device | str) -> "SubspaceExpert":
        """Kept on the CPU: one (D, D) product per image costs nothing next to the backbone."""
        return self
