"""Expert selection: choose a strategy per category from the normal shots alone.

Validation set, built without test data:
  - normal: the detector's validation bases (each shot scored against the other shots, or views
    of a single shot), already scored during fitting;
  - anomalous: synthetic anomalies (CutPaste, scars, Perlin blends, scratches, blobs) pasted into
    those same bases, with exact masks, scored with the same leave-one-out exclusion.
Rule: each candidate gets w_img * image AUROC + w_pix * pixel AUROC (weights from the config,
0.5 / 0.5 by default); the best wins, and candidates within TIE_TOLERANCE of the best count as
tied, the tie going to the cheapest (the order of CANDIDATES is the cost order).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from astfad.config import parse_strategy
from astfad.data.synthetic import ANOMALY_KINDS, random_anomaly
from astfad.metrics import image_auroc, pixel_auroc
from astfad.scoring import mask_to_grid

if TYPE_CHECKING:
    from astfad.detector import Detector, ValidationBases

CANDIDATES = ("texture", "semantic", "semantic_adapter", "fusion_add", "fusion_mul", "fusion_max",
              "fusion_weighted_sum:0.3", "fusion_weighted_sum:0.5", "fusion_weighted_sum:0.7")
TIE_TOLERANCE = 0.005
MIN_ANOMALIES = 8

# The seed paper's hand-made table for MVTec AD (read off its test set); `paper` reproduces it.
PAPER_PRESET: dict[str, str] = {
    **{c: "semantic_adapter" for c in ("carpet", "grid", "leather", "wood", "hazelnut")},
    **{c: "fusion_weighted_sum:0.7" for c in ("metal_nut", "screw", "tile", "toothbrush", "transistor")},
    **{c: "fusion_add" for c in ("bottle", "cable", "capsule", "pill", "zipper")},
    "*": "fusion_add",
}
PRESETS = {"paper": PAPER_PRESET}


@dataclass
class SelectionReport:
    """The evidence behind a choice: every candidate's validation scores and the rule's verdict."""

    choice: str
    reason: str
    scores: dict[str, dict[str, float]]
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionReport":
        return cls(**data)

    def format(self) -> str:
        lines = [f"{'candidate':<26} {'image AUROC':>11} {'pixel AUROC':>11} {'score':>7}"]
        for name, s in sorted(self.scores.items(), key=lambda kv: -kv[1]["score"]):
            mark = "  <- chosen" if name == self.choice else ""
            lines.append(f"{name:<26} {s['image_auroc']:>11.3f} {s['pixel_auroc']:>11.3f} {s['score']:>7.3f}{mark}")
        v = self.validation
        lines.append(f"validation: {v.get('normal', 0)} normal, {v.get('anomalous', 0)} synthetic anomalies "
                     f"({', '.join(v.get('kinds', []))})")
        lines += [f"note: {note}" for note in v.get("notes", [])]
        lines.append(f"choice: {self.choice} ({self.reason})")
        return "\n".join(lines)


def synthetic_validation(bases: "ValidationBases", seed: int, count: int
                         ) -> tuple[list[np.ndarray], list[np.ndarray], list[int | None], list[str]]:
    """`count` anomalous images made from the bases round-robin, cycling through every anomaly
    kind so that no single kind decides the choice."""
    rng = np.random.default_rng(seed)
    kinds = list(ANOMALY_KINDS)
    images, masks, exclude, used = [], [], [], []
    for j in range(count):
        b = j % len(bases.images)
        image, mask, kind = random_anomaly(bases.images[b], rng, kinds=[kinds[j % len(kinds)]])
        images.append(image)
        masks.append(mask)
        exclude.append(bases.exclude[b])
        used.append(kind)
    return images, masks, exclude, used


def select_strategy(detector: "Detector", bases: "ValidationBases",
                    normal_maps: dict[str, torch.Tensor],
                    held_out_adapter: Callable[[torch.Tensor, Sequence[int | None]], torch.Tensor] | None,
                    candidates: tuple[str, ...] = CANDIDATES) -> SelectionReport:
    """Score every candidate on the synthetic validation set and choose (see module doc).

    `held_out_adapter` gives semantic_adapter maps from adapters that did not see the validated
    shot; without it (a single shot) semantic_adapter cannot be validated fairly and is left out.
    """
    cfg = detector.config
    notes = []
    if held_out_adapter is None and "semantic_adapter" in candidates:
        candidates = tuple(c for c in candidates if c != "semantic_adapter")
        notes.append("semantic_adapter not a candidate: with one shot nothing is left to validate "
                     "its adapter on")
    count = max(MIN_ANOMALIES, len(bases.images))
    images, masks, exclude, kinds = synthetic_validation(bases, cfg.seed + 2, count)
    feats = {family: detector.features(family, images) for family in bases.features}
    anomalous_maps = detector.expert_maps(feats, exclude)
    if held_out_adapter is not None and "semantic_adapter" in candidates:
        normal_maps = {**normal_maps, "semantic_adapter": held_out_adapter(bases.features["semantic"], bases.exclude)}
        anomalous_maps["semantic_adapter"] = held_out_adapter(feats["semantic"], exclude)
        notes.append("semantic_adapter validated with adapters trained on the other half of the shots")
    grid = detector.eval_grid()
    true_masks = np.concatenate([np.zeros((len(bases.images), *grid), bool), np.stack([mask_to_grid(m, grid) for m in masks])])
    labels = np.r_[np.zeros(len(bases.images)), np.ones(len(images))]
    w_img, w_pix = cfg.selection_weights
    scores: dict[str, dict[str, float]] = {}
    for name in candidates:
        normal = detector.combine(name, normal_maps)
        anomalous = detector.combine(name, anomalous_maps)
        image_scores = torch.cat([detector.scores(name, normal, bases.features.get("texture"), bases.exclude),
                                  detector.scores(name, anomalous, feats.get("texture"), exclude)])
        img = image_auroc(labels, image_scores.numpy())
        pix = pixel_auroc(true_masks, torch.cat([normal, anomalous]).numpy())
        scores[name] = {"image_auroc": float(img), "pixel_auroc": float(pix),
                        "score": float(w_img * img + w_pix * pix)}
    best = max(s["score"] for s in scores.values())
    choice = next(n for n in candidates if scores[n]["score"] >= best - TIE_TOLERANCE)
    reason = (f"highest validation score {scores[choice]['score']:.3f} "
              f"({w_img:g} x image AUROC + {w_pix:g} x pixel AUROC)")
    if scores[choice]["score"] < best:
        reason = (f"within {TIE_TOLERANCE} of the best ({best:.3f}) and cheaper: "
                  f"{scores[choice]['score']:.3f}")
    validation = {"normal": len(bases.images), "anomalous": len(images), "kinds": sorted(set(kinds)),
                  "leave_one_out": any(e is not None for e in bases.exclude), "notes": notes}
    return SelectionReport(choice, reason, scores, validation)


def load_pinned(spec: str | Path | None) -> dict[str, str]:
    """A category -> strategy map from a preset name (`paper`) or a YAML/JSON file; key `*`
    applies to categories not listed. Every strategy is validated here, not at use."""
    if spec is None:
        return {}
    if str(spec) in PRESETS:
        return dict(PRESETS[str(spec)])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"no strategy map '{spec}' (a file, or one of: {', '.join(PRESETS)})")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"strategy map '{path}' must map category names to strategies")
    for category, strategy in data.items():
        try:
            parse_strategy(str(strategy))
        except ValueError as exc:
            raise ValueError(f"strategy map '{path}', category '{category}': {exc}") from None
    return {str(k): str(v) for k, v in data.items()}


def pinned_strategy(category: str, pinned: dict[str, str]) -> str | None:
    """The pinned strategy for a category, the `*` default, or None (let `auto` decide)."""
    return pinned.get(category, pinned.get("*"))
