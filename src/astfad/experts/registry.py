"""Every expert astfad knows, and what the rest of the code derives from them.

An expert declares the backbone family it reads, how it is built from the detector's config, whether
it is fitted on the semantic references (the shots and their rotations) or on the shots alone, and
whether it is trained on view pairs (then its normal statistics and validation come from held-out
copies that never saw the scored content). Strategy names, fusion pairs, selection candidates, the
benchmark's fixed strategies and model loading are all derived from `REGISTRY`: a new expert is one
file in experts/ and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from astfad.experts.adapter import AdaptedSemanticExpert
from astfad.experts.base import Exclusions
from astfad.experts.semantic import SemanticExpert
from astfad.experts.subspace import SubspaceExpert
from astfad.experts.texture import TextureExpert


class Expert(Protocol):
    """What the detector needs of an expert; `check_tensors` validates a saved `tensors()` dict
    (keys without the expert's prefix) and returns the keys it accepts (TensorLayoutError else)."""

    @classmethod
    def check_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> set[str]: ...

    def fit(self, feats: torch.Tensor, owners: torch.Tensor) -> None: ...
    def distances(self, feats: torch.Tensor, exclude: Exclusions = None) -> torch.Tensor: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
    def to(self, device: torch.device | str) -> "Expert": ...


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    family: str  # the backbone family it reads: "texture" (CNN) or "semantic" (ViT)
    kind: type[Expert]  # its class: `kind.check_tensors` validates what a model file holds for it
    build: Callable[[Any, int], Expert]  # (DetectorConfig, feature blocks) -> an unfitted expert
    on_references: bool = False  # fitted on the shots and their rotations, not the shots alone
    trained: bool = False  # trained on view pairs; validated and thresholded with held-out copies
    # its distances are cosine distances of the raw family features, on the scale of the batch's
    # mutual scores (experts/mutual.py), which `batch_evidence` may therefore take in
    batch_evidence: bool = False


REGISTRY: dict[str, ExpertSpec] = {spec.name: spec for spec in (
    ExpertSpec("texture", "texture", TextureExpert,
               lambda c, blocks: TextureExpert(c.coreset_budget, c.coreset_projection_dim, c.seed)),
    ExpertSpec("semantic", "semantic", SemanticExpert,
               lambda c, blocks: SemanticExpert(c.mask_background, c.seed, c.self_match), on_references=True,
               batch_evidence=True),
    ExpertSpec("semantic_adapter", "semantic", AdaptedSemanticExpert,
               lambda c, blocks: AdaptedSemanticExpert(None, c.mask_background, c.seed),
               on_references=True, trained=True),
    ExpertSpec("subspace", "semantic", SubspaceExpert,
               lambda c, blocks: SubspaceExpert(c.subspace_variance, blocks=blocks), on_references=True),
)}


def expert_spec(name: str) -> ExpertSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown expert '{name}'; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]
