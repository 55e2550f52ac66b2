"""Benchmark: dataset x shots x seeds x strategies -> one results row per cell.

One protocol for every cell (same grids, upsampling, blur, image-score rule and metric grid), so
only the strategy differs. Per category, each image passes each backbone once: the feature cache
is shared by every (shots, seed) detector, and one fitted detector scores every strategy of its
(shots, seed) from the same expert maps. Finished cells are appended to results.csv at once; a
rerun with the same configuration skips them, and a failing cell is logged and skipped.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from astfad.config import DetectorConfig, experts_of, grid_for, parse_strategy
from astfad.data.datasets import Category, Sample, sample_shots, scan_dataset
from astfad.data.images import ImageLoadError, image_size, load_image, load_mask
from astfad.detector import Detector
from astfad.metrics import evaluate
from astfad.report import RESULT_COLUMNS, append_row, plot_results, read_results, write_summary
from astfad.scoring import mask_to_grid
from astfad.selection import load_pinned, pinned_strategy
from astfad.visualize import zscore_panel

FIXED_STRATEGIES = ("texture", "semantic", "semantic_adapter", "fusion_add", "fusion_mul", "fusion_max",
                    "fusion_weighted_sum:0.3", "fusion_weighted_sum:0.5", "fusion_weighted_sum:0.7")
PANEL_EXPERTS = ("texture", "semantic", "semantic_adapter")
EXTRACT_CHUNK = 16


@dataclass
class BenchmarkSpec:
    """What to run; `config` holds DetectorConfig overrides shared by every cell."""

    data: Path
    out: Path
    layout: str = "auto"
    categories: Sequence[str] | None = None
    shots: Sequence[int] = (1, 4)
    seeds: Sequence[int] = (0,)
    strategies: Sequence[str] = (*FIXED_STRATEGIES, "auto")
    sampling: str = "random"
    pinned: str | None = None
    panels_per_type: int = 2
    config: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to reuse finished cells: everything that changes a
        cell's numbers (config, sampling, pinned map, data), not the list of cells."""
        return {"data": str(Path(self.data).resolve()), "layout": self.layout, "sampling": self.sampling,
                "pinned": self.pinned, "config": DetectorConfig(**self.config).to_dict()}


@dataclass
class TestSet:
    """A category's test images, decoded once, with masks on the evaluation grid."""

    samples: list[Sample]
    images: list[np.ndarray]
    keys: list[str]
    masks: np.ndarray  # (N, H, W) bool on the evaluation grid
    labels: np.ndarray
    pixel_valid: np.ndarray  # False for anomalous images without a usable mask
    skipped: list[str]

    def metrics(self, scores: np.ndarray, maps: np.ndarray) -> dict[str, float]:
        """All metrics; pixel metrics leave out anomalous images that have no mask."""
        if self.pixel_valid.all():
            return evaluate(self.labels, scores, self.masks, maps)
        out = evaluate(self.labels, scores)
        v = self.pixel_valid
        pixel = evaluate(self.labels[v], scores[v], self.masks[v], maps[v])
        return {**out, **{k: pixel[k] for k in pixel if k.startswith("pixel") or k == "aupro"}}


def category_aspect(category: Category) -> float:
    """Median width / height of the category's normal training images (normal data only): one
    grid per category, so features are shared by every seed and shot count."""
    ratios = []
    for sample in category.train:
        try:
            h, w = image_size(sample.path)
            ratios.append(w / h)
        except ImageLoadError:
            continue
    return statistics.median(ratios) if ratios else 1.0


def load_test_set(category: Category, grid: tuple[int, int], log: Callable[[str], None]) -> TestSet:
    """Decode test images and masks; a bad file is logged with its reason and left out."""
    samples, images, masks, valid, skipped = [], [], [], [], []
    for sample in category.test:
        try:
            image = load_image(sample.path)
            if sample.label and sample.mask_path is not None:
                mask = load_mask(sample.mask_path, image.shape[:2], sample.path)
            else:
                mask = np.zeros(image.shape[:2], bool)
        except ImageLoadError as exc:
            skipped.append(str(exc))
            log(f"{category.name}: skipped test image: {exc}")
            continue
        samples.append(sample)
        images.append(image)
        valid.append(not sample.label or sample.mask_path is not None)
        masks.append(mask_to_grid(mask, grid))
    return TestSet(samples, images, [str(s.path.resolve()) for s in samples],
                   np.stack(masks) if masks else np.zeros((0, *grid), bool),
                   np.array([s.label for s in samples]), np.array(valid, bool), skipped)


def _cell_key(row: dict[str, Any]) -> tuple:
    return row["category"], int(row["shots"]), int(row["seed"]), row["strategy"]


def _needed_experts(strategies: Sequence[str], pinned: dict[str, str], category: str) -> set[str]:
    needed: set[str] = set()
    for strategy in strategies:
        applied = pinned_strategy(category, pinned) if strategy.startswith("preset") else strategy
        needed |= set(experts_of(applied))
    return needed


class Benchmark:
    """Runs a BenchmarkSpec; `run()` returns every row of results.csv (old and new)."""

    def __init__(self, spec: BenchmarkSpec, log: Callable[[str], None] = print, progress: bool = True) -> None:
        self.spec = spec
        self.log_fn = log
        self.progress = progress
        self.out = Path(spec.out)
        self.results = self.out / "results.csv"
        self.pinned = load_pinned(spec.pinned)
        for strategy in spec.strategies:
            if strategy != "preset":
                parse_strategy(strategy)
        if "preset" in spec.strategies and not self.pinned:
            raise ValueError("strategy 'preset' needs --pinned (a preset name or a strategy map file)")

    def log(self, message: str) -> None:
        self.log_fn(message)
        with open(self.out / "benchmark.log", "a") as handle:
            handle.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")

    def _check_out(self) -> None:
        """Refuse to mix results of another configuration into an existing folder."""
        self.out.mkdir(parents=True, exist_ok=True)
        run_file = self.out / "run.json"
        identity = json.loads(json.dumps(self.spec.identity()))  # tuples compare as JSON lists
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != identity:
                changed = sorted(k for k in identity if previous.get(k) != identity[k])
                raise ValueError(f"'{self.out}' holds results of another configuration (differs in: "
                                 f"{', '.join(changed)}); choose another --out")
        else:
            run_file.write_text(json.dumps(identity, indent=2))

    def run(self) -> list[dict[str, Any]]:
        self._check_out()
        finished = {_cell_key(r) for r in read_results(self.results)} if self.results.exists() else set()
        categories = scan_dataset(self.spec.data, self.spec.layout, self.spec.categories)
        cells = [(c, k, s, st) for c in categories for k in self.spec.shots for s in self.spec.seeds
                 for st in self.spec.strategies]
        todo = [cell for cell in cells if (cell[0].name, cell[1], cell[2], cell[3]) not in finished]
        self.log(f"{len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run")
        bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not self.progress)
        for category in categories:
            mine = [c for c in todo if c[0] is category]
            if not mine:
                continue
            for problem in category.problems:
                self.log(f"{category.name}: {problem}")
            try:
                self._run_category(category, mine, bar)
            except Exception as exc:  # a broken category must not stop the others
                self.log(f"{category.name}: FAILED: {type(exc).__name__}: {exc}")
                self.log(traceback.format_exc())
                bar.update(len(mine))
        bar.close()
        return read_results(self.results) if self.results.exists() else []

    def _run_category(self, category: Category, cells: list[tuple], bar: tqdm) -> None:
        aspect = category_aspect(category)
        config = {**self.spec.config, "aspect_ratio": aspect}
        grid = grid_for(DetectorConfig(**config).eval_size, aspect, 1)
        tests = load_test_set(category, grid, self.log)
        if len(tests.samples) == 0 or len(set(tests.labels.tolist())) < 2:
            self.log(f"{category.name}: the test set needs normal and anomalous images; metrics will be NaN")
        cache: dict = {}
        feature_seconds: dict[str, float] = {}
        for shots in self.spec.shots:
            for seed in self.spec.seeds:
                strategies = [c[3] for c in cells if c[1] == shots and c[2] == seed]
                if not strategies:
                    continue
                try:
                    self._run_cell(category, shots, seed, strategies, config, tests, cache, feature_seconds)
                except Exception as exc:
                    self.log(f"{category.name} shots={shots} seed={seed}: FAILED: {type(exc).__name__}: {exc}")
                    self.log(traceback.format_exc())
                bar.update(len(strategies))

    def _extract(self, det: Detector, tests: TestSet, feature_seconds: dict[str, float]) -> dict[str, torch.Tensor]:
        """Test features for every family, first time timed per image (uncached), then cached."""
        out: dict[str, torch.Tensor] = {}
        for family in det.families("all"):
            start = time.perf_counter()
            cold = family not in feature_seconds
            chunks = []
            desc = f"{family} features"
            for i in tqdm(range(0, len(tests.images), EXTRACT_CHUNK), desc=desc, unit="batch",
                          leave=False, disable=not (self.progress and cold)):
                sl = slice(i, i + EXTRACT_CHUNK)
                chunks.append(det.features(family, tests.images[sl], tests.keys[sl]))
            out[family] = torch.cat(chunks)
            if cold:
                feature_seconds[family] = (time.perf_counter() - start) / max(1, len(tests.images))
        return out

    def _run_cell(self, category: Category, shots: int, seed: int, strategies: list[str],
                  config: dict[str, Any], tests: TestSet, cache: dict, feature_seconds: dict[str, float]) -> None:
        train = sample_shots(category.train, shots, seed, self.spec.sampling)
        needed = _needed_experts([s for s in strategies if s != "auto"], self.pinned, category.name)
        fit_strategy = "auto" if "auto" in strategies else "texture" if "texture" in needed else "semantic"
        det = Detector(fit_strategy, cache=cache, seed=seed, **config)
        det.fit([s.path for s in train], also=sorted(needed))
        feats = self._extract(det, tests, feature_seconds)
        n = max(1, len(tests.images))
        expert_maps, expert_seconds = {}, {}
        for name in det.experts:
            start = time.perf_counter()
            expert_maps[name] = det.expert_maps(feats, experts=[name])[name]
            expert_seconds[name] = (time.perf_counter() - start) / n
        shot_files = ";".join(s.path.name for s in train)
        for strategy in strategies:
            applied = det.strategy if strategy == "auto" else \
                pinned_strategy(category.name, self.pinned) if strategy == "preset" else strategy
            start = time.perf_counter()
            maps = det.combine(applied, expert_maps)
            scores = det.scores(applied, maps, feats.get("texture"))
            # what predicting this strategy alone costs: its backbones (timed cold), its experts, the rest
            per_image = ((time.perf_counter() - start) / n + sum(expert_seconds[e] for e in experts_of(applied))
                         + sum(feature_seconds.get(f, 0.0) for f in det.families(applied)))
            metrics = tests.metrics(scores.numpy(), maps.numpy())
            row = {"category": category.name, "shots": shots, "seed": seed, "strategy": strategy,
                   "applied_strategy": applied, **metrics, "fit_seconds": det.fit_seconds,
                   "predict_seconds_per_image": per_image, "shot_files": shot_files}
            append_row(self.results, {k: row[k] for k in RESULT_COLUMNS})
        if seed == self.spec.seeds[0] and shots == max(self.spec.shots):
            self._panels(category, det, tests, expert_maps, feats)

    def _panels(self, category: Category, det: Detector, tests: TestSet,
                expert_maps: dict[str, torch.Tensor], feats: dict[str, torch.Tensor]) -> None:
        """image | truth | texture | semantic | semantic_adapter | applied, all in units of their
        own normal statistics (z-scores), so one colour scale is fair to every column."""
        applied_map = det.combine(det.strategy, expert_maps)
        scores = det.scores(det.strategy, applied_map, feats.get("texture"))
        by_type: dict[str, list[int]] = {}
        for i, sample in enumerate(tests.samples):
            by_type.setdefault(sample.defect_type, []).append(i)
        folder = self.out / "panels" / category.name
        for defect, indices in sorted(by_type.items()):
            for i in indices[: self.spec.panels_per_type]:
                maps = det.display_maps({n: expert_maps[n][i] for n in PANEL_EXPERTS if n in expert_maps},
                                        applied_map[i])
                truth = tests.masks[i] if tests.labels[i] else None
                title = (f"{category.name} / {defect} / {tests.samples[i].path.name}  "
                         f"score {float(scores[i]):.3g} (threshold {det.threshold:.3g})")
                zscore_panel(tests.images[i], {k: v.numpy() for k, v in maps.items()}, truth, title,
                             folder / f"{defect}_{tests.samples[i].path.stem}.png")


def oracle_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For evaluation only: per (category, shots), the fixed strategy with the best mean image
    AUROC over seeds, chosen WITH test labels, its per-seed rows relabelled `oracle`."""
    fixed = [r for r in rows if r["strategy"] in FIXED_STRATEGIES or r["strategy"].startswith("fusion_weighted")]
    out = []
    for category, shots in sorted({(r["category"], r["shots"]) for r in fixed}):
        group = [r for r in fixed if r["category"] == category and r["shots"] == shots]
        means = {}
        for strategy in {r["strategy"] for r in group}:
            values = [r["image_auroc"] for r in group if r["strategy"] == strategy and not math.isnan(r["image_auroc"])]
            if values:
                means[strategy] = sum(values) / len(values)
        if not means:
            continue
        best = max(sorted(means), key=lambda s: means[s])
        out += [{**r, "strategy": "oracle", "applied_strategy": best} for r in group if r["strategy"] == best]
    return out


def write_reports(out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """summary.md (with the oracle rows) and the plots."""
    everything = rows + oracle_rows(rows)
    return [write_summary(everything, out), *plot_results(everything, out)]
