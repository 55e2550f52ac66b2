"""Texture expert: PatchCore over mid-level CNN features (pooled stride-8 and stride-16 stages,
see `features.texture_reader`), Euclidean nearest-neighbour distance to a coreset bank."""

from __future__ import annotations

import torch

from astfad.experts.base import KNNExpert, flatten_patches

REWEIGHT_NEIGHBOURS = 9


class TextureExpert(KNNExpert):
    name = "texture"

    def __init__(self, budget: int | None = 20000, projection_dim: int = 128, seed: int = 0) -> None:
        super().__init__("l2", budget, projection_dim, seed)

    def reweighted_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """PatchCore's image score: the largest patch distance s*, scaled by how isolated its
        nearest bank patch m* is among its own neighbours,
        s = (1 - exp(|t - m*|) / sum_{m in N_b(m*)} exp(|t - m|)) * s*."""
        bank = self._require_bank()
        b, _, h, w = feats.shape
        queries = flatten_patches(feats).reshape(b, h * w, -1)
        dist, idx = bank.search(flatten_patches(feats), 1)
        dist, idx = dist[:, 0].reshape(b, h * w), idx[:, 0].reshape(b, h * w)
        scores = torch.empty(b)
        for i in range(b):
            worst = int(torch.argmax(dist[i]))
            test_patch = queries[i, worst]
            nearest_bank = bank.features[idx[i, worst]]
            _, neighbours = bank.search(nearest_bank[None], REWEIGHT_NEIGHBOURS)
            to_neighbours = torch.linalg.norm(bank.features[neighbours[0]] - test_patch, dim=1)
            weight = 1.0 - torch.exp(dist[i, worst] - torch.logsumexp(to_neighbours, dim=0))
            scores[i] = weight * dist[i, worst]
        return scores
