"""Expert selection: choose a strategy per category from the normal shots alone.

The detector hands this module plain evidence, never itself: for every candidate strategy, its
maps and image scores on a validation set built from the shots (selection.py never calls back into
the detector, so data flows one way: detector -> selection):
  - normal: held-out shots and views of them, each scored without its own content;
  - anomalous: synthetic anomalies (all five families, at full and reduced contrast) pasted into
    those normal images, with exact masks, scored with the same exclusions.
Measure, per anomalous image (so that it can be bootstrapped): half the probability, under the
candidate's Gaussian model of normal image scores, that a normal image scores lower (an image term
that still moves once every anomaly outranks every normal image), and half the mean, over the
anomaly's pixels, of the fraction of normal pixels below them (a per-region pixel AUROC).
Rule: the robust default wins unless another candidate beats it on the paired per-image measure
with a bootstrap lower bound (5th percentile of the mean gain over 1000 resamples of the anomalous
images) above zero; among those that do, the highest mean wins. Validation noise thus decides
nothing: the report says when the default was kept for lack of evidence.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from astfad.config import SINGLE_STRATEGIES, parse_strategy
from astfad.data.synthetic import ANOMALY_KINDS, random_anomaly
from astfad.thresholds import ScoreModel

# every registered expert alone, and the fusion rules over the default pair (fusion_weighted_sum:0.5
# is fusion_add halved, the same ranking: not a separate candidate)
CANDIDATES = (*SINGLE_STRATEGIES, "fusion_add", "fusion_mul", "fusion_max",
              "fusion_weighted_sum:0.3", "fusion_weighted_sum:0.7")
DEFAULT_STRATEGY = "semantic"
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_LOWER = 5.0  # percentile of the mean gain that must be above zero
MIN_ANOMALIES = 16
MAX_ANOMALIES = 32
REDUCED_CONTRAST = (0.35, 0.7)
MAX_NORMAL_PIXELS = 200_000

# The seed paper's hand-made table for MVTec AD (read off its test set); `paper` reproduces it.
PAPER_PRESET: dict[str, str] = {
    **{c: "semantic_adapter" for c in ("carpet", "grid", "leather", "wood", "hazelnut")},
    **{c: "fusion_weighted_sum:0.7" for c in ("metal_nut", "screw", "tile", "toothbrush", "transistor")},
    **{c: "fusion_add" for c in ("bottle", "cable", "capsule", "pill", "zipper")},
    "*": "fusion_add",
}
PRESETS = {"paper": PAPER_PRESET}


@dataclass
class Evidence:
    """One candidate's validation output: image scores and eval-grid maps of the normal and the
    anomalous validation images (maps (N, H, W) float arrays)."""

    normal_scores: np.ndarray
    normal_maps: np.ndarray
    anomalous_scores: np.ndarray
    anomalous_maps: np.ndarray


@dataclass
class SelectionReport:
    """The evidence behind a choice: every candidate's validation measures and the rule's verdict."""

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
        lines = [f"{'candidate':<26} {'image':>7} {'pixel':>7} {'score':>7} {'gain vs default (5%-95%)':>26}"]
        for name, s in sorted(self.scores.items(), key=lambda kv: -kv[1]["score"]):
            mark = "  <- chosen" if name == self.choice else ""
            gain = (f"{s['gain']:+.3f} ({s['gain_low']:+.3f} to {s['gain_high']:+.3f})"
                    if "gain" in s else "default")
            lines.append(f"{name:<26} {s['image']:>7.3f} {s['pixel']:>7.3f} {s['score']:>7.3f} {gain:>26}{mark}")
        v = self.validation
        lines.append(f"validation: {v.get('normal', 0)} normal, {v.get('anomalous', 0)} synthetic anomalies "
                     f"({', '.join(v.get('kinds', []))})")
        lines += [f"note: {note}" for note in v.get("notes", [])]
        lines.append(f"choice: {self.choice} ({self.reason})")
        return "\n".join(lines)


def synthetic_anomalies(images: list[np.ndarray], seed: int, count: int
                        ) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[str]]:
    """`count` anomalous images made from `images` round-robin, cycling through every anomaly kind,
    every other one at reduced contrast (blended back towards the normal image) so that the
    validation also has anomalies that are hard to see. Returns images, masks, the index of the
    normal image each was made from, and the kinds."""
    rng = np.random.default_rng(seed)
    kinds = list(ANOMALY_KINDS)
    out, masks, sources, used = [], [], [], []
    for j in range(count):
        b = j % len(images)
        image, mask, kind = random_anomaly(images[b], rng, kinds=[kinds[j % len(kinds)]])
        if j % 2:
            contrast = rng.uniform(*REDUCED_CONTRAST)
            blended = images[b].astype(np.float32) + contrast * (image.astype(np.float32) - images[b])
            faint = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
            faint_mask = (faint != images[b]).any(axis=2) & mask
            if faint_mask.any():  # else the blend rounded the anomaly away: keep full contrast
                image, mask = faint, faint_mask
        out.append(image)
        masks.append(mask)
        sources.append(b)
        used.append(kind)
    return out, masks, sources, used


def per_image_measure(evidence: Evidence, masks: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image term, pixel term) for every anomalous image, each in [0, 1] (see the module doc)."""
    model = ScoreModel.fit(evidence.normal_scores)
    image_term = model.exceedance(evidence.anomalous_scores)
    normal = evidence.normal_maps.ravel()
    if normal.size > MAX_NORMAL_PIXELS:
        normal = np.random.default_rng(seed).choice(normal, MAX_NORMAL_PIXELS, replace=False)
    normal = np.sort(normal)
    pixel_term = np.array([np.searchsorted(normal, amap[mask], side="left").mean() / normal.size
                           if mask.any() else np.nan
                           for amap, mask in zip(evidence.anomalous_maps, masks)])
    return image_term, pixel_term


def choose_strategy(evidence: dict[str, Evidence], masks: np.ndarray, default: str = DEFAULT_STRATEGY,
                    seed: int = 0, notes: list[str] | None = None,
                    validation: dict[str, Any] | None = None) -> SelectionReport:
    """The rule of the module doc over candidates' evidence; `masks` (M, H, W) bool are the
    anomalous images' masks on the evaluation grid."""
    if default not in evidence:
        raise ValueError(f"the default strategy '{default}' has no validation evidence")
    values, scores = {}, {}
    for name, ev in evidence.items():
        image_term, pixel_term = per_image_measure(ev, masks, seed)
        values[name] = 0.5 * image_term + 0.5 * np.nan_to_num(pixel_term, nan=0.5)
        scores[name] = {"image": float(image_term.mean()), "pixel": float(np.nanmean(pixel_term)),
                        "score": float(values[name].mean())}
    rng = np.random.default_rng(seed)
    m = len(values[default])
    resamples = rng.integers(0, m, size=(BOOTSTRAP_RESAMPLES, m))
    winners = []
    for name in evidence:
        if name == default:
            continue
        gains = (values[name] - values[default])[resamples].mean(axis=1)
        low, high = np.percentile(gains, [BOOTSTRAP_LOWER, 100 - BOOTSTRAP_LOWER])
        scores[name].update(gain=float(values[name].mean() - values[default].mean()),
                            gain_low=float(low), gain_high=float(high))
        if low > 0:
            winners.append(name)
    if winners:
        choice = max(winners, key=lambda n: (scores[n]["score"], -list(evidence).index(n)))
        reason = (f"beats the default '{default}' by {scores[choice]['gain']:+.3f} "
                  f"(bootstrap 5th percentile {scores[choice]['gain_low']:+.3f} > 0)")
    else:
        choice = default
        best = max(evidence, key=lambda n: scores[n]["score"])
        reason = ("the default: no candidate beats it beyond the validation's noise"
                  + (f" (best mean: {best}, {scores[best]['score']:.3f} vs {scores[default]['score']:.3f})"
                     if best != default else ""))
    return SelectionReport(choice, reason, scores, {**(validation or {}), "notes": list(notes or [])})


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
