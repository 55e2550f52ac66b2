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

import json
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from astfad import __version__
from astfad.backbones import load_backbone
from astfad.config import DetectorConfig, experts_of, grid_for, parse_strategy
from astfad.data.images import load_image
from astfad.data.views import random_view, rotate
from astfad.experts.adapter import Adapter, AdaptedSemanticExpert, align_view, flip_views, train_adapter
from astfad.experts.base import KNNExpert, flatten_patches
from astfad.experts.semantic import SemanticExpert
from astfad.experts.texture import TextureExpert
from astfad.features import FeatureCache, Featurizer, resolve_device, semantic_reader, texture_reader
from astfad.fusion import Normaliser, fuse
from astfad.scoring import image_scores, to_eval_grid, to_image_size

FORMAT_VERSION = 1
ROTATION_ANGLES = tuple(range(0, 360, 45))
MAX_HELD_OUT = 16
SINGLE_SHOT_VIEWS = 4
TEXTURE_MAX_DIMS = 384
# Measured on ../shared/data with benchmarks/semantic_layers.py (4 shots): blocks 6-8 of the
# offline ViT localise far better than its saliency-tuned last block (mean pixel AUROC 0.89 against
# 0.83 at 224 px, AUPRO 0.78 against 0.56); block 7 is at the top for both image and pixel AUROC.
# Official DINOv2 weights keep the exact AnomalyDINO recipe (last block).
OFFLINE_VIT_LAYERS = (7,)

ImageInput = str | os.PathLike | Image.Image | np.ndarray


class ModelFileError(ValueError):
    """A saved detector that cannot be loaded: wrong file, missing part, incompatible version."""


@dataclass
class Prediction:
    """One image's result: `anomaly_map` and `mask` are at the image's own size."""

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
    """The backbone family an expert reads: the CNN for texture, the ViT for the others."""
    return "texture" if expert == "texture" else "semantic"


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
        self.experts: dict[str, KNNExpert] = {}
        self.normalisers: dict[str, Normaliser] = {}
        self.featurizers: dict[str, Featurizer] = {}
        self.aspect: float | None = None
        self.shots: list[str] = []
        self.strategy: str | None = None  # the applied strategy (auto's choice, or the given one)
        self.threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.selection: dict[str, Any] | None = None
        self.adapter_stats: dict[str, float] = {}
        self.fit_seconds: float = 0.0

    # ---------------------------------------------------------------- features
    def featurizer(self, family: str) -> Featurizer:
        """The texture or semantic featurizer, loading its backbone on first use."""
        if family not in self.featurizers:
            cfg = self.config
            if family == "texture":
                backbone = load_backbone(cfg.texture_backbone, cfg.texture_weights, self.device)
                read = texture_reader(backbone, cfg.texture_pool, TEXTURE_MAX_DIMS)
                identity = f"{backbone.backbone_id}|pool{cfg.texture_pool}"
                self.featurizers[family] = Featurizer(backbone, cfg.texture_size, 16, read, identity,
                                                      self.device, 8, self.cache)
            elif family == "semantic":
                backbone = load_backbone(cfg.semantic_backbone, cfg.semantic_weights, self.device)
                layers = semantic_layers(cfg, backbone.num_blocks)
                identity = f"{backbone.backbone_id}|layers{','.join(map(str, layers))}"
                self.featurizers[family] = Featurizer(backbone, cfg.semantic_size, backbone.patch_size,
                                                      semantic_reader(backbone, layers), identity,
                                                      self.device, 4, self.cache)
            else:
                raise ValueError(f"unknown feature family '{family}'")
        return self.featurizers[family]

    def features(self, family: str, images: Sequence[np.ndarray],
                 keys: Sequence[str | None] | None = None) -> torch.Tensor:
        return self.featurizer(family)(images, self._aspect(), keys)

    def _aspect(self) -> float:
        if self.aspect is None:
            raise RuntimeError("the detector is not fitted")
        return self.aspect

    def eval_grid(self) -> tuple[int, int]:
        return grid_for(self.config.eval_size, self._aspect(), 1)

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
        self.shots = [k if k is not None else f"<array {i}>" for i, k in enumerate(keys)]
        self.aspect = cfg.aspect_ratio or statistics.median(a.shape[1] / a.shape[0] for a in arrays)
        torch.manual_seed(cfg.seed)
        needed = set(experts_of(cfg.strategy)) | set(also)
        if "semantic_adapter" in needed:
            needed.add("semantic")
        owners = torch.arange(len(arrays))
        feats: dict[str, torch.Tensor] = {}
        if "texture" in needed:
            feats["texture"] = self.features("texture", arrays, keys)
            expert = TextureExpert(cfg.coreset_budget, cfg.coreset_projection_dim, cfg.seed)
            expert.fit(feats["texture"], owners)
            self.experts["texture"] = expert
        if "semantic" in needed:
            feats["semantic"] = self.features("semantic", arrays, keys)
            refs, ref_owners = self._semantic_references(arrays, keys, feats["semantic"])
            expert = SemanticExpert(cfg.mask_background, cfg.seed)
            expert.fit(refs, ref_owners)
            self.experts["semantic"] = expert
            if "semantic_adapter" in needed:
                adapter, self.adapter_stats = self._train_adapter(arrays, keys, feats["semantic"])
                adapted = AdaptedSemanticExpert(adapter, cfg.mask_background, cfg.seed)
                adapted.fit(refs, ref_owners)
                self.experts["semantic_adapter"] = adapted
        self._move_banks()
        bases = self._validation_bases(arrays, keys, feats)
        normal_maps = self.expert_maps(bases.features, bases.exclude)
        self.normalisers = {name: Normaliser.fit(m, cfg.normaliser) for name, m in normal_maps.items()}
        if parse_strategy(cfg.strategy)[0] == "auto":
            from astfad.selection import select_strategy
            held_out = self._held_out_adapter_maps(arrays, keys, feats["semantic"], refs, ref_owners) \
                if len(arrays) >= 2 else None
            report = select_strategy(self, bases, normal_maps, held_out)
            self.selection = report.to_dict()
            self.strategy = report.choice
        else:
            self.strategy = cfg.strategy
        self._fit_thresholds(normal_maps, bases)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _semantic_references(self, arrays: list[np.ndarray], keys: Sequence[str | None],
                             feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference features: the shots, plus 8 rotations (45-degree steps) of each shot when
        there are few of them (AnomalyDINO's augmentation for k <= 4)."""
        rotate_refs = self.config.rotate_references
        if rotate_refs is None:
            rotate_refs = len(arrays) <= 4
        owners = torch.arange(len(arrays))
        if not rotate_refs:
            return feats, owners
        extra, extra_keys, extra_owners = [], [], []
        for i, (image, key) in enumerate(zip(arrays, keys)):
            for angle in ROTATION_ANGLES[1:]:
                extra.append(rotate(image, angle))
                extra_keys.append(f"{key}#rot{angle}" if key is not None else None)
                extra_owners.append(i)
        rotated = self.features("semantic", extra, extra_keys)
        return torch.cat([feats, rotated]), torch.cat([owners, torch.tensor(extra_owners)])

    def _train_adapter(self, arrays: list[np.ndarray], keys: Sequence[str | None],
                       feats: torch.Tensor) -> tuple[Adapter, dict[str, float]]:
        """An adapter trained on these shots' flip-and-jitter views; each image's views depend
        only on the seed and the image, so cached view features stay valid for any subset."""
        cfg = self.config
        views, view_keys, flips, sources = [], [], [], []
        for i, (image, key) in enumerate(zip(arrays, keys)):
            rng = np.random.default_rng([cfg.seed, zlib.crc32(key.encode()) if key is not None else i])
            for j, (view, dims) in enumerate(flip_views(image, rng, cfg.adapter_views)):
                views.append(view)
                view_keys.append(f"{key}#adapterview{cfg.seed}.{j}" if key is not None else None)
                flips.append(dims)
                sources.append(i)
        view_feats = self.features("semantic", views, view_keys)
        aligned = torch.stack([align_view(f, d) for f, d in zip(view_feats, flips)])
        anchors = flatten_patches(feats[torch.tensor(sources)])
        return train_adapter(anchors, flatten_patches(aligned), cfg.adapter_hidden,
                             cfg.adapter_steps, cfg.adapter_lr, cfg.seed)

    def _held_out_adapter_maps(self, arrays: list[np.ndarray], keys: Sequence[str | None],
                               feats: torch.Tensor, refs: torch.Tensor, ref_owners: torch.Tensor
                               ) -> Callable[[torch.Tensor, Sequence[int | None]], torch.Tensor]:
        """semantic_adapter maps for validation that no adapter saw: two adapters, each trained on
        half of the shots (even / odd positions), and every validation image scored by the one
        that was not trained on its source shot. The fitted adapter saw every shot, so validating
        it directly would flatter it."""
        cfg, n = self.config, len(arrays)
        experts = []
        for parity in (0, 1):
            train = [i for i in range(n) if i % 2 != parity]
            adapter, _ = self._train_adapter([arrays[i] for i in train], [keys[i] for i in train], feats[train])
            expert = AdaptedSemanticExpert(adapter, cfg.mask_background, cfg.seed)
            expert.fit(refs, ref_owners)
            experts.append(expert)

        def maps(semantic_feats: torch.Tensor, exclude: Sequence[int | None]) -> torch.Tensor:
            out = torch.empty(semantic_feats.shape[0], *self.eval_grid())
            for parity, expert in enumerate(experts):
                rows = [i for i, e in enumerate(exclude) if e % 2 == parity]
                if rows:
                    raw = expert.distances(semantic_feats[rows], [exclude[i] for i in rows])
                    out[rows] = to_eval_grid(raw, self.eval_grid(), cfg.blur_sigma)
            return out

        return maps

    def _move_banks(self) -> None:
        if self.device.type != "cpu":
            for expert in self.experts.values():
                expert.bank = expert.bank.to(self.device)

    def _validation_bases(self, arrays: list[np.ndarray], keys: Sequence[str | None],
                          feats: dict[str, torch.Tensor]) -> "ValidationBases":
        """Normal images to validate on without test data: up to 16 shots, each scored with its
        own patches left out; with a single shot, augmented views of it."""
        rng = np.random.default_rng(self.config.seed + 1)
        if len(arrays) >= 2:
            chosen = sorted(rng.choice(len(arrays), min(len(arrays), MAX_HELD_OUT), replace=False).tolist())
            return ValidationBases([arrays[i] for i in chosen], [keys[i] for i in chosen],
                                   list(chosen), {f: t[chosen] for f, t in feats.items()})
        views = [random_view(arrays[0], rng) for _ in range(SINGLE_SHOT_VIEWS)]
        view_keys = [f"{keys[0]}#view{self.config.seed}.{j}" if keys[0] is not None else None
                     for j in range(len(views))]
        return ValidationBases(views, view_keys, [None] * len(views),
                               {f: self.features(f, views, view_keys) for f in feats})

    def _fit_thresholds(self, normal_maps: dict[str, torch.Tensor], bases: "ValidationBases") -> None:
        cfg = self.config
        maps = self.combine(self.strategy, normal_maps)
        scores = self.scores(self.strategy, maps, bases.features.get("texture"), bases.exclude)
        self.normalisers["applied"] = Normaliser.fit(maps, cfg.normaliser)
        self.threshold = cfg.threshold if cfg.threshold is not None else \
            float(torch.quantile(scores.double(), cfg.threshold_quantile))
        if cfg.pixel_threshold is not None:
            self.pixel_threshold = cfg.pixel_threshold
        else:
            values = maps.flatten().double()
            if values.numel() > 1_000_000:
                values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(cfg.seed))[:1_000_000]]
            self.pixel_threshold = float(torch.quantile(values, cfg.pixel_threshold_quantile))

    # ---------------------------------------------------------------- scoring
    def expert_maps(self, feats: dict[str, torch.Tensor], exclude: Sequence[int | None] | None = None,
                    experts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Each fitted expert's smoothed map on the evaluation grid, (B, H, W)."""
        grid, sigma = self.eval_grid(), self.config.blur_sigma
        out = {}
        for name in experts or self.experts:
            out[name] = to_eval_grid(self.experts[name].distances(feats[family_of(name)], exclude), grid, sigma)
        return out

    def combine(self, strategy: str, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The strategy's map from the experts' maps (a fusion uses normal-fitted normalisers)."""
        rule, _ = parse_strategy(strategy)
        if rule == "auto":
            raise ValueError("'auto' is resolved at fit time; combine the chosen strategy")
        if rule in maps:
            return maps[rule]
        return fuse(strategy, maps["texture"], maps["semantic"], self.normalisers)

    def display_maps(self, expert_maps: dict[str, torch.Tensor], applied: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each expert's map and the applied strategy's map in z-units of their own normal
        statistics, so that one colour scale is fair to every column of a panel."""
        out = {name: self.normalisers[name].standardise(m) for name, m in expert_maps.items()}
        out[f"applied: {self.strategy}"] = self.normalisers["applied"].standardise(applied)
        return out

    def scores(self, strategy: str, maps: torch.Tensor, texture_feats: torch.Tensor | None = None,
               exclude: Sequence[int | None] | None = None) -> torch.Tensor:
        """Image scores with the configured rule (PatchCore's reweighting for `reweight`)."""
        if self.config.image_score == "reweight" and strategy == "texture":
            if exclude is not None and any(e is not None for e in exclude):
                return image_scores(maps, "max")  # held-out shots: reweighting needs the full bank
            return self.experts["texture"].reweighted_scores(texture_feats)
        return image_scores(maps, self.config.image_score)

    def families(self, strategy: str | None = None) -> list[str]:
        names = experts_of(strategy or self.strategy) if strategy != "all" else tuple(self.experts)
        return sorted({family_of(n) for n in names})

    def extract(self, arrays: Sequence[np.ndarray], keys: Sequence[str | None] | None = None,
                strategy: str | None = None) -> dict[str, torch.Tensor]:
        """Backbone features of test images for the families a strategy (or 'all') needs."""
        return {f: self.features(f, arrays, keys) for f in self.families(strategy)}

    def predict(self, images: Sequence[ImageInput], batch_size: int = 16) -> list[Prediction]:
        """Score images; ImageLoadError (naming the file) for an unreadable one."""
        if self.strategy is None:
            raise RuntimeError("the detector is not fitted; call fit() or Detector.load()")
        images = as_list(images)
        out: list[Prediction] = []
        needed = experts_of(self.strategy)
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            arrays, keys = self.load_images(chunk)
            feats = self.extract(arrays, keys)
            maps = self.combine(self.strategy, self.expert_maps(feats, experts=needed))
            scores = self.scores(self.strategy, maps, feats.get("texture"))
            for source, array, eval_map, score in zip(chunk, arrays, maps, scores):
                full = to_image_size(eval_map, array.shape[:2]).numpy().astype(np.float32)
                out.append(Prediction(float(score), full, bool(score > self.threshold),
                                      full > self.pixel_threshold,
                                      str(source) if isinstance(source, (str, os.PathLike)) else None))
        return out

    # ---------------------------------------------------------------- persistence
    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "astfad_version": __version__, "config": self.config.to_dict(),
                "strategy": self.strategy, "aspect": self.aspect, "shots": self.shots,
                "backbones": {f: z.backbone.backbone_id for f, z in self.featurizers.items()}, "experts": sorted(self.experts),
                "normalisers": {k: v.to_list() for k, v in self.normalisers.items()},
                "threshold": self.threshold, "pixel_threshold": self.pixel_threshold,
                "selection": self.selection, "adapter_stats": self.adapter_stats,
                "fit_seconds": self.fit_seconds}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """One safetensors file: tensors of every expert, JSON metadata in its header."""
        if self.strategy is None:
            raise RuntimeError("cannot save a detector that is not fitted")
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"'{path}' exists; choose another path or pass overwrite=True")
        tensors = {f"{name}.{key}": t.detach().cpu().contiguous()
                   for name, expert in self.experts.items() for key, t in expert.tensors().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".astfad-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"astfad": json.dumps(self.metadata())})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None,
             cache: FeatureCache | None = None) -> "Detector":
        """Load a saved detector; ModelFileError names the file and what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"no saved detector at '{path}'")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # safetensors raises several types for a foreign file
            raise ModelFileError(f"'{path}' is not an astfad detector file ({exc})") from None
        if "astfad" not in header:
            raise ModelFileError(f"'{path}' is a safetensors file without astfad metadata")
        meta = json.loads(header["astfad"])
        if meta.get("format") != FORMAT_VERSION:
            raise ModelFileError(f"'{path}' has detector format {meta.get('format')} "
                                 f"(astfad {meta.get('astfad_version')}); this astfad "
                                 f"({__version__}) reads format {FORMAT_VERSION}: refit it")
        config = dict(meta["config"])
        if device is not None:
            config["device"] = device
        strategy = config.pop("strategy")
        detector = cls(strategy, cache=cache, **config)
        detector.strategy, detector.aspect, detector.shots = meta["strategy"], meta["aspect"], meta["shots"]
        detector.threshold, detector.pixel_threshold = meta["threshold"], meta["pixel_threshold"]
        detector.selection, detector.adapter_stats = meta.get("selection"), meta.get("adapter_stats", {})
        detector.normalisers = {k: Normaliser.from_list(v) for k, v in meta["normalisers"].items()}
        detector.fit_seconds = meta.get("fit_seconds", 0.0)
        for name in meta["experts"]:
            expert = {"texture": lambda: TextureExpert(None),
                      "semantic": lambda: SemanticExpert(detector.config.mask_background),
                      "semantic_adapter": lambda: AdaptedSemanticExpert(None, detector.config.mask_background),
                      }[name]()
            prefix = f"{name}."
            part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if "bank" not in part:
                raise ModelFileError(f"'{path}' lacks the memory bank of expert '{name}'")
            expert.load_tensors(part)
            detector.experts[name] = expert
        for family, saved_id in meta["backbones"].items():
            current = detector.featurizer(family).backbone.backbone_id
            if current != saved_id:
                raise ModelFileError(f"'{path}' was fitted with backbone {saved_id}, but this "
                                     f"installation provides {current}: install the same weights or refit")
        detector._move_banks()
        return detector


@dataclass
class ValidationBases:
    """Normal images for validation, with the owner each must not be matched against."""

    images: list[np.ndarray]
    keys: list[str | None]
    exclude: list[int | None]
    features: dict[str, torch.Tensor]


def load(path: str | os.PathLike, device: str | None = None) -> Detector:
    """Load a saved detector (same as Detector.load)."""
    return Detector.load(path, device)
