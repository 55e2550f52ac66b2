"""Expert selection: choose a strategy per category from the normal shots alone.

The detector hands this module plain evidence, never itself: for every candidate strategy, its
maps and image scores on a validation set built from the shots (selection.py never calls back into
the detector, so data flows one way: detector -> selection):
  - normal: held-out shots and views of them, each scored without its own content;
  - anomalous: synthetic anomalies (all five families, at full and reduced contrast, two per
    image) pasted into those normal images, with exact masks, scored with the same exclusions.
Measure, per pair of an anomalous and a normal validation image (so that both can be
bootstrapped): the mean over the anomalous image's anomalies of the fraction of the normal image's
pixels below each anomaly's pixels (a per-region pixel AUROC, which still moves once every anomaly
outranks every normal image), or the image AUROC term (1 when the anomalous image scores above the
normal one, 0.5 on a tie) where an anomaly left no pixel on the grid. Both terms are kept; the image
term's weight in the measure, IMAGE_WEIGHT, was chosen by leave-one-category-out over the ten
development categories (benchmarks/auto_candidates.py): 0 in 9 of 10 folds. The image term of 4-8
normal images and 12-24 synthetic ones saturates and its steps (1/32 at 4 shots) carried noise into
the choice: with it at half weight, `auto` stayed with semantic where subspace wins by 4-9 points
(generated grass, gravel). A Gaussian model of 4-8 normal scores is not used either: its fitted
tail moved the image term of equally good candidates from 0.37 to 0.93 (test_selection).
Rule: the robust default wins unless another candidate beats it on the paired measure with a
bootstrap lower bound above zero: the (5 / C)th percentile of the mean gain over 2000 paired
resamples of the anomalous and of the normal images, C the number of challengers (Bonferroni: with
seven challengers at 5% each, a third of the categories would switch on noise alone); among those
that do, the highest mean wins. Validation noise thus decides nothing: the report says when the
default was kept for lack of evidence. The challenger's mean gain must also exceed a minimum
(`min_gain`): subspace's validation gain over semantic is positive in nearly every recorded cell,
real or generated, but it wins the test only where the gain is large (the generated textures,
0.05-0.08, against at most 0.03 on the real categories where semantic tests better).
Leave-one-category-out per shot count over the ten development categories (replays of recorded
validations, benchmarks/selection_evidence.py) chose MIN_GAIN 0.03 at 4 and at 16 shots, and
ONE_SHOT_MIN_GAIN 0.06 at one shot once the semantic expert matched the part against itself
(`self_match`): the quadrants of one image give larger gains to every challenger, and semantic,
no longer misled by what the one shot lacks but the part repeats, tests better on the real parts
where subspace gained up to 0.06, while grass and gravel gain 0.07-0.09 for real (before the
self-match no minimum was chosen there). A margin on the bootstrap's lower bound instead lost the
generated textures, whose gains are large but noisy.

The image-score rule is validated on the chosen candidate's evidence too (`choose_image_score`):
the map's largest pixel (`max`) instead of its top-1% mean (`top1`) where that separates the
synthetic anomalies from the normal images further, in units of the normal scores' spread. Small
defects on busy parts (pcb) are one hot spot diluted by a top-1% mean; elsewhere the mean is
steadier. The separation does not saturate as the image AUROC of 12-24 easy anomalies does.
Leave-one-category-out over the ten development categories adopted it at every shot count
(benchmarks/README.md); `auto_max_score_above` takes the maximum above that many shots instead. A
margin the maximum must lead by (`min_gain`, in normal spreads, or a `bootstrap` lower bound above
zero) was replayed over the ten and not adopted: the maximum's lead on cookie's one-shot seed where
it loses is pcb's where it wins (README, "Image score"). At one shot the unit of the separation,
the normal scores' spread, is the spread of one part's views, anything from nothing to much: there
the rules are compared by `log_separation` (median log ratio of the anomalous scores to the normal
mean), and the maximum must lead by ONE_SHOT_LOG_MARGIN 0.05, chosen by leave-one-category-out
over the ten development categories at one shot (9 of 10 folds; README). At 4 shots the log
ratio lost, so above one shot the spread separation stays. With
many shots (and the test-time flip averaging two passes) the normal maps are quiet and the real
defects, smaller than the pasted ones, stand out as one peak, while the separation still favours
the top-1% mean that suits the larger synthetic anomalies: replayed over the ten development
categories (`selection_evidence.py`), the maximum gains 1.3 points of image AUROC at 16 shots
(loses 0.3 at 8). But the gain lies at false-alarm rates no line runs at: the fitted thresholds
lose half their recall on it (real five, 16 shots: 42.5% -> 23.2%), and no threshold model can win
it back, as even a threshold fitted on the test's own good parts recalls fewer defects with the
maximum (37% against 46%, `benchmarks/threshold_models.py`). So it is an option for ranking
(`auto_max_score_above` 8), not the default (README, "Image score").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astfad.config import parse_strategy
from astfad.data.synthetic import ANOMALY_KINDS, random_anomaly
from astfad.scoring import image_scores, mask_to_grid

DEFAULT_STRATEGY = "semantic"
BOOTSTRAP_RESAMPLES = 2000
IMAGE_WEIGHT = 0.0  # of the image term in the measure, the pixel term weighing the rest (module doc)
MIN_GAIN = 0.03  # of the measure's mean: a challenger must gain more than this, above one shot (module doc)
ONE_SHOT_MIN_GAIN = 0.06  # the same with one shot, whose quadrants flatter every challenger (module doc)
FAMILY_ERROR = 5.0  # percent chance that noise alone makes any challenger beat the default
MIN_ANOMALOUS_IMAGES = 12
MAX_ANOMALOUS_IMAGES = 24
ANOMALIES_PER_IMAGE = 2
REDUCED_CONTRAST = (0.35, 0.7)
MAP_SCORE_RULES = ("top1", "max")  # the image-score rules computed from the maps alone
ONE_SHOT_LOG_MARGIN = 0.05  # the maximum's lead in log separation needed at one shot (module doc)

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
    # the image-score rule validated on the chosen candidate: {"choice", "reason", "separation"}
    image_score: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SelectionReport":
        return cls(**data)

    def format(self) -> str:
        lines = [f"{'candidate':<26} {'image':>7} {'pixel':>7} {'score':>7} {'gain vs default (interval)':>26}"]
        for name, s in sorted(self.scores.items(), key=lambda kv: -kv[1]["score"]):
            mark = "  <- chosen" if name == self.choice else ""
            gain = (f"{s['gain']:+.3f} ({s['gain_low']:+.3f} to {s['gain_high']:+.3f})"
                    if "gain" in s else "default")
            lines.append(f"{name:<26} {s['image']:>7.3f} {s['pixel']:>7.3f} {s['score']:>7.3f} {gain:>26}{mark}")
        v = self.validation
        lines.append(f"validation: {v.get('normal', 0)} normal images, {v.get('anomalous', 0)} with synthetic "
                     f"anomalies ({', '.join(v.get('kinds', []))})")
        lines += [f"note: {note}" for note in v.get("notes", [])]
        lines.append(f"choice: {self.choice} ({self.reason})")
        if self.image_score:
            separation = ", ".join(f"{rule} {value:.2f}" for rule, value in self.image_score["separation"].items())
            lines.append(f"image score: {self.image_score['choice']} ({self.image_score['reason']}; "
                         f"separation {separation})")
        return "\n".join(lines)


def _paste(image: np.ndarray, rng: np.random.Generator, kind: str, faint: bool
           ) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of `kind` pasted into `image`; `faint` blends it back towards the image (a
    contrast drawn from REDUCED_CONTRAST) unless the blend would round it away."""
    out, mask, _ = random_anomaly(image, rng, kinds=[kind])
    if faint:
        contrast = rng.uniform(*REDUCED_CONTRAST)
        blended = np.clip(np.rint(image.astype(np.float32) + contrast * (out.astype(np.float32) - image)), 0, 255)
        blended = blended.astype(np.uint8)
        faint_mask = (blended != image).any(axis=2) & mask
        if faint_mask.any():
            return blended, faint_mask
    return out, mask


def synthetic_anomalies(images: list[np.ndarray], seed: int, count: int
                        ) -> tuple[list[np.ndarray], list[np.ndarray], list[int], list[str]]:
    """`count` anomalous images made from `images` round-robin, each holding ANOMALIES_PER_IMAGE
    anomalies of different kinds (cycling through every kind): the first at full contrast in
    every other image, the others always blended back towards the normal image, so that the
    validation has anomalies of several sizes and contrasts, hard ones included, for the price of
    one backbone pass per image. Returns images, label masks (0 normal, k for the k-th anomaly;
    a later anomaly covers an earlier one where they overlap), the index of the normal image each
    was made from, and the kinds used."""
    rng = np.random.default_rng(seed)
    kinds = list(ANOMALY_KINDS)
    out, masks, sources, used = [], [], [], []
    for j in range(count):
        b = j % len(images)
        image, labels = images[b], np.zeros(images[b].shape[:2], np.uint8)
        for k in range(ANOMALIES_PER_IMAGE):
            kind = kinds[(j * ANOMALIES_PER_IMAGE + k) % len(kinds)]
            image, mask = _paste(image, rng, kind, faint=k > 0 or j % 2 == 1)
            labels[mask] = k + 1
            used.append(kind)
        out.append(image)
        masks.append(labels)
        sources.append(b)
    return out, masks, sources, sorted(set(used))


def labels_to_grid(labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A label mask (0 normal, k anomaly k) on the evaluation grid, each anomaly resized alone."""
    out = np.zeros(grid, np.uint8)
    for k in np.unique(labels[labels > 0]):
        out[mask_to_grid(labels == k, grid)] = k
    return out


def image_fractions(evidence: Evidence) -> np.ndarray:
    """(M, N): 1 where anomalous image j scores above normal image i, 0.5 on a tie (its mean over
    all pairs is the image AUROC)."""
    a, n = evidence.anomalous_scores[:, None], evidence.normal_scores[None, :]
    return (a > n) + 0.5 * (a == n)


def pixel_fractions(evidence: Evidence, masks: np.ndarray) -> np.ndarray:
    """(M, N): for anomalous image j and normal image i, the mean over j's anomalies of the
    fraction of i's pixels below each anomaly's pixels. Normal maps share one grid, so the mean
    over any set of normal images is the fraction over their pooled pixels: what lets the bootstrap
    resample normal images without sorting a pool per resample."""
    pixels, segments, owners, total = [], [], [], 0
    for j, (amap, labels) in enumerate(zip(evidence.anomalous_maps, masks)):
        labels = np.asarray(labels, np.uint8)
        for k in np.unique(labels[labels > 0]):
            pixels.append(amap[labels == k])
            segments.append(total)
            owners.append(j)
            total += len(pixels[-1])
    m, n = len(evidence.anomalous_maps), len(evidence.normal_maps)
    if not pixels:
        return np.full((m, n), np.nan)
    flat, owners = np.concatenate(pixels), np.asarray(owners)
    counts = np.diff([*segments, flat.size])
    per_anomaly = np.stack([np.add.reduceat(np.searchsorted(np.sort(normal.ravel()), flat, side="left"), segments)
                            / counts / normal.size for normal in evidence.normal_maps], axis=1)
    out = np.full((m, n), np.nan)
    for j in np.unique(owners):
        out[j] = per_anomaly[owners == j].mean(axis=0)
    return out


def rule_scores(evidence: Evidence, border: int = 0) -> dict[str, np.ndarray]:
    """The normal and anomalous validation images' scores under each rule of MAP_SCORE_RULES
    ("normal_<rule>", "anomalous_<rule>"), `border` pixels left out as the detector's scores leave
    them: what the image-score rule is chosen on."""
    out = {}
    for kind, maps in (("normal", evidence.normal_maps), ("anomalous", evidence.anomalous_maps)):
        flat = torch.from_numpy(np.ascontiguousarray(maps))
        out.update({f"{kind}_{rule}": image_scores(flat, rule, border).numpy() for rule in MAP_SCORE_RULES})
    return out


def validation_terms(evidence: dict[str, Evidence], masks: np.ndarray, border: int = 0
                     ) -> dict[str, dict[str, np.ndarray]]:
    """Each candidate's (M, N) image and pixel terms (see the module doc) and its `rule_scores`:
    everything the rules need, small enough for a benchmark to keep, so that a rule or a candidate
    set can be replayed on recorded validations (benchmarks/auto_candidates.py,
    benchmarks/selection_evidence.py)."""
    return {name: {"image": image_fractions(ev), "pixel": pixel_fractions(ev, masks), **rule_scores(ev, border)}
            for name, ev in evidence.items()}


def min_gain(shots: int) -> float:
    """The mean gain over the default a challenger must exceed when fitted on `shots` images:
    MIN_GAIN, ONE_SHOT_MIN_GAIN with one shot (module doc)."""
    return ONE_SHOT_MIN_GAIN if shots == 1 else MIN_GAIN


def choose_strategy(terms: dict[str, dict[str, np.ndarray]], default: str = DEFAULT_STRATEGY, seed: int = 0,
                    notes: list[str] | None = None, validation: dict[str, Any] | None = None,
                    image_weight: float = IMAGE_WEIGHT, min_gain: float = 0.0) -> SelectionReport:
    """The rule of the module doc over the candidates' `validation_terms`; `min_gain` from
    `min_gain(shots)` (`image_weight` given only by the probes that chose IMAGE_WEIGHT)."""
    if default not in terms:
        raise ValueError(f"the default strategy '{default}' has no validation evidence")
    values, scores, paired = {}, {}, {}
    for name, term in terms.items():
        image, pixel = np.asarray(term["image"], float), np.asarray(term["pixel"], float)
        paired[name] = image_weight * image + (1 - image_weight) * np.where(np.isnan(pixel), image, pixel)  # (M, N)
        values[name] = paired[name].mean(axis=1)
        scores[name] = {"image": float(image.mean()), "pixel": float(np.nanmean(pixel)) if np.isfinite(pixel).any()
                        else float("nan"), "score": float(values[name].mean())}
    rng = np.random.default_rng(seed)
    (m, n) = paired[default].shape
    anomalous = rng.integers(0, m, size=(BOOTSTRAP_RESAMPLES, m, 1))
    normal = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, 1, n))

    def resampled(name: str) -> np.ndarray:
        """(R,) the measure's mean over paired resamples of the anomalous AND the normal images:
        with 4-8 normal images, which ones are normal is as large a noise as which are anomalous."""
        return paired[name][anomalous, normal].mean(axis=(1, 2))

    base = resampled(default)
    lower = FAMILY_ERROR / max(1, len(terms) - 1)  # percent, Bonferroni over the challengers
    winners = []
    for name in terms:
        if name == default:
            continue
        low, high = np.percentile(resampled(name) - base, [lower, 100 - lower])
        scores[name].update(gain=float(values[name].mean() - values[default].mean()),
                            gain_low=float(low), gain_high=float(high))
        if low > 0 and scores[name]["gain"] > min_gain:
            winners.append(name)
    if winners:
        choice = max(winners, key=lambda n: (scores[n]["score"], -list(terms).index(n)))
        reason = (f"beats the default '{default}' by {scores[choice]['gain']:+.3f}"
                  + (f", above the minimum {min_gain:g}" if min_gain else "")
                  + f" (bootstrap {lower:.2g}th percentile {scores[choice]['gain_low']:+.3f} > 0)")
    else:
        choice = default
        best = max(terms, key=lambda n: scores[n]["score"])
        reason = ("the default: no candidate beats it beyond the validation's noise"
                  + (f" and by a mean gain above {min_gain:g}" if min_gain else "")
                  + (f" (best mean: {best}, {scores[best]['score']:.3f} vs {scores[default]['score']:.3f})"
                     if best != default else ""))
    return SelectionReport(choice, reason, scores, {**(validation or {}), "notes": list(notes or [])})


def separation(normal_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """How far the typical anomalous image scores above the normal ones, in units of the normal
    scores' spread: (median anomalous - mean normal) / std normal. The median, because half the
    validation anomalies are faint; the spread is floored so that identical normal scores (a
    constant map) cannot divide by zero."""
    normal = np.asarray(normal_scores, float)
    spread = max(float(normal.std()), 1e-9 * max(1.0, float(np.abs(normal).max())))
    return float((np.median(anomalous_scores) - normal.mean()) / spread)


def separation_gain_low(term: dict[str, np.ndarray], rule: str, default: str, seed: int = 0) -> float:
    """The bootstrap's lower bound (FAMILY_ERROR / challengers percentile) of `rule`'s separation
    minus `default`'s over paired resamples of the normal and the anomalous validation images: how
    much of a rule's lead survives which images happened to be drawn."""
    normal, anomalous = len(term[f"normal_{default}"]), len(term[f"anomalous_{default}"])
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(BOOTSTRAP_RESAMPLES // 4):
        a, b = rng.integers(0, normal, normal), rng.integers(0, anomalous, anomalous)
        gains.append(separation(term[f"normal_{rule}"][a], term[f"anomalous_{rule}"][b])
                     - separation(term[f"normal_{default}"][a], term[f"anomalous_{default}"][b]))
    return float(np.percentile(gains, FAMILY_ERROR / max(1, len(MAP_SCORE_RULES) - 1)))


def log_separation(normal_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """A separation that needs no spread: the median log ratio of the anomalous scores to the
    normal scores' mean. At one shot the normal images are views of one part, and their spread, the
    unit of `separation`, is anything from nothing to much (1 to 150 spreads in the records)."""
    ratio = np.maximum(np.asarray(anomalous_scores, float), 1e-12) / max(float(np.mean(normal_scores)), 1e-12)
    return float(np.median(np.log(ratio)))


def choose_image_score(term: dict[str, np.ndarray], default: str, shots: int = 1,
                       max_above: int | None = None, min_gain: float = 0.0, bootstrap: bool = False,
                       seed: int = 0, one_shot_log_margin: float | None = ONE_SHOT_LOG_MARGIN) -> dict[str, Any]:
    """The image-score rule of MAP_SCORE_RULES whose scores (a candidate's `rule_scores`, as in
    its validation term) separate the anomalous validation images furthest from the normal ones
    (module doc); `default` unless another does better by more than `min_gain` (in units of the
    normal scores' spread) and, with `bootstrap`, with a lower bound above zero
    (`separation_gain_low`). At one shot, with positive scores, by `log_separation` instead and a
    lead above `one_shot_log_margin` (None: as above shots). Fitted on more than `max_above`
    `shots` (None: never), the map's maximum (module doc). Returns {"choice", "reason",
    "separation": rule -> separation} (and "log_separation" where that decided)."""
    if default not in MAP_SCORE_RULES:
        raise ValueError(f"image-score rule '{default}' is not one of {MAP_SCORE_RULES}")
    values = {rule: separation(term[f"normal_{rule}"], term[f"anomalous_{rule}"]) for rule in MAP_SCORE_RULES}
    if max_above is not None and shots > max_above:
        return {"choice": "max", "separation": values,
                "reason": f"above {max_above} shots the map's maximum (auto_max_score_above): the validation's "
                          "separation favours the top-1% mean, the development categories' test sets did not"}
    if shots == 1 and one_shot_log_margin is not None and all(
            np.min(term[f"{kind}_{rule}"]) > 0 for kind in ("normal", "anomalous") for rule in MAP_SCORE_RULES):
        logs = {rule: log_separation(term[f"normal_{rule}"], term[f"anomalous_{rule}"]) for rule in MAP_SCORE_RULES}
        winners = [rule for rule in MAP_SCORE_RULES if rule != default and logs[rule] - logs[default] > one_shot_log_margin]
        out = {"separation": values, "log_separation": logs}
        if not winners:
            return {**out, "choice": default, "reason": "the default: at one shot no rule's log separation leads "
                                                        f"by more than {one_shot_log_margin:g}"}
        best = max(winners, key=lambda rule: logs[rule])
        return {**out, "choice": best, "reason": f"at one shot its log separation leads '{default}''s by "
                                                 f"{logs[best] - logs[default]:.3f}"}
    winners = [rule for rule in MAP_SCORE_RULES if rule != default and values[rule] - values[default] > min_gain
               and (not bootstrap or separation_gain_low(term, rule, default, seed) > 0)]
    if not winners:
        reason = "the default: no rule separates the validation anomalies further" + (
            " beyond the validation's noise" if bootstrap else "") + (f" by more than {min_gain:g}" if min_gain else "")
        return {"choice": default, "reason": reason, "separation": values}
    best = max(winners, key=lambda rule: values[rule])
    return {"choice": best, "reason": f"separates the validation anomalies further than '{default}'",
            "separation": values}


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
