"""Benchmark: dataset x shots x seeds x strategies -> one results row per cell.

One protocol for every cell (same grids, upsampling, blur, image-score rule and metric grid), so
only the strategy differs. The work comes in two steps, each a plain function so that any
executor can run it:

- `prepare_category` (once per category): the test set's labels and masks, and the features of
  every test image and every sampled shot, each image through each backbone once;
- `run_cell` (once per (category, shots, seed)): fits one detector on the sampled shots and
  scores every strategy from the same expert maps; it returns its rows (and panels) rather than
  writing them. Every cell starts from the same prepared features, so a cell's numbers do not
  depend on which cells ran before it, nor where.

Strategy `zero_shot` (experts/mutual.py) is the one strategy of shot count 0, and only it runs
there: its cell fits nothing and scores the test images against each other from their prepared
semantic features, in batches of `ZERO_SHOT_BATCH` drawn in the order the cell's seed shuffles.

`LocalExecutor` runs them in this process; `astfad.distributed.RayExecutor` runs them as Ray
tasks. Either way only `Benchmark`, the driver, writes: finished rows are appended to
results.csv at once, a cell that cannot run goes to failed.csv (and summary.md's "Failed cells"
table), panels are written to a temporary name and renamed. A rerun with the same configuration
(run.json) skips finished cells, retries failed ones and redraws missing or damaged panels.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from astfad import __version__
from astfad.config import (AUTO_EXPERTS, DEFAULT_PAIR, SINGLE_STRATEGIES, DetectorConfig, candidate_strategies,
                           experts_of, fusion_strategies, is_fixed_strategy, parse_strategy)
from astfad.data.datasets import Category, Sample, sample_shots, scan_dataset
from astfad.data.images import ImageLoadError, image_size, load_image, load_mask, write_atomically
from astfad.detector import Detector, FeatureGroup, family_of, image_key
from astfad.experts.mutual import score_batch, split_batches
from astfad.features import FeatureCache
from astfad.metrics import evaluate, verdict_metrics
from astfad.report import (RESULT_COLUMNS, append_failure, append_row, append_selection, check_appendable, plot_results,
                           read_failures, read_results, write_summary)
from astfad.scoring import mask_to_grid
from astfad.selection import load_pinned, pinned_strategy
from astfad.visualize import zscore_panel

# every registered expert alone, the fusions of the default pair and those auto chooses from
FIXED_STRATEGIES = tuple(dict.fromkeys((*SINGLE_STRATEGIES, *fusion_strategies(DEFAULT_PAIR),
                                        *candidate_strategies(AUTO_EXPERTS))))
PANEL_EXPERTS = SINGLE_STRATEGIES
EXTRACT_CHUNK = 16
PANEL_MANIFEST = "panels.json"
SELECTION_FILE = "selection.csv"  # auto's validation terms per cell, to replay selection rules
ZERO_SHOT = "zero_shot"
# Test images per zero-shot batch (MuSc scores a whole test set at once). Mutual scoring costs
# grow with the batch: 0.18 s per image at 32, 0.38 s at 64 (one thread, 32x32 tokens of 384
# dimensions; the backbone pass not counted).
ZERO_SHOT_BATCH = 32


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
        cell's numbers (config, sampling, pinned map, data, the code), not the list of cells.
        The backbones' weight ids are added by `Benchmark`, which loads them."""
        return {"data": str(Path(self.data).resolve()), "layout": self.layout, "sampling": self.sampling,
                "pinned": self.pinned, "config": DetectorConfig(**self.config).to_dict(),
                "astfad_version": __version__, "git_commit": git_commit()}


def git_commit() -> str | None:
    """The commit of the astfad source tree when it is a git checkout (with `-dirty` when its
    tracked files under src/astfad differ from it), else None."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True,
                                  timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + ("-dirty" if dirty else "")


@dataclass
class TestSet:
    """A category's test images, decoded once, with masks on the evaluation grid."""

    samples: list[Sample]
    images: list[np.ndarray]  # empty once the features are extracted (see `prepare_category`)
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

    def verdicts(self, scores: np.ndarray, maps: np.ndarray, threshold: float | None,
                 pixel_threshold: float | None) -> dict[str, float]:
        """Verdict and mask measures at fixed thresholds (anomalous images without a mask have
        an empty one here, so the mask measures leave them out)."""
        return verdict_metrics(self.labels, scores, threshold, self.masks, maps, pixel_threshold)


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


def strategies_at(strategies: Sequence[str], shots: int) -> tuple[str, ...]:
    """The strategies a shot count runs: `zero_shot` alone at 0 shots, the others at 1 and more."""
    return tuple(s for s in strategies if (s == ZERO_SHOT) == (shots == 0))


def check_plan(strategies: Sequence[str], shots: Sequence[int]) -> None:
    """Refuse a run with a shot count that no strategy of the run can use."""
    if ZERO_SHOT in strategies and 0 not in shots:
        raise ValueError(f"strategy '{ZERO_SHOT}' runs at 0 shots: add 0 to --shots")
    if 0 in shots and ZERO_SHOT not in strategies:
        raise ValueError(f"0 shots is only for strategy '{ZERO_SHOT}': add it to --strategies")
    if any(k > 0 for k in shots) and not strategies_at(strategies, 1):
        raise ValueError(f"strategy '{ZERO_SHOT}' alone runs only at 0 shots: drop the other shot counts "
                         "or add a few-shot strategy")


def _needed_experts(strategies: Sequence[str], pinned: dict[str, str], category: str) -> set[str]:
    needed: set[str] = set()
    for strategy in strategies:
        applied = pinned_strategy(category, pinned) if strategy.startswith("preset") else strategy
        needed |= set(experts_of(applied))
    return needed


@dataclass(frozen=True)
class FitPlan:
    """One detector a cell fits: its strategy, the further experts it fits, the rows it scores."""

    strategy: str
    also: tuple[str, ...]
    rows: tuple[str, ...]


def fit_plans(strategies: Sequence[str], pinned: dict[str, str], category: str) -> list[FitPlan]:
    """The detectors of a cell: one scores every fixed strategy (and preset) from shared experts;
    `auto` has its own, so that what it validated (its strategy, its image-score rule) never
    changes a fixed strategy's row."""
    fixed = tuple(s for s in strategies if s not in ("auto", ZERO_SHOT))
    plans = []
    if fixed:
        needed = _needed_experts(fixed, pinned, category)
        plans.append(FitPlan("texture" if "texture" in needed else "semantic", tuple(sorted(needed)), fixed))
    if "auto" in strategies:
        plans.append(FitPlan("auto", (), ("auto",)))
    return plans


def plan_families(strategies: Sequence[str], pinned: dict[str, str], category: str) -> list[str]:
    """The backbone families a category's detectors (and zero-shot cells: semantic) read."""
    families = {"semantic"} if ZERO_SHOT in strategies else set()
    for plan in fit_plans(strategies_at(strategies, 1), pinned, category):
        families |= {family_of(e) for e in (*experts_of(plan.strategy), *plan.also)}
    return sorted(families)


def strategy_thresholds(det: Detector, applied: str) -> tuple[float | None, float | None]:
    """(image, pixel) thresholds the detector fitted for the strategy a row applies, or (None, None)
    for a strategy without a threshold model (e.g. fusion_weighted_sum:0.5, not a candidate)."""
    try:
        return det.threshold_for(strategy=applied), det.pixel_threshold_for(strategy=applied)
    except ValueError:
        return None, None


# ----------------------------------------------------------------------------- work units

@dataclass(frozen=True)
class Cell:
    """One (shots, seed) of a category: one fitted detector scores every strategy."""

    shots: int
    seed: int
    panels: bool = False  # also draw the category's comparison panels


@dataclass
class CategoryJob:
    """What a worker needs to run a category's cells: paths and settings, no pixels."""

    category: Category
    cells: list[Cell]
    strategies: tuple[str, ...]
    config: dict[str, Any]
    sampling: str
    pinned: dict[str, str]
    panels_per_type: int
    backbones: dict[str, str]  # family -> the backbone id the driver loaded
    version: str = __version__
    progress: bool = False  # feature-extraction progress bars (local runs)

    @property
    def name(self) -> str:
        return self.category.name


@dataclass
class CategoryData:
    """What every cell of a category shares, computed once by `prepare_category`."""

    job: CategoryJob
    config: dict[str, Any]  # the job's config with the category's aspect ratio
    tests: TestSet  # without decoded images: a cell that draws panels reloads its few
    groups: list[FeatureGroup]  # the test images' features (and mirrors') per grid they are read on
    batch_features: torch.Tensor | None  # zero-shot cells: semantic features on the category's grid
    shot_cache: FeatureCache  # features of every shot any cell samples
    feature_seconds: dict[str, float]  # family -> backbone seconds per image (uncached)

    @property
    def texture(self) -> torch.Tensor | None:
        """The test images' texture features, which PatchCore's reweighting reads (always on one
        grid, Detector.test_groups)."""
        return self.groups[0].feats.get("texture") if len(self.groups) == 1 else None


@dataclass
class CellResult:
    """A cell's rows (every strategy of the job) and panels (file name -> PNG bytes), or why it
    could not run."""

    category: str
    shots: int
    seed: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    panels: dict[str, bytes] | None = None
    selection: dict[str, Any] | None = None  # auto's choice and validation terms (selection.csv)
    error: str | None = None
    detail: str = ""  # a traceback, for benchmark.log


def failed_cell(job: CategoryJob, cell: Cell, error: str, detail: str = "") -> CellResult:
    return CellResult(job.name, cell.shots, cell.seed, error=error, detail=detail)


def _extract(det: Detector, images: Sequence[np.ndarray], keys: Sequence[str], families: Sequence[str],
             progress: bool, aspect: float | None = None
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, float]]:
    """Features of every family and, when the detector flips, of the mirror images, in chunks, on
    the grid of `aspect` (default: the category's); with the seconds per image of one backbone pass
    (a flipping detector makes two)."""
    out, mirrored, seconds = {}, {}, {}
    for family in families:
        chunks, mirror_chunks, spent = [], [], 0.0
        for i in tqdm(range(0, len(images), EXTRACT_CHUNK), desc=f"{family} features", unit="batch",
                      leave=False, disable=not progress):
            sl = slice(i, i + EXTRACT_CHUNK)
            start = time.perf_counter()
            chunks.append(det.features(family, images[sl], keys[sl], aspect=aspect))
            spent += time.perf_counter() - start
            mirror_chunks += (det.mirrors(images[sl], keys[sl], [family], aspect) or {}).values()
        out[family] = torch.cat(chunks)
        if mirror_chunks:
            mirrored[family] = torch.cat(mirror_chunks)
        seconds[family] = spent / max(1, len(images))
    return out, mirrored or None, seconds


def prepare_category(job: CategoryJob) -> tuple[list[str], CategoryData]:
    """Decode the test set and extract the features every cell needs, each image through each
    backbone once: the test images (timed, for the rows' predict time) and the union of the shots
    the cells sample. A shot that does not decode is left out here; the cells that sample it fail
    and name it. Returns log messages and the data."""
    messages: list[str] = []
    if job.version != __version__:
        raise RuntimeError(f"this worker runs astfad {__version__}, the driver {job.version}: "
                           "install the same astfad on every node")
    category = job.category
    aspect = category_aspect(category)
    config = {**job.config, "aspect_ratio": aspect}
    grid = DetectorConfig(**config).eval_grid(aspect)
    tests = load_test_set(category, grid, lambda m: messages.append(m))
    if not tests.samples:
        raise ValueError(f"no readable test image in category '{category.name}'")
    if len(set(tests.labels.tolist())) < 2:
        messages.append(f"{category.name}: the test set needs normal and anomalous images; metrics will be NaN")
    det = Detector(cache={}, **config)
    det.aspect = aspect
    # the test set's mirror images too when any cell's detector will flip (test_flip, or its
    # shot count under the default)
    det.test_flip = any(det.config.test_flip_at(cell.shots) for cell in job.cells if cell.shots)
    families = plan_families(job.strategies, job.pinned, category.name)
    for family in families:
        found = det.featurizer(family).backbone.backbone_id
        if job.backbones.get(family, found) != found:
            raise RuntimeError(f"this worker loads backbone {found}, the driver {job.backbones[family]}: "
                               "install the same weights on every node")
    groups, seconds = [], dict.fromkeys(families, 0.0)
    for group_aspect, indices in det.test_groups(tests.images, families):
        feats, mirrors, spent = _extract(det, [tests.images[i] for i in indices], [tests.keys[i] for i in indices],
                                         families, job.progress, group_aspect)
        groups.append(FeatureGroup(indices, feats, mirrors))
        for family in families:
            seconds[family] += spent[family] * len(indices) / len(tests.images)
    batch_features = None
    if any(cell.shots == 0 for cell in job.cells):  # zero-shot scores a batch on one grid
        batch_features = (groups[0].feats["semantic"] if det.config.test_grid == "category" else
                          det.features("semantic", tests.images, tests.keys))  # no mirrors: it never flips
    det.cache.clear()  # the cells take test features from `groups`; the cache keeps the shots'
    shots = sorted({s.path for cell in job.cells if cell.shots
                    for s in sample_shots(category.train, cell.shots, cell.seed, job.sampling)}, key=str)
    arrays, keys = [], []
    for path in shots:
        try:
            arrays.append(load_image(path))
            keys.append(image_key(path))
        except ImageLoadError:
            continue  # the cells sampling it fail with the loader's message
    if arrays:
        _extract(det, arrays, keys, families, False)
    data = CategoryData(job, config, replace(tests, images=[]), groups, batch_features, det.cache, seconds)
    return messages, data


def run_cell(data: CategoryData, cell: Cell) -> CellResult:
    """Fit one detector on the cell's shots and score every strategy of the job; never raises
    for the cell's own failures (they come back as the result's error)."""
    try:
        rows, panels, selection = _cell_rows(data, cell)
    except Exception as exc:  # a failing cell must not stop the others
        return failed_cell(data.job, cell, f"{type(exc).__name__}: {exc}", traceback.format_exc())
    return CellResult(data.job.name, cell.shots, cell.seed, rows, panels, selection)


def _cell_rows(data: CategoryData, cell: Cell
               ) -> tuple[list[dict[str, Any]], dict[str, bytes] | None, dict[str, Any] | None]:
    if cell.shots == 0:
        return _zero_shot_rows(data, cell), None, None
    job, tests = data.job, data.tests
    name = job.name
    strategies = strategies_at(job.strategies, cell.shots)
    train = sample_shots(job.category.train, cell.shots, cell.seed, job.sampling)
    rows, panels, selection = [], None, None
    mapped: dict[str, TestMaps] = {}
    plans = fit_plans(strategies, job.pinned, name)
    for plan in plans:
        det = Detector(plan.strategy, cache=dict(data.shot_cache), seed=cell.seed, **data.config)
        det.fit([s.path for s in train], also=plan.also)
        expert_maps, expert_seconds = _test_maps(det, data.groups, max(1, len(tests.samples)), mapped)
        rows += _strategy_rows(data, cell, det, plan.rows, train, expert_maps, expert_seconds)
        if cell.panels and plan is plans[-1]:  # auto's, when it runs: the panels show what it applied
            panels = _panels(data, det, expert_maps)
        if det.selection_terms is not None:
            selection = {"choice": det.strategy, "terms": {n: {k: v.tolist() for k, v in term.items()}
                                                           for n, term in det.selection_terms.items()}}
    return rows, panels, selection


@dataclass
class TestMaps:
    """An expert's test-set maps, the fitted tensors that made them and their seconds per image."""

    tensors: dict[str, torch.Tensor]
    maps: torch.Tensor
    seconds: float


def _test_maps(det: Detector, groups: Sequence[FeatureGroup], n: int, mapped: dict[str, TestMaps]
               ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each fitted expert's maps of the test set and its seconds per image. An expert that an
    earlier detector of the cell fitted to the same tensors (its saved state: the same maps under
    the cell's one config) reuses that one's maps: auto's detector searches no bank twice."""
    expert_maps, expert_seconds = {}, {}
    for expert in det.experts:
        tensors = det.experts[expert].tensors()
        known = mapped.get(expert)
        if known is None or known.tensors.keys() != tensors.keys() or \
                not all(torch.equal(known.tensors[k], t) for k, t in tensors.items()):
            start = time.perf_counter()
            maps = det.group_maps(groups, experts=[expert])[expert]
            known = mapped[expert] = TestMaps(tensors, maps, (time.perf_counter() - start) / n)
        expert_maps[expert], expert_seconds[expert] = known.maps, known.seconds
    return expert_maps, expert_seconds


def _strategy_rows(data: CategoryData, cell: Cell, det: Detector, strategies: Sequence[str], train: Sequence[Sample],
                   expert_maps: dict[str, torch.Tensor],
                   expert_seconds: dict[str, float]) -> list[dict[str, Any]]:
    """The result rows of the strategies one fitted detector scores."""
    job, tests, name = data.job, data.tests, data.job.name
    n = max(1, len(tests.samples))
    # the shots' backbone passes were made once for the category: count them as a cold fit would
    fit_seconds = det.fit_seconds + len(train) * sum(data.feature_seconds[f] for f in det.families("all")) * (1 + det.test_flip)
    shot_files = ";".join(s.path.name for s in train)
    rows = []
    for strategy in strategies:
        applied = det.strategy if strategy == "auto" else \
            pinned_strategy(name, job.pinned) if strategy == "preset" else strategy
        start = time.perf_counter()
        maps = det.combine(applied, expert_maps)
        scores = det.scores(applied, maps, data.texture)
        # what predicting this strategy alone costs: its backbones (timed cold), its experts, the rest
        per_image = ((time.perf_counter() - start) / n + sum(expert_seconds[e] for e in experts_of(applied))
                     + sum(data.feature_seconds[f] for f in det.families(applied)) * (1 + det.test_flip))
        scores_np, maps_np = scores.numpy(), maps.numpy()
        row = {"category": name, "shots": cell.shots, "seed": cell.seed, "strategy": strategy,
               "applied_strategy": applied, **tests.metrics(scores_np, maps_np),
               **tests.verdicts(scores_np, maps_np, *strategy_thresholds(det, applied)),
               "fit_seconds": fit_seconds, "predict_seconds_per_image": per_image, "shot_files": shot_files}
        rows.append({k: row[k] for k in RESULT_COLUMNS})
    return rows


def _zero_shot_rows(data: CategoryData, cell: Cell) -> list[dict[str, Any]]:
    """The `zero_shot` row of a 0-shot cell: the test images, shuffled with the cell's seed, in
    batches of ZERO_SHOT_BATCH (a short last one joins the one before, as `predict --zero-shot`
    batches), each scored against itself by `score_batch`. The metrics pool every batch's maps and
    scores (one distance scale); the verdicts apply each batch's own thresholds to its images."""
    tests = data.tests
    config = DetectorConfig(**{**data.config, "seed": cell.seed})
    grid = config.eval_grid(config.aspect_ratio)  # the grid the test masks are on
    features = data.batch_features
    n = len(tests.samples)
    maps, scores = torch.empty(n, *grid), torch.empty(n)
    thresholds, pixel_thresholds = torch.empty(n), torch.empty(n)
    order = np.random.default_rng(cell.seed).permutation(n).tolist()
    start = time.perf_counter()
    for batch in split_batches(order, ZERO_SHOT_BATCH):
        scored = score_batch(features[batch], grid, config)
        maps[batch], scores[batch] = scored.maps, scored.scores
        thresholds[batch], pixel_thresholds[batch] = scored.threshold, scored.pixel_threshold
    per_image = (time.perf_counter() - start) / n + data.feature_seconds["semantic"]
    metrics = tests.metrics(scores.numpy(), maps.numpy())
    maps -= pixel_thresholds[:, None, None]  # in place (maps are big): above 0 = above the batch's own
    verdicts = tests.verdicts((scores - thresholds).numpy(), maps.numpy(), 0.0, 0.0)
    row = {"category": data.job.name, "shots": 0, "seed": cell.seed, "strategy": ZERO_SHOT,
           "applied_strategy": ZERO_SHOT, **metrics, **verdicts, "fit_seconds": 0.0,
           "predict_seconds_per_image": per_image, "shot_files": ""}
    return [{k: row[k] for k in RESULT_COLUMNS}]


def _panels(data: CategoryData, det: Detector, expert_maps: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """image | truth | texture | semantic | semantic_adapter | applied, all in units of their
    own normal statistics (z-scores), so one colour scale is fair to every column. PNG bytes by
    file name: the driver writes them."""
    tests, name = data.tests, data.job.name
    applied_map = det.combine(det.strategy, expert_maps)
    scores = det.scores(det.strategy, applied_map, data.texture)
    by_type: dict[str, list[int]] = {}
    for i, sample in enumerate(tests.samples):
        by_type.setdefault(sample.defect_type, []).append(i)
    out = {}
    for defect, indices in sorted(by_type.items()):
        for i in indices[: data.job.panels_per_type]:
            sample = tests.samples[i]
            maps = det.display_maps({n: expert_maps[n][i] for n in PANEL_EXPERTS if n in expert_maps},
                                    applied_map[i])
            truth = tests.masks[i] if tests.labels[i] else None
            title = (f"{name} / {defect} / {sample.path.name}  "
                     f"score {float(scores[i]):.3g} (threshold {det.threshold:.3g})")
            figure = zscore_panel(load_image(sample.path), {k: v.numpy() for k, v in maps.items()}, truth, title)
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png")
            out[f"{defect}_{sample.path.stem}.png"] = buffer.getvalue()
    return out


# ----------------------------------------------------------------------------- executors

class Executor(Protocol):
    """Runs every cell of the jobs and hands each CellResult to `on_result` in the calling
    process, as it finishes."""

    def run(self, jobs: Sequence[CategoryJob], log: Callable[[str], None],
            on_result: Callable[[CellResult], None]) -> None: ...


class LocalExecutor:
    """Categories one after another in this process, with feature-extraction progress bars."""

    def run(self, jobs: Sequence[CategoryJob], log: Callable[[str], None],
            on_result: Callable[[CellResult], None]) -> None:
        for job in jobs:
            try:
                messages, data = prepare_category(job)
            except Exception as exc:
                reason = f"preparing the category failed: {type(exc).__name__}: {exc}"
                detail = traceback.format_exc()
                for cell in job.cells:
                    on_result(failed_cell(job, cell, reason, detail))
                continue
            for message in messages:
                log(message)
            for cell in job.cells:
                on_result(run_cell(data, cell))


# ----------------------------------------------------------------------------- the driver

def _write_atomic(path: Path, payload: bytes) -> None:
    """Whole or not at all, synced: a crash leaves the old file or the new one, never a cut one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_bytes(payload), sync=True)


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _cell_key(row: dict[str, Any]) -> tuple:
    return row["category"], int(row["shots"]), int(row["seed"]), row["strategy"]


class Benchmark:
    """Runs a BenchmarkSpec; `run()` returns every row of results.csv (old and new) and leaves
    the cells that could not run in `failures`."""

    def __init__(self, spec: BenchmarkSpec, log: Callable[[str], None] = print, progress: bool = True,
                 executor: Executor | None = None) -> None:
        self.spec = spec
        self.log_fn = log
        self.progress = progress
        self.executor = executor if executor is not None else LocalExecutor()
        self.out = Path(spec.out)
        self.results = self.out / "results.csv"
        self.failed = self.out / "failed.csv"
        self.pinned = load_pinned(spec.pinned)
        self.failures: list[dict[str, Any]] = []
        for strategy in spec.strategies:
            if strategy not in ("preset", ZERO_SHOT):
                parse_strategy(strategy)
        check_plan(spec.strategies, spec.shots)
        if "preset" in spec.strategies and not self.pinned:
            raise ValueError("strategy 'preset' needs --pinned (a preset name or a strategy map file)")

    def log(self, message: str) -> None:
        self.log_fn(message)
        self._log_file(message)

    def _log_file(self, message: str) -> None:
        with open(self.out / "benchmark.log", "a") as handle:
            handle.write(time.strftime("%Y-%m-%d %H:%M:%S ") + message + "\n")

    def _scan(self) -> list[Category]:
        """The dataset, checked before anything is written to --out."""
        categories = scan_dataset(self.spec.data, self.spec.layout, self.spec.categories)
        if not categories:
            raise ValueError(f"no category found in '{self.spec.data}'")
        return categories

    def _backbones(self, categories: Sequence[Category]) -> dict[str, str]:
        families = sorted({f for c in categories for f in plan_families(self.spec.strategies, self.pinned, c.name)})
        probe = Detector(**self.spec.config)
        return {f: probe.featurizer(f).backbone.backbone_id for f in families}

    def _check_out(self, backbones: dict[str, str]) -> None:
        """Refuse to mix results of another configuration (or code, or weights) into an existing
        folder, or rows of another format into its results.csv."""
        self.out.mkdir(parents=True, exist_ok=True)
        run_file = self.out / "run.json"
        identity = json.loads(json.dumps({**self.spec.identity(), "backbones": backbones}))
        if run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != identity:
                changed = sorted(k for k in identity.keys() | previous.keys() if previous.get(k) != identity.get(k))
                raise ValueError(f"'{self.out}' holds results of another configuration (differs in: "
                                 f"{', '.join(changed)}); choose another --out")
        else:
            _write_atomic(run_file, json.dumps(identity, indent=2).encode())
        check_appendable(self.results)

    def _panels_ok(self, category: str) -> bool:
        """True when the category's panels were all written and none was damaged since."""
        folder = self.out / "panels" / category
        try:
            manifest = json.loads((folder / PANEL_MANIFEST).read_text())
            return all(_digest((folder / name).read_bytes()) == digest for name, digest in manifest.items())
        except (OSError, ValueError, AttributeError):
            return False

    def _write_panels(self, category: str, panels: dict[str, bytes]) -> None:
        folder = self.out / "panels" / category
        for name, payload in panels.items():
            _write_atomic(folder / name, payload)
        _write_atomic(folder / PANEL_MANIFEST,
                      json.dumps({n: _digest(p) for n, p in panels.items()}, indent=1).encode())

    def run(self) -> list[dict[str, Any]]:
        categories = self._scan()
        backbones = self._backbones(categories)
        self._check_out(backbones)
        finished = {_cell_key(r) for r in read_results(self.results)} if self.results.exists() else set()
        strategies = tuple(self.spec.strategies)
        panel_cell = (max(self.spec.shots), self.spec.seeds[0])  # zero-shot cells draw none (shots > 0 below)
        pending: dict[tuple[str, int, int], list[str]] = {}
        jobs = []
        for category in categories:
            cells = []
            for shots in self.spec.shots:
                for seed in self.spec.seeds:
                    missing = [s for s in strategies_at(strategies, shots)
                               if (category.name, shots, seed, s) not in finished]
                    panels = (shots, seed) == panel_cell and shots > 0 and self.spec.panels_per_type > 0 \
                        and not self._panels_ok(category.name)
                    if missing or panels:
                        pending[(category.name, shots, seed)] = missing
                        cells.append(Cell(shots, seed, panels))
            if not cells:
                continue
            for problem in category.problems:
                self.log(f"{category.name}: {problem}")
            jobs.append(CategoryJob(category, cells, strategies, dict(self.spec.config), self.spec.sampling,
                                    self.pinned, self.spec.panels_per_type, backbones,
                                    progress=self.progress))
        total = len(categories) * len(self.spec.seeds) * sum(len(strategies_at(strategies, k))
                                                             for k in self.spec.shots)
        todo = sum(len(m) for m in pending.values())
        self.log(f"{total} cells, {total - todo} already finished, {todo} to run")
        bar = tqdm(total=todo, desc="cells", unit="cell", disable=not self.progress)

        def on_result(result: CellResult) -> None:
            key = (result.category, result.shots, result.seed)
            missing = pending.pop(key)
            where = f"{result.category} shots={result.shots} seed={result.seed}"
            if result.error is not None:
                self.log(f"{where}: FAILED: {result.error}")
                if result.detail:
                    self._log_file(result.detail)
                append_failure(self.failed, *key, result.error)
            else:
                for row in result.rows:
                    if row["strategy"] in missing:
                        append_row(self.results, row)
                if result.panels is not None:
                    self._write_panels(result.category, result.panels)
                if result.selection is not None and "auto" in missing:
                    append_selection(self.out / SELECTION_FILE, *key, result.selection)
            bar.update(len(missing))

        self.executor.run(jobs, self.log, on_result)
        bar.close()
        rows = read_results(self.results) if self.results.exists() else []
        self.failures = self._open_failures(categories, rows)
        return rows

    def _open_failures(self, categories: Sequence[Category], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The latest failure of each cell of this spec that still lacks rows."""
        if not self.failed.exists():
            return []
        done = {_cell_key(r) for r in rows}
        cells = {(c.name, k, s) for c in categories for k in self.spec.shots for s in self.spec.seeds}
        latest = {(f["category"], f["shots"], f["seed"]): f for f in read_failures(self.failed)}
        return [f for key, f in latest.items() if key in cells
                and any((*key, s) not in done for s in strategies_at(self.spec.strategies, key[1]))]


def oracle_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For evaluation only: per (category, shots), the fixed strategy with the best mean image
    AUROC over seeds, chosen WITH test labels, its per-seed rows relabelled `oracle`."""
    fixed = [r for r in rows if is_fixed_strategy(r["strategy"])]
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


def write_reports(out: Path, rows: list[dict[str, Any]], failures: Sequence[dict[str, Any]] = ()) -> list[Path]:
    """summary.md (with the oracle rows and the failed cells) and the plots."""
    everything = rows + oracle_rows(rows)
    return [write_summary(everything, out, failures=failures), *plot_results(everything, out)]
