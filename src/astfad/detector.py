"""Detector: fit on normal images, predict score, heat map, verdict and mask; save and load.

Fitting, for any strategy:
  1. features of the shots from each backbone the strategy needs (rotated copies of the shots
     join the semantic references when there are few of them);
  2. each expert's memory bank (the adapter is trained first when needed);
  3. normal validation maps: each shot scored against the bank of the OTHER shots (leave-one-out,
     k >= 2) or, with a single shot, augmented views of it; these fit the per-expert normalisers
     and the thresholds, so nothing is ever fitted on test images or per image;
  4. for `auto`, the expert selection system (selection.py) picks the strategy.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from astfad import __version__
from astfad.backbones import available_offline, default_weights_url, load_backbone
from astfad.config import (AUTO_EXPERTS, AUTO_EXPERTS_WHY, FEW_SHOTS, DetectorConfig, candidate_strategies,
                           experts_of, parse_strategy)
from astfad.data.images import load_image
from astfad.data.synthetic import ANOMALY_KINDS, random_anomaly
from astfad.data.views import Source, normal_view, rotate, view_to_source
from astfad.experts.base import Exclusions, flatten_patches
from astfad.experts.mutual import DEFAULT_FRACTION as MUTUAL_FRACTION
from astfad.experts.mutual import MIN_BATCH, mutual_distances, score_batch, split_batches
from astfad.experts.registry import REGISTRY, Expert, ExpertSpec
from astfad.features import FeatureCache, Featurizer, resolve_device, semantic_reader, texture_reader
from astfad.fusion import Normaliser, fuse
from astfad.modelfile import ModelFileError, read_model_file, write_model_file
from astfad.scoring import image_scores, mask_to_grid, to_eval_grid, to_image_size
from astfad.selection import (DEFAULT_STRATEGY, MAP_SCORE_RULES, MAX_ANOMALOUS_IMAGES, MIN_ANOMALOUS_IMAGES,
                              Evidence, SelectionReport, choose_image_score, choose_strategy, labels_to_grid, min_gain,
                              synthetic_anomalies, validation_terms)
from astfad.thresholds import CALIBRATION_WIDENING, TAIL_WIDENING, ThresholdModel

FORMAT_VERSION = 2  # 2: threshold models, target false-positive rates
ROTATION_ANGLES = tuple(range(0, 360, 45))
NORMAL_TARGET = 8  # shots + views in the normal set, when shots are few
MAX_VIEWS_PER_SHOT = 3
# aspect ratios within [1/1.5, 1.5] (square, 4:3, 3:2 frames) get 45-degree reference rotations; 1.25
# left 4:3 cookies with a half turn only and cost them 3 image-AUROC points at 1 shot (README)
NEAR_SQUARE = 1.5
TEXTURE_MAX_DIMS = 384
# Measured on ../shared/data with benchmarks/semantic_evidence.py (4 shots): blocks 6-8 of the
# offline ViT localise far better than its saliency-tuned last block (mean pixel AUROC 0.89 against
# 0.83 at 224 px, AUPRO 0.78 against 0.56); block 7 is at the top for both image and pixel AUROC.
# Official DINOv2 weights keep the exact AnomalyDINO recipe (last block).
OFFLINE_VIT_LAYERS = (7,)
# With one good image the normal scores are views of that one part, which agree with each other far
# better than new good parts agree with it: at a 1% target the threshold flags 17% of good test parts
# over the ten development categories (magnetic_tile 79%, pcb 57%), and no widening of the tail
# holds the rate without losing most defects (benchmarks/threshold_models.py, README "Verdicts").
ONE_SHOT_THRESHOLD_WARNING = ("fitted on one good image: its verdict threshold comes from views of that one "
                              "part and flags many new good parts (17% at a 1% target on the development "
                              "categories); calibrate it on more good images, or on 8 or more unsorted "
                              "ones of which most are good (astfad calibrate --normal | --unlabelled, "
                              "Detector.calibrate), or set a threshold")

ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass
class Prediction:
    """One image's result: `anomaly_map` (float32) and `mask` (bool) are at the image's own size."""

    score: float
    anomaly_map: np.ndarray
    is_anomalous: bool
    mask: np.ndarray
    path: str | None = None


def image_key(source: ImageInput) -> str | None:
    """Cache key of an input: the resolved path for files, None for in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source).resolve())
    return None


def as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """One image or a sequence of them, as a list."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images]
    return list(images)


def family_of(expert: str) -> str:
    """The backbone family an expert reads (declared in the expert registry)."""
    return REGISTRY[expert].family


def views_per_shot(shots: int) -> int:
    """How many views of each shot join the normal set: enough for about NORMAL_TARGET normal
    images, none once the shots alone are that many (each view costs a backbone pass)."""
    return min(MAX_VIEWS_PER_SHOT, max(0, -(-NORMAL_TARGET // shots) - 1))


def reference_angles(shots: int, aspect: float, rotate_references: bool | None) -> tuple[float, ...]:
    """Rotations added to the semantic references: none with many shots (or when turned off),
    45-degree steps for a near-square frame, a half turn for an elongated one."""
    if rotate_references is False or (rotate_references is None and shots > FEW_SHOTS):
        return ()
    if 1 / NEAR_SQUARE <= aspect <= NEAR_SQUARE:
        return ROTATION_ANGLES[1:]
    return (180.0,)


def owner_group(owners: torch.Tensor, regions: bool) -> torch.Tensor:
    """Two groups of owners for the held-out adapters: even / odd shots, or with one shot the two
    diagonals of quadrants (each group sees top and bottom, left and right)."""
    return (owners // 2 + owners % 2) % 2 if regions else owners % 2


def semantic_layers(config: DetectorConfig, num_blocks: int) -> tuple[int, ...]:
    if config.semantic_layers is not None:
        return config.semantic_layers
    if config.semantic_backbone == "dinov2_vits14" and config.semantic_weights is None:
        return OFFLINE_VIT_LAYERS
    return (num_blocks - 1,)


class Detector:
    """Few-shot anomaly detector for one product category."""

    def __init__(self, strategy: str = "semantic", *, cache: FeatureCache | None = None,
                 **config: Any) -> None:
        self.config = DetectorConfig(strategy=strategy, **config)
        if self.config.image_score == "reweight" and self.config.strategy != "texture":
            raise ValueError("image_score 'reweight' (PatchCore) applies to strategy 'texture' only")
        self.device = resolve_device(self.config.device)
        self.cache: FeatureCache = cache if cache is not None else {}
        self.experts: dict[str, Expert] = {}
        self.normalisers: dict[str, Normaliser] = {}
        self.featurizers: dict[str, Featurizer] = {}
        self.aspect: float | None = None
        self.shots: list[str] = []
        self.strategy: str | None = None  # the applied strategy (auto's choice, or the given one)
        self.image_score: str = self.config.image_score  # the rule in use (auto may validate another)
        self.test_flip: bool = bool(self.config.test_flip)  # in use: fit resolves None by the shot count
        self.threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.threshold_models: dict[str, ThresholdModel] = {}
        self.selection: dict[str, Any] | None = None
        # auto's validation terms per candidate (selection.validation_terms): kept for a benchmark
        # to record, not saved in the model file
        self.selection_terms: dict[str, dict[str, np.ndarray]] | None = None
        self.adapter_stats: dict[str, float] = {}
        self.fit_seconds: float = 0.0
        # how the thresholds were last recalibrated (`calibrate`): {"images", "unlabelled",
        # "above_threshold"}; None while they are the fit's
        self.calibration: dict[str, Any] | None = None
        self.fit_warnings: list[str] = []  # what the last fit warned about (the service shows them)

    # ---------------------------------------------------------------- features
    def featurizer(self, family: str) -> Featurizer:
        """The texture or semantic featurizer, loading its backbone on first use; its reader runs
        in the configured runtime, on the configured threads (astfad.runtime)."""
        if family not in self.featurizers:
            cfg = self.config
            if family == "texture":
                backbone = load_backbone(cfg.texture_backbone, cfg.texture_weights, self.device)
                read = texture_reader(backbone, cfg.texture_pool, TEXTURE_MAX_DIMS)
                identity = f"{backbone.backbone_id}|pool{cfg.texture_pool}"
                self.featurizers[family] = Featurizer(backbone, cfg.texture_size, 16, read, identity,
                                                      self.device, 8, self.cache, cfg.runtime, cfg.threads)
            elif family == "semantic":
                backbone = load_backbone(cfg.semantic_backbone, cfg.semantic_weights, self.device)
                layers = semantic_layers(cfg, backbone.num_blocks)
                identity = f"{backbone.backbone_id}|layers{','.join(map(str, layers))}"
                self.featurizers[family] = Featurizer(backbone, cfg.semantic_size, backbone.patch_size,
                                                      semantic_reader(backbone, layers), identity,
                                                      self.device, 4, self.cache, cfg.runtime, cfg.threads)
            else:
                raise ValueError(f"unknown feature family '{family}'")
        return self.featurizers[family]

    def features(self, family: str, images: Sequence[np.ndarray], keys: Sequence[str | None] | None = None,
                 mirrored: bool = False, aspect: float | None = None) -> torch.Tensor:
        """(N, D, h, w) features on the grid of `aspect` (default: the category's)."""
        return self.featurizer(family)(images, aspect or self._aspect(), keys, mirrored)

    def mirrors(self, images: Sequence[np.ndarray], keys: Sequence[str | None] | None,
                families: Sequence[str], aspect: float | None = None) -> dict[str, torch.Tensor] | None:
        """With the test-time flip in use: each family's features of the mirrored images, flipped
        back so that every patch sits where its content is in the image (the image's owners and
        masks apply unchanged); None without it."""
        if not self.test_flip:
            return None
        mirror_keys = [f"{k}#mirror" if k is not None else None for k in keys or [None] * len(images)]
        return {f: self.features(f, images, mirror_keys, mirrored=True, aspect=aspect) for f in families}

    def test_groups(self, arrays: Sequence[np.ndarray], families: Sequence[str]
                    ) -> list[tuple[float, list[int]]]:
        """The aspect each test image is read at, with the indices read at it: the category's for
        all (`test_grid` "category", or the `reweight` image score, which scores features of one
        grid), or each image's own ("own"). Images whose own aspects give the same grids for every
        family in `families` are one group, read in the same batches (magnetic_tile's 464 test
        image shapes make 51 groups)."""
        if self.config.test_grid == "category" or self.image_score == "reweight":
            return [(self._aspect(), list(range(len(arrays))))]
        groups: dict[tuple, tuple[float, list[int]]] = {}
        for i, array in enumerate(arrays):
            aspect = array.shape[1] / array.shape[0]
            grids = tuple(self.featurizer(f).grid(aspect) for f in families)
            groups.setdefault(grids, (aspect, []))[1].append(i)
        return list(groups.values())

    def feature_groups(self, arrays: Sequence[np.ndarray], keys: Sequence[str | None] | None,
                       families: Sequence[str]) -> list[FeatureGroup]:
        """Test images' features (and the mirror images', with the flip) per `test_groups` group."""
        out = []
        for aspect, indices in self.test_groups(arrays, families):
            images = [arrays[i] for i in indices]
            group_keys = [keys[i] for i in indices] if keys is not None else None
            out.append(FeatureGroup(indices, {f: self.features(f, images, group_keys, aspect=aspect) for f in families},
                                    self.mirrors(images, group_keys, families, aspect)))
        return out

    def group_maps(self, groups: Sequence[FeatureGroup], experts: Sequence[str] | None = None
                   ) -> dict[str, torch.Tensor]:
        """Each expert's (B, H, W) evaluation-grid maps of the images of `groups` (B their total),
        in the images' order: every group is mapped on its own grid, then resized to the
        evaluation grid like any map."""
        parts = [(g.indices, self.expert_maps(g.feats, experts=experts, mirrors=g.mirrors)) for g in groups]
        if len(parts) == 1:
            return parts[0][1]
        count = sum(len(indices) for indices, _ in parts)
        out = {}
        for name, first in parts[0][1].items():
            out[name] = first.new_empty((count, *first.shape[1:]))
            for indices, maps in parts:
                out[name][indices] = maps[name]
        return out

    def _aspect(self) -> float:
        if self.aspect is None:
            raise RuntimeError("the detector is not fitted")
        return self.aspect

    def eval_grid(self) -> tuple[int, int]:
        return self.config.eval_grid(self._aspect())

    # ---------------------------------------------------------------- fitting
    @staticmethod
    def load_images(images: Sequence[ImageInput]) -> tuple[list[np.ndarray], list[str | None]]:
        """Decode every input (ImageLoadError names a bad file) and give each its cache key."""
        images = as_list(images)
        return [load_image(x) for x in images], [image_key(x) for x in images]

    def fit(self, images: Sequence[ImageInput], keys: Sequence[str | None] | None = None,
            also: Sequence[str] = ()) -> "Detector":
        """Fit on normal images (paths, PIL images or arrays); `also` names experts to fit beyond
        the strategy's own (a benchmark scores every strategy from one fitted detector)."""
        start = time.perf_counter()
        arrays, auto_keys = self.load_images(images)
        if not arrays:
            raise ValueError("fit needs at least one normal image")
        keys = list(keys) if keys is not None else auto_keys
        cfg = self.config
        self.experts, self.normalisers, self.selection, self.adapter_stats = {}, {}, None, {}
        self.calibration = None
        self.selection_terms = None
        self.threshold_models = {}
        self.image_score = cfg.image_score
        self.test_flip = cfg.test_flip_at(len(arrays))
        self.shots = [k if k is not None else f"<array {i}>" for i, k in enumerate(keys)]
        self.aspect = cfg.aspect_ratio or statistics.median(a.shape[1] / a.shape[0] for a in arrays)
        torch.manual_seed(cfg.seed)
        auto = parse_strategy(cfg.strategy)[0] == "auto"
        if auto and not set(experts_of(DEFAULT_STRATEGY)) <= set(cfg.auto_experts):
            raise ValueError(f"auto_experts must include the experts of auto's default '{DEFAULT_STRATEGY}'")
        needed = set(cfg.auto_experts if auto else experts_of(cfg.strategy)) | set(also)
        specs = [spec for name, spec in REGISTRY.items() if name in needed]
        normal = self._normal_set(arrays, keys, sorted({s.family for s in specs}),
                                  with_view_pairs=any(s.trained for s in specs))
        references = {s.family: self._references(arrays, keys, normal, s.family) for s in specs if s.on_references}
        for spec in specs:
            if not spec.trained:
                self.experts[spec.name] = self._fitted(spec, normal, references)
        self._move_banks()
        exclusions = {f: self._owner_maps(normal.sources, tuple(t.shape[-2:])) for f, t in normal.features.items()}
        normal_maps = self.expert_maps(normal.features, exclusions, mirrors=normal.mirrors)
        held_out = {s.name: self._held_out(s, normal, references) for s in specs if s.trained}
        for name, maps in held_out.items():
            family = REGISTRY[name].family
            normal_maps[name] = maps(normal.features[family], exclusions[family],
                                     normal.mirrors and normal.mirrors[family])
        self.normalisers = {name: Normaliser.fit(m, cfg.normaliser) for name, m in normal_maps.items()}
        candidates = candidate_strategies(normal_maps)

        def normal_scores_of(strategies: Sequence[str]) -> dict[str, torch.Tensor]:
            """Each strategy's scores of the normal set under the detector's current rule."""
            return {c: self.scores(c, self.combine(c, normal_maps), normal.features.get("texture"),
                                   exclusions.get("texture")) for c in strategies}

        normal_scores = normal_scores_of(candidates)
        if auto:  # experts fitted only for `also` (a benchmark's fixed strategies) are not candidates
            validated = cfg.auto_candidates()
            self.selection = self._select(
                normal, exclusions, normal_maps, {c: normal_scores[c] for c in validated},
                {n: m for n, m in held_out.items() if n in cfg.auto_experts}).to_dict()
            self.strategy = self.selection["choice"]
            if self.image_score != cfg.image_score:  # normal scores with the rule auto validated
                normal_scores = normal_scores_of(candidates)
        else:
            self.strategy = cfg.strategy
            if self.strategy not in normal_scores:  # e.g. fusion_weighted_sum with another alpha
                normal_scores |= normal_scores_of([self.strategy])
        for spec in specs:  # a trained expert is trained on every shot only when it will be used
            if spec.trained and (spec.name in experts_of(self.strategy) or spec.name in also):
                self.experts[spec.name] = self._fitted(spec, normal, references)
        self._move_banks()
        self._fit_thresholds(normal_maps, normal_scores)
        self.fit_warnings = [ONE_SHOT_THRESHOLD_WARNING] if len(arrays) == 1 and cfg.threshold is None else []
        for message in self.fit_warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _normal_set(self, arrays: list[np.ndarray], keys: Sequence[str | None], families: Sequence[str],
                    with_view_pairs: bool) -> "NormalSet":
        """The shots and small shifted, photometric views of them (fewer the more shots there
        are: `views_per_shot`), with their features and sources. Each view depends only on the seed
        and its image, so cached view features stay valid for any subset of shots."""
        cfg = self.config
        images, view_keys, sources = list(arrays), list(keys), [Source(i) for i in range(len(arrays))]
        per_shot = views_per_shot(len(arrays))
        for i, (image, key) in enumerate(zip(arrays, keys)):
            count = per_shot or int(with_view_pairs and i < NORMAL_TARGET)  # trained experts need pairs
            rng = np.random.default_rng([cfg.seed, zlib.crc32(key.encode()) if key is not None else i])
            for j in range(count):
                view, box = normal_view(image, rng)
                images.append(view)
                view_keys.append(f"{key}#view{cfg.seed}.{j}" if key is not None else None)
                sources.append(Source(i, box))
        features = {f: self.features(f, images, view_keys) for f in families}
        return NormalSet(images, sources, features, self.mirrors(images, view_keys, families))

    def _owner_maps(self, sources: Sequence[Source], grid: tuple[int, int]) -> torch.Tensor:
        """(N, h, w) owner of each patch on a feature grid: the shot, or with a single shot the
        quadrant its content comes from, so nothing is ever matched against itself."""
        return torch.stack([s.owners(grid, self._aspect(), len(self.shots) == 1) for s in sources])

    def _references(self, arrays: list[np.ndarray], keys: Sequence[str | None], normal: "NormalSet",
                    family: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference features of a family with their owners: the shots, plus rotated copies of each
        when there are few of them (AnomalyDINO's augmentation for k <= 4): 45-degree steps for a
        near-square frame, a half turn otherwise (a quarter turn of an elongated frame is mostly fill)."""
        n = len(arrays)
        angles = reference_angles(n, self._aspect(), self.config.rotate_references)
        sources = normal.sources[:n] + [Source(i, angle=a) for i in range(n) for a in angles]
        rotated = [rotate(arrays[i], a) for i in range(n) for a in angles]
        rotated_keys = [f"{keys[i]}#rot{a}" if keys[i] is not None else None for i in range(n) for a in angles]
        feats = normal.features[family][:n]
        if rotated:
            feats = torch.cat([feats, self.features(family, rotated, rotated_keys)])
        grid = tuple(feats.shape[-2:])
        return feats, self._owner_maps(sources, grid)

    def _fitted(self, spec: ExpertSpec, normal: "NormalSet", references: dict[str, tuple[torch.Tensor, torch.Tensor]],
                group: int | None = None) -> Expert:
        """A registered expert fitted on the shots (or their references); a trained one first
        trained on view pairs, leaving out owner `group` when given (a held-out copy)."""
        expert = spec.build(self.config, self._blocks(spec.family))
        if spec.trained:
            anchors, positives, _ = self._view_pairs(normal, spec.family, group)
            negatives, owners = self._negatives(normal, spec.family)
            if group is not None:
                negatives = negatives[owner_group(owners, len(self.shots) == 1) != group]
            stats = expert.train(anchors, positives, self.config, negatives)
            prefix = "" if group is None else f"held_out_{group}_"
            self.adapter_stats.update({f"{prefix}{k}": v for k, v in stats.items()})
        if spec.on_references:
            expert.fit(*references[spec.family])
        else:
            n = len(self.shots)
            feats = normal.features[spec.family][:n]
            expert.fit(feats, self._owner_maps(normal.sources[:n], tuple(feats.shape[-2:])))
        return expert

    def _blocks(self, family: str) -> int:
        """How many equal-width blocks a family's features concatenate (ViT layers read)."""
        if family != "semantic":
            return 1
        return len(semantic_layers(self.config, self.featurizer(family).backbone.num_blocks))

    def _view_pairs(self, normal: "NormalSet", family: str, group: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Matching (M, D) patch pairs for a trained expert, with each pair's owner (M,): every
        view's features and the shot's features at the same content (sampled at the view's patch
        centres); with `group`, only patches whose owner is outside that group (the copy that must
        not see it)."""
        feats = normal.features[family]
        grid = tuple(feats.shape[-2:])
        regions = len(self.shots) == 1
        anchors, positives, owners = [], [], []
        for j, source in enumerate(normal.sources):
            if source.box == (0.0, 0.0, 1.0, 1.0):
                continue
            owner = source.owners(grid, self._aspect(), regions).reshape(-1)
            keep = owner_group(owner, regions) != group if group is not None else torch.ones_like(owner, dtype=torch.bool)
            anchors.append(flatten_patches(view_to_source(feats[source.shot], source.box, grid)[None])[keep])
            positives.append(flatten_patches(feats[j:j + 1])[keep])
            owners.append(owner[keep])
        if not anchors or sum(len(a) for a in anchors) == 0:
            raise ValueError("a trained expert needs views of the shots to train on")
        return torch.cat(anchors), torch.cat(positives), torch.cat(owners)

    def _negatives(self, normal: "NormalSet", family: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomalous patches for a trained expert to keep apart from the normal ones: one synthetic
        anomaly (kinds in turn) pasted into each of the first NORMAL_TARGET normal images, the
        patches it covers at least half of, with their owners (the content they were pasted
        into). Made once per fit, from a seed of their own (not selection's validation anomalies)."""
        if family not in normal.negatives:
            rng = np.random.default_rng([self.config.seed, 7])
            kinds = list(ANOMALY_KINDS)
            pasted = [random_anomaly(image, rng, kinds=[kinds[j % len(kinds)]])[:2]
                      for j, image in enumerate(normal.images[:NORMAL_TARGET])]
            feats = self.features(family, [image for image, _ in pasted])
            grid = tuple(feats.shape[-2:])
            covered = torch.from_numpy(np.stack([mask_to_grid(mask, grid) for _, mask in pasted])).reshape(-1)
            owners = self._owner_maps(normal.sources[:len(pasted)], grid).reshape(-1)
            normal.negatives[family] = (flatten_patches(feats)[covered], owners[covered])
        return normal.negatives[family]

    def _held_out(self, spec: ExpertSpec, normal: "NormalSet", references: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> Callable[[torch.Tensor, Exclusions, torch.Tensor | None], torch.Tensor]:
        """A trained expert's maps of normal (and synthetic) images from copies that never saw the
        scored content: two copies, each trained without one group of owners (even / odd shots,
        or with one shot diagonal quadrants), and every patch scored by the one that did not see
        its owner. Validating or thresholding the copy trained on every shot would flatter it."""
        regions = len(self.shots) == 1
        copies = [self._fitted(spec, normal, references, group) for group in (0, 1)]

        def maps(feats: torch.Tensor, exclude: Exclusions, mirrored: torch.Tensor | None) -> torch.Tensor:
            owners = torch.stack([torch.as_tensor(e).expand(feats.shape[-2:]) for e in exclude])
            first = owner_group(owners, regions) == 0

            def distances(x: torch.Tensor) -> torch.Tensor:
                return torch.where(first, copies[0].distances(x, exclude), copies[1].distances(x, exclude))

            raw = distances(feats) if mirrored is None else (distances(feats) + distances(mirrored)) / 2
            return to_eval_grid(raw, self.eval_grid(), self.config.blur_sigma)

        return maps

    def _select(self, normal: "NormalSet", exclusions: dict[str, torch.Tensor],
                normal_maps: dict[str, torch.Tensor], normal_scores: dict[str, torch.Tensor],
                held_out: dict[str, Callable[[torch.Tensor, Exclusions, torch.Tensor | None], torch.Tensor]]
                ) -> SelectionReport:
        """Score every candidate on synthetic anomalies pasted into the normal set (same exclusions
        as their normal image) and let selection.choose_strategy decide from that evidence."""
        cfg = self.config
        count = min(MAX_ANOMALOUS_IMAGES, max(MIN_ANOMALOUS_IMAGES, 3 * len(normal.images) // 2))
        images, masks, bases, kinds = synthetic_anomalies(normal.images, cfg.seed + 2, count)
        feats = {f: self.features(f, images) for f in normal.features}
        mirrored = self.mirrors(images, None, list(feats))
        exclude = {f: exclusions[f][bases] for f in exclusions}
        anomalous_maps = self.expert_maps(feats, exclude, mirrors=mirrored)
        for name, maps in held_out.items():
            family = REGISTRY[name].family
            anomalous_maps[name] = maps(feats[family], exclude[family], mirrored and mirrored[family])
        grid = self.eval_grid()
        true_masks = np.stack([labels_to_grid(m, grid) for m in masks])
        evidence = {}
        for name, normal_score in normal_scores.items():
            anomalous = self.combine(name, anomalous_maps)
            evidence[name] = Evidence(normal_score.numpy(), self.combine(name, normal_maps).numpy(),
                                      self.scores(name, anomalous, feats.get("texture"), exclude.get("texture")).numpy(),
                                      anomalous.numpy())
        notes = [f"{name} validated with copies that never saw the validated shot (or, with one shot, "
                 "quadrant)" for name in held_out]
        why = f"; {AUTO_EXPERTS_WHY}" if tuple(cfg.auto_experts) == AUTO_EXPERTS else ""
        notes += [f"{name} not validated: not in auto_experts ({', '.join(cfg.auto_experts)}){why}"
                  for name in REGISTRY if name not in cfg.auto_experts]
        if len(cfg.auto_experts) > 1 and not cfg.auto_fusions:
            notes.append("fusions of the experts not validated: auto_fusions is off (leave-one-category-out on "
                         "the development categories chose the experts alone; README)")
        validation = {"normal": len(normal.images), "anomalous": len(images), "kinds": kinds,
                      "single_shot_regions": len(self.shots) == 1}
        self.selection_terms = validation_terms(evidence, true_masks, self.score_border)
        report = choose_strategy(self.selection_terms, DEFAULT_STRATEGY, cfg.seed, notes, validation,
                                 min_gain=min_gain(len(self.shots)))
        if cfg.auto_image_score and cfg.image_score in MAP_SCORE_RULES:
            report.image_score = choose_image_score(self.selection_terms[report.choice], cfg.image_score,
                                                     len(self.shots), cfg.auto_max_score_above)
            self.image_score = report.image_score["choice"]
        return report

    def _move_banks(self) -> None:
        if self.device.type != "cpu":
            self.experts = {name: expert.to(self.device) for name, expert in self.experts.items()}

    def _fit_thresholds(self, normal_maps: dict[str, torch.Tensor], normal_scores: dict[str, torch.Tensor],
                        source: Literal["shots", "good", "unlabelled"] = "shots") -> None:
        """A threshold model per strategy from its normal scores and maps: the held-out shots', new
        good parts' (`calibrate`: a narrower tail, CALIBRATION_WIDENING) or unsorted parts' (robust,
        ThresholdModel.fit_robust; the normalisers are then kept); the applied strategy's thresholds
        at the configured false-positive rates (or the manual overrides)."""
        cfg = self.config

        def fit(scores: torch.Tensor, maps: torch.Tensor) -> ThresholdModel:
            if source == "unlabelled":
                return ThresholdModel.fit_robust(scores, maps, cfg.seed, image_fpr=cfg.target_fpr)
            widening = CALIBRATION_WIDENING if source == "good" else TAIL_WIDENING
            return ThresholdModel.fit(scores, maps, cfg.seed, widening)

        self.threshold_models = {name: fit(scores, self.combine(name, normal_maps))
                                 for name, scores in normal_scores.items()}
        if source != "unlabelled":
            self.normalisers["applied"] = Normaliser.fit(self.combine(self.strategy, normal_maps), cfg.normaliser)
        self.threshold = self.threshold_for()
        self.pixel_threshold = self.pixel_threshold_for()

    def threshold_for(self, target_fpr: float | None = None, strategy: str | None = None) -> float:
        """The image threshold at a target false-positive rate on good parts (default: the
        configured `target_fpr`, or the manual `threshold` for the applied strategy)."""
        strategy = strategy or self.strategy
        if target_fpr is None and strategy == self.strategy and self.config.threshold is not None:
            return float(self.config.threshold)
        return self._threshold_model(strategy).image.threshold(target_fpr or self.config.target_fpr)

    def pixel_threshold_for(self, target_fpr: float | None = None, strategy: str | None = None) -> float:
        """The pixel threshold at a target per-pixel false-positive rate on good parts."""
        strategy = strategy or self.strategy
        if target_fpr is None and strategy == self.strategy and self.config.pixel_threshold is not None:
            return float(self.config.pixel_threshold)
        return self._threshold_model(strategy).pixel.threshold(target_fpr or self.config.pixel_target_fpr)

    def _threshold_model(self, strategy: str) -> ThresholdModel:
        if strategy not in self.threshold_models:
            raise ValueError(f"no threshold model for strategy '{strategy}' "
                             f"(have: {', '.join(self.threshold_models) or 'none'})")
        return self.threshold_models[strategy]

    def calibrate(self, images: Sequence[ImageInput], target_fpr: float | None = None,
                  pixel_target_fpr: float | None = None, unlabelled: bool = False) -> "Detector":
        """Refit the normalisers and thresholds on extra good images, scored against the full banks
        (which stay as they are): for users with more good images than shots. `unlabelled`: images
        of which most, not all, are good (a day's production nobody sorted; at least MIN_BATCH):
        only the thresholds are refitted, robustly (ThresholdModel.fit_robust), so that a minority of
        defective parts among them moves them little; the normalisers stay the shots'."""
        if self.strategy is None:
            raise RuntimeError("the detector is not fitted; call fit() or Detector.load()")
        arrays, keys = self.load_images(images)
        least = MIN_BATCH if unlabelled else 2
        if len(arrays) < least:
            raise ValueError(f"calibrate needs at least {least} {'unlabelled' if unlabelled else 'good'} images, "
                             f"got {len(arrays)}")
        feats, maps = self.maps_of(arrays, keys, "all")
        if not unlabelled:
            self.normalisers = {name: Normaliser.fit(m, self.config.normaliser) for name, m in maps.items()}
        strategies = (*candidate_strategies(maps), self.strategy)
        scores = {c: self.scores(c, self.combine(c, maps), feats.get("texture")) for c in dict.fromkeys(strategies)}
        if target_fpr is not None:
            self.config.target_fpr = target_fpr
        if pixel_target_fpr is not None:
            self.config.pixel_target_fpr = pixel_target_fpr
        self._fit_thresholds(maps, scores, "unlabelled" if unlabelled else "good")
        fitted = self.threshold_for(self.config.target_fpr)  # not a manual threshold: the model's
        self.calibration = {"images": len(arrays), "unlabelled": unlabelled,
                            "above_threshold": int((scores[self.strategy] > fitted).sum())}
        return self

    # ---------------------------------------------------------------- scoring
    def expert_maps(self, feats: dict[str, torch.Tensor], exclude: dict[str, Exclusions] | None = None,
                    experts: Sequence[str] | None = None, batch_evidence: bool = False,
                    mirrors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each fitted expert's smoothed map on the evaluation grid, (B, H, W); `exclude` gives,
        per feature family, the owner each image (or patch) must not be matched against. With
        `test_flip`, `mirrors` (see `mirrors`) must come too: the patch distances of image and
        mirror image are averaged. With `batch_evidence`, an expert that searches the raw family
        features by cosine takes, per patch, the smaller of its distance and the batch's mutual
        score (experts/mutual.py): a variation most other parts of the batch share is not an
        anomaly even if no shot shows it."""
        if self.test_flip and mirrors is None:
            raise ValueError("test_flip is on: expert_maps needs the mirror images' features (Detector.mirrors)")
        grid, sigma = self.eval_grid(), self.config.blur_sigma
        out, mutual = {}, {}
        for name in experts or self.experts:
            family = family_of(name)
            raw = []
            for x in (feats[family], *([mirrors[family]] if self.test_flip else [])):
                d = self.experts[name].distances(x, (exclude or {}).get(family))
                if batch_evidence and REGISTRY[name].batch_evidence:
                    key = (family, len(raw))
                    if key not in mutual:
                        mutual[key] = mutual_distances(x)
                    d = torch.minimum(d, mutual[key])
                raw.append(d)
            out[name] = to_eval_grid(sum(raw) / len(raw), grid, sigma)
        return out

    def combine(self, strategy: str, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The strategy's map from the experts' maps (a fusion uses normal-fitted normalisers)."""
        rule, _ = parse_strategy(strategy)
        if rule == "auto":
            raise ValueError("'auto' is resolved at fit time; combine the chosen strategy")
        if rule in maps:
            return maps[rule]
        return fuse(strategy, maps, self.normalisers)

    def display_maps(self, expert_maps: dict[str, torch.Tensor], applied: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each expert's map and the applied strategy's map in z-units of their own normal
        statistics, so that one colour scale is fair to every column of a panel."""
        out = {name: self.normalisers[name].standardise(m) for name, m in expert_maps.items()}
        out[f"applied: {self.strategy}"] = self.normalisers["applied"].standardise(applied)
        return out

    @property
    def score_border(self) -> int:
        """Pixels of the evaluation grid left out of the image score on every edge (config)."""
        return self.config.score_border_pixels()

    def scores(self, strategy: str, maps: torch.Tensor, texture_feats: torch.Tensor | None = None,
               exclude: Exclusions = None) -> torch.Tensor:
        """Image scores with the detector's rule (`image_score`, or the one auto validated;
        PatchCore's reweighting for `reweight`, with the same exclusions as the maps so normal and
        test scores share one scale)."""
        if self.image_score == "reweight" and strategy == "texture":
            return self.experts["texture"].reweighted_scores(texture_feats, exclude)
        return image_scores(maps, self.image_score, self.score_border)

    def families(self, strategy: str | None = None) -> list[str]:
        names = experts_of(strategy or self.strategy) if strategy != "all" else tuple(self.experts)
        return sorted({family_of(n) for n in names})

    def extract(self, arrays: Sequence[np.ndarray], keys: Sequence[str | None] | None = None,
                strategy: str | None = None) -> dict[str, torch.Tensor]:
        """Backbone features of test images for the families a strategy (or 'all') needs."""
        return {f: self.features(f, arrays, keys) for f in self.families(strategy)}

    def maps_of(self, arrays: Sequence[np.ndarray], keys: Sequence[str | None] | None = None,
                strategy: str | None = None, batch_evidence: bool = False
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Backbone features (the texture reweighting reads them; empty when the images were read
        on several grids, which that rule never asks for) and each expert's map of decoded images,
        for the experts a strategy (default: the applied one; 'all': every fitted one) needs.
        Batch evidence compares the batch's images with each other, so it reads them all on the
        category's grid."""
        experts = None if strategy == "all" else experts_of(strategy or self.strategy)
        families = self.families(strategy)
        if batch_evidence:
            feats = self.extract(arrays, keys, strategy)
            return feats, self.expert_maps(feats, experts=experts, batch_evidence=True,
                                           mirrors=self.mirrors(arrays, keys, families))
        groups = self.feature_groups(arrays, keys, families)
        return groups[0].feats if len(groups) == 1 else {}, self.group_maps(groups, experts)

    def score_arrays(self, arrays: Sequence[np.ndarray], keys: Sequence[str | None] | None = None,
                     batch_evidence: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The applied strategy's (B, H, W) maps on the evaluation grid and (B,) image scores of
        decoded images: one backbone pass per family for the whole batch (see `expert_maps` for
        `batch_evidence`, which needs at least MIN_BATCH images)."""
        if self.strategy is None:
            raise RuntimeError("the detector is not fitted; call fit() or Detector.load()")
        feats, expert_maps = self.maps_of(arrays, keys, batch_evidence=batch_evidence)
        maps = self.combine(self.strategy, expert_maps)
        return maps, self.scores(self.strategy, maps, feats.get("texture"))

    def prediction(self, eval_map: torch.Tensor, score: torch.Tensor | float, size: tuple[int, int],
                   path: str | None = None) -> Prediction:
        """One image's Prediction from its evaluation-grid map and score, the map resized to the
        image's (height, width) in float32 (made one image at a time: full-size maps are big)."""
        full = to_image_size(eval_map, tuple(size)).numpy()
        return Prediction(float(score), full, bool(score > self.threshold), full > self.pixel_threshold, path)

    def predict_zero_shot(self, images: Sequence[ImageInput], fraction: float = MUTUAL_FRACTION) -> list[Prediction]:
        """Zero-shot (MuSc-style, experts/mutual.py): score a batch of at least 8 unlabelled images
        against each other with the semantic backbone; no normal image is needed. With no normal
        data, the thresholds and the overlay scale come from the batch itself, robustly (median
        and MAD of its image scores, the tail of its pixels), and are kept on the detector: a
        verdict here means "unusual within this batch", which holds while defects are rare in it."""
        arrays, _ = self.load_images(as_list(images))
        if len(arrays) < MIN_BATCH:
            raise ValueError(f"zero-shot scoring needs a batch of at least {MIN_BATCH} images, got {len(arrays)}")
        cfg = self.config
        self.aspect = cfg.aspect_ratio or statistics.median(a.shape[1] / a.shape[0] for a in arrays)
        self.strategy, self.shots = "zero_shot", []
        batch = score_batch(self.features("semantic", arrays), self.eval_grid(), cfg, fraction)
        self.threshold, self.pixel_threshold = batch.threshold, batch.pixel_threshold
        self.normalisers = {"applied": Normaliser.fit(batch.typical, "robust")}
        return [self.prediction(m, s, a.shape[:2], str(x) if isinstance(x, (str, os.PathLike)) else None)
                for m, s, a, x in zip(batch.maps, batch.scores, arrays, as_list(images))]

    def predict(self, images: Sequence[ImageInput], batch_size: int = 16,
                batch_evidence: bool = False) -> list[Prediction]:
        """Score images; ImageLoadError (naming the file) for an unreadable one. For many files,
        `astfad.pipeline.iter_predictions` streams instead and reports bad inputs one by one.
        `batch_evidence` adds the mutual evidence of each batch (at least MIN_BATCH images; a short
        last batch joins the one before) to the few-shot semantic distances: for batches of parts
        in which defects are rare; the thresholds stay those fitted on the normal shots."""
        images = as_list(images)
        if batch_evidence and len(images) < MIN_BATCH:
            raise ValueError(f"batch evidence needs at least {MIN_BATCH} images, got {len(images)}")
        out: list[Prediction] = []
        for chunk in split_batches(images, batch_size) if batch_evidence else \
                [images[i:i + batch_size] for i in range(0, len(images), batch_size)]:
            arrays, _ = self.load_images(chunk)
            maps, scores = self.score_arrays(arrays, batch_evidence=batch_evidence)  # test images are not cached
            out += [self.prediction(m, s, a.shape[:2], str(x) if isinstance(x, (str, os.PathLike)) else None)
                    for x, a, m, s in zip(chunk, arrays, maps, scores)]
        return out

    # ---------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        # the config as it scores: with the image-score rule auto validated and the flip resolved for
        # the shot count (any reader applies them)
        config = {**self.config.to_dict(), "image_score": self.image_score, "test_flip": self.test_flip}
        return {"format": FORMAT_VERSION, "astfad_version": __version__, "config": config,
                "strategy": self.strategy, "aspect": self.aspect, "shots": self.shots,
                "backbones": {f: z.backbone.backbone_id for f, z in self.featurizers.items()}, "experts": sorted(self.experts),
                "normalisers": {k: v.to_list() for k, v in self.normalisers.items()},
                "threshold": self.threshold, "pixel_threshold": self.pixel_threshold,
                "threshold_models": {k: v.to_dict() for k, v in self.threshold_models.items()},
                "selection": self.selection, "adapter_stats": self.adapter_stats,
                "calibration": self.calibration, "fit_seconds": self.fit_seconds}

    def save(self, path: str | os.PathLike, overwrite: bool = False, keep_candidates: bool = False) -> Path:
        """One safetensors file, written atomically: the tensors of the experts the applied
        strategy needs (every fitted expert with `keep_candidates`), JSON metadata in its header
        with a checksum of the tensors. Banks stay float32: in float16 a fusion's z-scored image
        score moved by up to 0.15 (stand-in backbones), and a loaded detector must score exactly
        as the fitted one."""
        if self.strategy is None:
            raise RuntimeError("cannot save a detector that is not fitted")
        names = sorted(self.experts) if keep_candidates else sorted(experts_of(self.strategy))
        families = {family_of(name) for name in names}
        meta = self.metadata()
        meta.update(experts=names,
                    normalisers={k: v for k, v in meta["normalisers"].items() if k in names or k == "applied"},
                    backbones={f: i for f, i in meta["backbones"].items() if f in families})
        tensors = {f"{name}.{key}": t for name in names for key, t in self.experts[name].tensors().items()}
        return write_model_file(path, meta, tensors, overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None, cache: FeatureCache | None = None,
             texture_weights: str | None = None, semantic_weights: str | None = None) -> "Detector":
        """Load a saved detector; ModelFileError names the file and what is wrong.

        Only the saved experts are built and only their backbones loaded. Loading never fetches
        anything, and never reads a weights file or URL named inside the model file: a model
        fitted with `semantic_weights=X` needs `Detector.load(path, semantic_weights=X)` again."""
        path = Path(path)
        meta, tensors = read_model_file(path, FORMAT_VERSION)
        # files from before the flip, the own test grids, the self-match and the score border were
        # fitted without them
        config = {"test_flip": False, "test_grid": "category", "self_match": 0, "score_border": 0.0,
                  **meta["config"]}
        config["threads"] = None  # this machine's cores, not those of the one that fitted it
        if device is not None:
            config["device"] = device
        if str(config.get("device", "auto")).startswith("cuda") and not torch.cuda.is_available():
            raise ModelFileError(f"'{path}' asks for device {config['device']!r}, which this machine lacks: "
                                 "load it with device='cpu'")
        names = meta["experts"]
        families = sorted({family_of(name) for name in names})
        given = {"texture": texture_weights, "semantic": semantic_weights}
        for family in families:
            key = f"{family}_weights"
            backbone = config.get(f"{family}_backbone", getattr(DetectorConfig, f"{family}_backbone"))
            if config.get(key) is not None and given[family] is None:
                raise ModelFileError(
                    f"'{path}' was fitted with {key}={config[key]!r}, and a model file never makes astfad "
                    f"read a path or URL it names: pass the weights again, Detector.load(path, {key}=...) "
                    f"(command line: --{key.replace('_', '-')} ...)")
            if given[family] is None and default_weights_url(backbone) and not available_offline(backbone):
                raise ModelFileError(
                    f"'{path}' needs backbone '{backbone}', whose weights are not on this machine, and "
                    f"loading a model never downloads: pass a local file, Detector.load(path, {key}=...)")
            config[key] = given[family]
            if family not in meta["backbones"]:
                raise ModelFileError(f"'{path}': field 'backbones' lacks '{family}', which expert(s) "
                                     f"{', '.join(n for n in names if family_of(n) == family)} read")
        strategy = config.pop("strategy", DetectorConfig.strategy)
        try:
            detector = cls(strategy, cache=cache, **config)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"'{path}': field 'config' {' '.join(str(exc).split())}") from None
        for key in ("strategy", "aspect", "shots", "threshold", "pixel_threshold", "fit_seconds"):
            setattr(detector, key, meta.get(key, getattr(detector, key)))
        detector.selection, detector.adapter_stats = meta.get("selection"), meta.get("adapter_stats") or {}
        detector.calibration = meta.get("calibration")
        detector.threshold_models = {k: ThresholdModel.from_dict(v)
                                     for k, v in (meta.get("threshold_models") or {}).items()}
        detector.normalisers = {k: Normaliser.from_list(v) for k, v in meta["normalisers"].items()}
        for name in names:
            expert = REGISTRY[name].build(detector.config, detector._blocks(REGISTRY[name].family))
            expert.load_tensors({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")})
            detector.experts[name] = expert
        for family in families:
            current = detector.featurizer(family).backbone.backbone_id
            if current != meta["backbones"][family]:
                raise ModelFileError(f"'{path}' was fitted with backbone {meta['backbones'][family]}, but "
                                     f"this installation provides {current}: install the same weights or refit")
        detector._move_banks()
        return detector


@dataclass
class FeatureGroup:
    """Test images read on one grid: their indices in the batch, each family's features and, with
    the test-time flip, those of the mirror images."""

    indices: list[int]
    feats: dict[str, torch.Tensor]
    mirrors: dict[str, torch.Tensor] | None


@dataclass
class NormalSet:
    """Normal images made from the shots (the shots first, then views), where each came from, and
    their features per family."""

    images: list[np.ndarray]
    sources: list[Source]
    features: dict[str, torch.Tensor]
    mirrors: dict[str, torch.Tensor] | None  # with test_flip: the mirror images' features (Detector.mirrors)
    # family -> anomalous patches pasted into these images (K, D) and their owners (K,), made once
    negatives: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def load(path: str | os.PathLike, device: str | None = None) -> Detector:
    """Load a saved detector (same as Detector.load)."""
    return Detector.load(path, device)
