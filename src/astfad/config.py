"""Configuration of a detector: one dataclass, saved as JSON beside the tensors.

Every field has a default that works offline; a saved detector stores the full config so that a
loaded detector scores exactly as the one that was fitted.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from astfad.experts.registry import REGISTRY

SINGLE_STRATEGIES = tuple(REGISTRY)  # one expert's map alone
FUSION_RULES = ("fusion_add", "fusion_mul", "fusion_max", "fusion_weighted_sum")
DEFAULT_PAIR = ("texture", "semantic")  # what a fusion combines unless it names its pair
# the weighted sums a candidate set holds (alpha weighs the pair's first expert); 0.5 is fusion_add
# halved, the same ranking: not a separate candidate
CANDIDATE_ALPHAS = (0.3, 0.7)
IMAGE_SCORE_RULES = ("top1", "max", "reweight")
TEST_GRIDS = ("category", "own")  # how a test image is read (DetectorConfig.test_grid)
# the experts `auto` validates (each alone; with `auto_fusions`, also every fusion of each pair of
# them). Chosen by leave-one-category-out over the ten development categories
# (benchmarks/auto_candidates.py on the validations the benchmark records, 1, 4 and 16 shots
# pooled): semantic and subspace alone in 8 of 10 folds, their fusions added in the others. With
# texture and its fusions as candidates, the synthetic validation chose texture on the generated
# screw in 6 of 6 one- and four-shot cells, 37 and 10 points under semantic there; the adapter loses
# to semantic in most folds and its validation costs two trainings
AUTO_EXPERTS = ("semantic", "subspace")
# up to this many shots the semantic references are rotated (AnomalyDINO's augmentation); above it
# the references are not, and the test-time flip is on instead (`test_flip` None)
FEW_SHOTS = 4
AUTO_EXPERTS_WHY = ("the default candidates, semantic and subspace, were chosen by leave-one-category-out "
                    "on the development categories (README)")


def _strategy_parts(strategy: str) -> tuple[str, float | None, tuple[str, ...]]:
    """(rule, alpha, experts) of a strategy name; see `parse_strategy`."""
    name, *args = strategy.split(":")
    valid = ", ".join((*SINGLE_STRATEGIES, *FUSION_RULES[:3], "fusion_weighted_sum:<alpha>", "auto"))
    if name in SINGLE_STRATEGIES or name == "auto":
        if args:
            raise ValueError(f"strategy '{strategy}' takes no argument")
        return name, None, (SINGLE_STRATEGIES if name == "auto" else (name,))
    if name not in FUSION_RULES:
        raise ValueError(f"unknown strategy '{strategy}'; valid: {valid} (a fusion may end with "
                         f":<expert>+<expert>, default {'+'.join(DEFAULT_PAIR)})")
    pair = DEFAULT_PAIR
    if args and "+" in args[-1]:
        pair = tuple(args.pop().split("+"))
        if len(pair) != 2 or pair[0] == pair[1] or any(e not in SINGLE_STRATEGIES for e in pair):
            raise ValueError(f"strategy '{strategy}': a fusion combines two different experts of "
                             f"{', '.join(SINGLE_STRATEGIES)}")
    alpha = None
    if name == "fusion_weighted_sum":
        try:
            alpha = float(args.pop(0)) if args else 0.5
        except ValueError:
            raise ValueError(f"strategy '{strategy}': alpha must be a number in [0, 1]") from None
        if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
            raise ValueError(f"strategy '{strategy}': alpha must be in [0, 1]")
    if args:
        raise ValueError(f"strategy '{strategy}': unexpected argument '{':'.join(args)}'")
    return name, alpha, pair


def parse_strategy(strategy: str) -> tuple[str, float | None]:
    """Split a strategy name into (rule, alpha); alpha only for `fusion_weighted_sum:<alpha>`.
    Singles are the registered experts; a fusion rule may name its pair of experts last
    (`fusion_max:texture+subspace`, `fusion_weighted_sum:0.3:texture+subspace`).

    Raises ValueError with the list of valid names for anything else.
    """
    rule, alpha, _ = _strategy_parts(strategy)
    return rule, alpha


def is_fixed_strategy(name: str) -> bool:
    """A strategy that applies experts as named, with no choice made per category: not `auto`, and
    not a benchmark's pseudo-strategies (`preset:<name>`, `zero_shot`, `oracle`), which do not parse."""
    try:
        return parse_strategy(name)[0] != "auto"
    except ValueError:
        return False


def experts_of(strategy: str) -> tuple[str, ...]:
    """The experts a strategy needs (for a fusion: its pair, the first weighed by alpha)."""
    return _strategy_parts(strategy)[2]


def fusion_strategies(pair: tuple[str, str]) -> tuple[str, ...]:
    """Every fusion rule over one pair of experts, named as `parse_strategy` reads them (the default
    pair without its suffix)."""
    suffix = "" if tuple(pair) == DEFAULT_PAIR else f":{pair[0]}+{pair[1]}"
    return (*(f"{rule}{suffix}" for rule in FUSION_RULES[:3]),
            *(f"fusion_weighted_sum:{alpha}{suffix}" for alpha in CANDIDATE_ALPHAS))


def candidate_strategies(experts: Iterable[str]) -> tuple[str, ...]:
    """The strategies a set of fitted experts offers: each alone, and every fusion over each pair
    of them (registry order, so the default pair keeps its short names)."""
    wanted = set(experts)
    names = [e for e in SINGLE_STRATEGIES if e in wanted]
    return (*names, *(f for pair in itertools.combinations(names, 2) for f in fusion_strategies(pair)))


@dataclass
class DetectorConfig:
    """All knobs of a detector. Sizes are the side of an equal-area square: a category whose
    images are 2.5:1 gets a 2.5:1 input grid of the same pixel count, so nothing is distorted."""

    strategy: str = "semantic"
    seed: int = 0
    auto_experts: tuple[str, ...] = AUTO_EXPERTS
    auto_fusions: bool = False  # also validate the fusions of each pair of auto_experts
    # auto also validates the image-score rule (image_score, or the other of top1 / max) on its
    # chosen candidate (selection.choose_image_score); off: image_score as given
    auto_image_score: bool = True
    # with auto_image_score, the map's maximum without validation when fitted on more than this many
    # images: better ranking at 16 shots, but the fitted thresholds lose recall on it (README)
    auto_max_score_above: int | None = None
    device: str = "auto"
    # how backbones run: "torch", "onnxruntime" or "auto" (the fastest measured at no accuracy loss)
    runtime: str = "torch"
    threads: int | None = None  # torch, faiss and ONNX Runtime threads; None: all cores
    # texture expert (PatchCore)
    texture_backbone: str = "efficientnet_lite0"
    texture_weights: str | None = None
    texture_size: int = 256
    texture_pool: int = 3
    coreset_budget: int = 20000
    coreset_projection_dim: int = 128
    # semantic expert (DINOv2 patch kNN)
    semantic_backbone: str = "dinov2_vits14"
    semantic_weights: str | None = None
    semantic_size: int = 448
    semantic_layers: tuple[int, ...] | None = None  # None: the backbone's measured default
    rotate_references: bool | None = None  # None: on when fitted with <= 4 images
    mask_background: bool = False
    # self-match: a semantic patch distance gives up half its excess over the distance to the patch's
    # k-th look-alike elsewhere on the same image (farther than SELF_RADIUS patches): a structure the
    # shots lack but the part itself repeats (a pad, a thread, its texture) is normal, a defect is
    # usually unique on its part. 0: off. k = 4 kept against k = 1 by leave-one-category-out over the
    # ten development categories (k = 1 helps pcb alone, held out -0.15), README "Self-match"
    self_match: int = 4
    # subspace expert: fraction of the normal tokens' variance its principal subspace keeps
    subspace_variance: float = 0.99
    # adapter
    adapter_hidden: int = 128
    adapter_steps: int = 150
    adapter_lr: float = 1e-3
    adapter_views: int = 2
    # scoring protocol, shared by every strategy
    eval_size: int = 256
    # Gaussian smoothing of the upsampled maps: none (leave-one-category-out over the ten development
    # categories; PatchCore's sigma 4 hid small defects: benchmarks/setting_sweep.py)
    blur_sigma: float = 0.0
    image_score: str = "top1"
    # share of the evaluation grid's side (eval_size) left out of the image score on every edge
    # (0.03: about one ViT patch): the outermost patches light up on good parts where the frame
    # cuts the part. Off: the semantic expert's leave-one-category-out chose 0.03, but `auto` with
    # it lost held out over the ten development categories (README, "Image-score border")
    score_border: float = 0.0
    # test-time flip: every map (of test, normal and validation images alike) is the mean of the
    # image's patch distances and those of its mirror image, flipped back: two backbone passes.
    # None: on when fitted with more than FEW_SHOTS images (leave-one-category-out, README)
    test_flip: bool | None = None
    aspect_ratio: float | None = None  # width / height; None: median of the fitted images
    # how a test image is read: "own" at its own aspect with the same pixel count, its maps resized to
    # the evaluation grid after (parts photographed at several shapes keep their geometry);
    # "category" squashed to the category's aspect, the grid the normal images are read on (and the
    # one PatchCore's `reweight` image score always reads: it scores features of one grid). "own":
    # leave-one-category-out over the ten development categories, 10 of 10 folds (README, "Grids")
    test_grid: str = "own"
    # normalisation and thresholds (from normal data only)
    normaliser: str = "zscore"  # or "robust" (median / MAD)
    target_fpr: float = 0.01  # false alarms on good parts the image threshold allows
    pixel_target_fpr: float = 0.001  # per-pixel false-positive rate of the defect mask on good parts
    threshold: float | None = None  # manual override of the image threshold
    pixel_threshold: float | None = None
    # selection
    pinned: dict[str, str] = field(default_factory=dict)

    def eval_grid(self, aspect: float) -> tuple[int, int]:
        """(height, width) of the evaluation grid at width / height `aspect`: the pixel count of an
        eval_size square, in one-pixel steps (maps, masks and metrics all live on it)."""
        return grid_for(self.eval_size, aspect, 1)

    def score_border_pixels(self) -> int:
        """The image score's border in pixels of the evaluation grid (`score_border` of eval_size)."""
        return int(round(self.score_border * self.eval_size))

    def test_flip_at(self, shots: int) -> bool:
        """Whether a detector fitted on `shots` images flips: as set, or above FEW_SHOTS."""
        return self.test_flip if self.test_flip is not None else shots > FEW_SHOTS

    def auto_candidates(self) -> tuple[str, ...]:
        """The strategies `auto` validates."""
        names = candidate_strategies(self.auto_experts)
        return names if self.auto_fusions else tuple(n for n in names if n in SINGLE_STRATEGIES)

    def __post_init__(self) -> None:
        parse_strategy(self.strategy)
        if self.image_score not in IMAGE_SCORE_RULES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORE_RULES}, got '{self.image_score}'")
        for name in ("target_fpr", "pixel_target_fpr"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.normaliser not in ("zscore", "robust"):
            raise ValueError(f"normaliser must be 'zscore' or 'robust', got '{self.normaliser}'")
        if self.semantic_layers is not None:
            self.semantic_layers = tuple(int(i) for i in self.semantic_layers)
        self.auto_experts = tuple(self.auto_experts)
        unknown = [e for e in self.auto_experts if e not in SINGLE_STRATEGIES]
        if unknown or not self.auto_experts:
            raise ValueError(f"auto_experts must name experts of {', '.join(SINGLE_STRATEGIES)}, got "
                             f"{list(self.auto_experts)}")
        for name in ("auto_fusions", "auto_image_score"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.auto_max_score_above is not None and not _whole_at_least(self.auto_max_score_above, 0):
            raise ValueError(f"auto_max_score_above must be a whole number >= 0 or null (never), "
                             f"got {self.auto_max_score_above!r}")
        if self.test_flip is not None and not isinstance(self.test_flip, bool):
            raise ValueError(f"test_flip must be true, false or null (on above {FEW_SHOTS} shots), "
                             f"got {self.test_flip!r}")
        if not _whole_at_least(self.self_match, 0):
            raise ValueError(f"self_match must be a whole number >= 0 (0: off), got {self.self_match!r}")
        if self.test_grid not in TEST_GRIDS:
            raise ValueError(f"test_grid must be one of {TEST_GRIDS}, got '{self.test_grid}'")
        if not 0.0 <= self.score_border < 0.25:
            raise ValueError(f"score_border must be in [0, 0.25) (0: the whole map), got {self.score_border}")
        if not self.blur_sigma >= 0:
            raise ValueError(f"blur_sigma must be >= 0 (0: no smoothing), got {self.blur_sigma}")
        for name in ("texture_size", "semantic_size", "eval_size"):
            if getattr(self, name) < 32:
                raise ValueError(f"{name} must be at least 32 pixels")
        from astfad.runtime import RUNTIMES

        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got '{self.runtime}'")
        if self.threads is not None and (isinstance(self.threads, bool) or int(self.threads) != self.threads
                                         or self.threads < 1):
            raise ValueError(f"threads must be a whole number >= 1 or None (all cores), got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DetectorConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)


def _whole_at_least(value: Any, minimum: int) -> bool:
    """An int, not a bool, of at least `minimum` (settings arrive typed from YAML and JSON)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def grid_for(size: int, aspect: float, multiple: int) -> tuple[int, int]:
    """(height, width) with height * width close to size**2, width / height close to `aspect`,
    both multiples of `multiple` (the backbone's patch or stride)."""
    aspect = min(max(aspect, 0.25), 4.0)
    height = size / math.sqrt(aspect)
    width = size * math.sqrt(aspect)
    return (max(multiple, int(round(height / multiple)) * multiple),
            max(multiple, int(round(width / multiple)) * multiple))
