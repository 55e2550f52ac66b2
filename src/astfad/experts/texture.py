"""Texture expert: PatchCore over mid-level CNN features (pooled stride-8 and stride-16 stages,
see `features.texture_reader`), Euclidean nearest-neighbour distance to a coreset bank."""

from __future__ import annotations

import torch

from astfad.experts.base import Exclusions, KNNExpert, flatten_patches

REWEIGHT_NEIGHBOURS = 9


class TextureExpert(KNNExpert):
    name = "texture"

    def __init__(self, budget: int | None = 20000, projection_dim: int = 128, seed: int = 0) -> None:
        super().__init__("l2", budget, projection_dim, seed)

    def reweighted_scores(self, feats: torch.Tensor, exclude: Exclusions = None) -> torch.Tensor:
        """PatchCore's image score: the largest patch distance s*, scaled by how isolated its
        nearest bank patch m* is among its own neighbours,
        s = (1 - exp(|t - m*|) / sum_{m in N_b(m*)} exp(|t - m|)) * s*.
        With `exclude` (normal data scored leave-one-out) the excluded owner's rows are left out
        of every search, so normal and test scores are on one scale."""
        bank = self._require_bank()
        dist = self.distances(feats, exclude)
        b, _, h, w = feats.shape
        queries = flatten_patches(feats).reshape(b, h * w, -1)
        scores = torch.empty(b)
        for i in range(b):
            worst = int(torch.argmax(dist[i]))
            allowed = torch.ones(len(bank), dtype=torch.bool)
            if exclude is not None and exclude[i] is not None:
                owner = torch.as_tensor(exclude[i]).reshape(-1)
                allowed = bank.owners != owner[worst if owner.numel() > 1 else 0]
            rows = bank.features[allowed]
            test_patch = queries[i, worst]
            nearest_bank = rows[torch.argmin(torch.linalg.norm(rows - test_patch, dim=1))]
            neighbours = torch.topk(torch.linalg.norm(rows - nearest_bank, dim=1),
                                    min(REWEIGHT_NEIGHBOURS, len(rows)), largest=False).indices
            to_neighbours = torch.linalg.norm(rows[neighbours] - test_patch, dim=1)
            weight = 1.0 - torch.exp(dist[i].flatten()[worst] - torch.logsumexp(to_neighbours, dim=0))
            scores[i] = weight * dist[i].flatten()[worst]
        return scores
