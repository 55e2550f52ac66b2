"""The Adapter: a residual bottleneck on frozen ViT tokens, trained on the normal shots alone.

Loss (the Compactness Loss, with a guard against collapse), on matching patch pairs of an image
and an augmented view of it:
  - view consistency: 1 - cos(A(x), A(x_view)), the same patch must map to the same place;
  - prototype compactness: 1 - cos(A(x), nearest prototype), prototypes being k-means centres of
    the adapted normal tokens, refreshed during training: normal features are pulled together;
  - anti-collapse: a hinge keeping every output dimension's spread at least `keep_spread` of the
    input's (the trivial solution maps everything to one point and has zero spread), plus a
    small penalty on the distance to the identity mapping;
  - separation (when anomalous patches are given: synthetic anomalies pasted into the shots): a
    hinge pushing each anomalous patch's distance to its nearest prototype at least
    `SEPARATION_MARGIN` beyond the normal patches' mean distance, so the adapter learns what to
    keep apart, not only what to pull together.
The up-projection starts at zero, so an untrained adapter is exactly the identity.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from astfad.experts.base import TensorLayoutError, require_float
from astfad.experts.semantic import SemanticExpert

PROTOTYPES = 32
KEEP_SPREAD = 0.8
COMPACTNESS_WEIGHT = 1.0
IDENTITY_WEIGHT = 0.1
BATCH_PATCHES = 1024
SEPARATION_WEIGHT = 1.0
SEPARATION_MARGIN = 0.2


class Adapter(nn.Module):
    """x + up(relu(down(x))) over the channel dimension of (..., D) tokens."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))

    def forward_maps(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) -> (N, D, h, w)."""
        return self(feats.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 10) -> torch.Tensor:
    """Spherical k-means centres (cosine), enough to give the compactness term its prototypes."""
    x = F.normalize(x, dim=1)
    centres = x[torch.randperm(x.shape[0], generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=centres.shape[0]).unsqueeze(1)
        centres = torch.where(counts > 0, F.normalize(sums, dim=1), centres)
    return centres


def spread(x: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension standard deviation of (M, D) features."""
    return x.std(dim=0).mean()


def train_adapter(anchors: torch.Tensor, positives: torch.Tensor, hidden: int = 128,
                  steps: int = 150, lr: float = 1e-3, seed: int = 0,
                  negatives: torch.Tensor | None = None) -> tuple[Adapter, dict[str, float]]:
    """Train an Adapter on matching (M, D) patch pairs, and (K, D) anomalous patches to keep apart
    when given; returns it with the final loss terms and the spread of input and adapted features
    (the collapse check)."""
    if anchors.shape != positives.shape or anchors.ndim != 2:
        raise ValueError("anchors and positives must be matching (M, D) tensors")
    if negatives is not None and (negatives.ndim != 2 or negatives.shape[1] != anchors.shape[1]):
        raise ValueError("negatives must be (K, D) tensors of the anchors' width")
    separate = negatives is not None and len(negatives) > 0
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    adapter = Adapter(anchors.shape[1], hidden)
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=1e-4)
    m = anchors.shape[0]
    sample = torch.randperm(m, generator=generator)[: min(m, 20000)]
    input_std = anchors[sample].std(dim=0)
    prototypes = _kmeans(anchors[sample], min(PROTOTYPES, len(sample)), generator)
    terms: dict[str, float] = {}
    for step in range(steps):
        if step and step % 50 == 0:
            with torch.no_grad():
                prototypes = _kmeans(adapter(anchors[sample]), prototypes.shape[0], generator)
        batch = torch.randint(0, m, (min(BATCH_PATCHES, m),), generator=generator)
        a, p = adapter(anchors[batch]), adapter(positives[batch])
        consistency = 1 - F.cosine_similarity(a, p, dim=1).mean()
        distance = 1 - (F.normalize(a, dim=1) @ prototypes.T).max(1).values
        compactness = distance.mean()
        collapse = F.relu(KEEP_SPREAD * input_std - a.std(dim=0)).mean() / input_std.mean()
        identity = (a - anchors[batch]).pow(2).sum(1).mean()
        separation = torch.zeros(())
        if separate:
            pick = torch.randint(0, len(negatives), (min(BATCH_PATCHES, len(negatives)),), generator=generator)
            far = 1 - (F.normalize(adapter(negatives[pick]), dim=1) @ prototypes.T).max(1).values
            separation = F.relu(SEPARATION_MARGIN + distance.detach().mean() - far).mean()
        loss = (consistency + COMPACTNESS_WEIGHT * compactness + collapse + IDENTITY_WEIGHT * identity
                + SEPARATION_WEIGHT * separation)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        terms = {name: float(value.detach()) for name, value in (
            ("loss", loss), ("consistency", consistency), ("compactness", compactness),
            ("collapse", collapse), ("identity", identity), ("separation", separation))}
    adapter.eval()
    with torch.no_grad():
        terms["input_spread"] = float(spread(anchors[sample]))
        terms["adapted_spread"] = float(spread(adapter(anchors[sample])))
    for p in adapter.parameters():
        p.requires_grad_(False)
    return adapter, terms


class AdaptedSemanticExpert(SemanticExpert):
    """The semantic expert searching in the adapter's feature space."""

    name = "semantic_adapter"

    def __init__(self, adapter: Adapter | None = None, mask_background: bool = False, seed: int = 0) -> None:
        super().__init__(mask_background, seed)
        self.adapter = adapter

    def train(self, anchors: torch.Tensor, positives: torch.Tensor, config,
              negatives: torch.Tensor | None = None) -> dict[str, float]:
        """Train the adapter on matching (M, D) patch pairs (and anomalous patches to keep apart)
        with the detector config's adapter settings; returns the final loss terms and the collapse
        check."""
        self.adapter, stats = train_adapter(anchors, positives, config.adapter_hidden, config.adapter_steps,
                                            config.adapter_lr, config.seed, negatives)
        return stats

    def transform(self, feats: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            raise RuntimeError("the semantic_adapter expert has no trained adapter")
        with torch.no_grad():
            return self.adapter.forward_maps(feats)

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """The semantic expert's keys and the adapter's (hidden, D) / (D, hidden) layers."""
        keys = super().check_tensors(tensors)
        dim = tensors["bank"].shape[1]
        down = tensors.get("adapter.down.weight")
        if down is None or down.ndim != 2 or down.shape[1] != dim:
            raise TensorLayoutError("adapter.down.weight", f"must be (hidden, {dim})"
                                    + ("" if down is None else f", got {tuple(down.shape)}"))
        hidden = down.shape[0]
        layers = {"adapter.down.weight": (hidden, dim), "adapter.down.bias": (hidden,),
                  "adapter.up.weight": (dim, hidden), "adapter.up.bias": (dim,)}
        for key, shape in layers.items():
            require_float(tensors, key, shape)
        return keys | set(layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = super().tensors()
        out.update({f"adapter.{k}": v for k, v in self.adapter.state_dict().items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        weights = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
        self.adapter = Adapter(weights["down.weight"].shape[1], weights["down.weight"].shape[0])
        self.adapter.load_state_dict(weights)
        self.adapter.eval()
        super().load_tensors({k: v for k, v in tensors.items() if not k.startswith("adapter.")})
