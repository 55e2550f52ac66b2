"""Scale-out on Ray: benchmark cells and batch prediction on the workers of a cluster.

The work itself is the library's: `benchmark.prepare_category` / `benchmark.run_cell` for the
benchmark and `pipeline.iter_predictions` for prediction; this module only hands them to Ray and
brings the results back to the calling process, which alone writes files. Ray is an optional extra
(`pip install 'astfad[ray]'`), imported on first use here and nowhere below the apps.

Where the work runs: `address` (e.g. `ray://head:10001`), else the `RAY_ADDRESS` environment
variable, else a Ray runtime started on this machine for the call (and stopped after it). Every
node needs the same astfad, the same backbone weights and the images at the same paths (a shared
filesystem); the benchmark checks the first two on each worker.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from astfad.benchmark import CategoryJob, CellResult, failed_cell, prepare_category, run_cell
from astfad.data.images import DEFAULT_MAX_PIXELS
from astfad.pipeline import DEFAULT_BATCH_SIZE, PredictionItem, iter_predictions, plan_batches

DEFAULT_MAX_RETRIES = 2


class RayUnavailableError(ValueError):
    """Ray is asked for but not installed."""


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError("Ray is not installed: pip install 'astfad[ray]'") from None
    return ray


@contextmanager
def ray_runtime(address: str | None = None) -> Iterator[Any]:
    """The `ray` module, connected: to a runtime already initialised in this process, to
    `address`, to RAY_ADDRESS, or to a local runtime started here and shut down on exit."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    local = address is None and not os.environ.get("RAY_ADDRESS")
    ray.init(address=address, **({"include_dashboard": False} if local else {}))
    try:
        yield ray
    finally:
        ray.shutdown()


def _reason(exc: BaseException, retries: int) -> str:
    """One line for failed.csv: the exception raised in a task, or how its worker died."""
    ray = _ray()
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
        text = str(cause).strip().splitlines()
        return f"preparing the category failed: {type(cause).__name__}: {text[0] if text else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''} (tried {retries + 1} times)"


class RayExecutor:
    """Benchmark cells as Ray tasks. Per category one task decodes the test set and extracts
    the features of its test images and sampled shots into the object store; one task per
    (shots, seed) cell then fits and scores from them. A task whose worker dies is retried
    `max_retries` times, then its cell is reported as failed. At most `max_categories`
    categories are in flight (default: a quarter of the cluster's CPUs, at least 2: each has
    several cells to keep the CPUs busy), which bounds the features held in the object store.
    Results arrive in completion order; the driver's results.csv holds them in that order."""

    def __init__(self, address: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 max_categories: int | None = None) -> None:
        _ray()  # no Ray: say so before anything runs
        self.address = address
        self.max_retries = max_retries
        self.max_categories = max_categories

    def run(self, jobs: Sequence[CategoryJob], log: Callable[[str], None],
            on_result: Callable[[CellResult], None]) -> None:
        with ray_runtime(self.address) as ray:
            prepare = ray.remote(num_returns=2, max_retries=self.max_retries)(prepare_category)
            cell_task = ray.remote(max_retries=self.max_retries)(run_cell)
            limit = self.max_categories or max(2, int(ray.cluster_resources().get("CPU", 1)) // 4)
            queue = list(jobs)
            waiting: dict[Any, tuple[CategoryJob, Any]] = {}  # ref -> (job, cell or None for messages)
            open_cells: dict[str, int] = {}
            while queue or waiting:
                while queue and len(open_cells) < limit:
                    job = replace(queue.pop(0), progress=False)
                    messages, data = prepare.remote(job)
                    waiting[messages] = (job, None)
                    for cell in job.cells:
                        waiting[cell_task.remote(data, cell)] = (job, cell)
                    open_cells[job.name] = len(job.cells)
                    del data  # the cell tasks hold it; it is freed when they are done
                (ref,), _ = ray.wait(list(waiting), num_returns=1)
                job, cell = waiting.pop(ref)
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    if cell is None:
                        log(f"{job.name}: {_reason(exc, self.max_retries)}")
                        continue
                    value = failed_cell(job, cell, _reason(exc, self.max_retries))
                if cell is None:
                    for message in value:
                        log(message)
                    continue
                on_result(value)
                open_cells[job.name] -= 1
                if not open_cells[job.name]:
                    del open_cells[job.name]


class PredictionWorker:
    """A Ray Data actor: loads the model once, then scores whole batches of paths with
    `iter_predictions`, exactly as a local run scores them (same batches, same errors)."""

    def __init__(self, model_path: str, max_pixels: int | None, downscale: bool,
                 load_options: dict[str, Any]) -> None:
        from astfad.detector import Detector

        self.detector = Detector.load(model_path, **load_options)
        self.max_pixels = max_pixels
        self.downscale = downscale

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the items go back pickled, as Ray would pickle them anyway (Arrow has no type for them)
        items = [pickle.dumps(list(iter_predictions(self.detector, [str(p) for p in paths], max(1, len(paths)),
                                                    self.max_pixels, self.downscale)))
                 for paths in rows["paths"]]
        return {"batch": rows["batch"], "items": np.array(items, dtype=object)}


def ray_predictions(model_path: str | os.PathLike, paths: Sequence[str | os.PathLike],
                    batch_size: int = DEFAULT_BATCH_SIZE, workers: int | None = None, address: str | None = None,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, downscale: bool = False,
                    load_options: dict[str, Any] | None = None, cpus_per_worker: float = 1,
                    gpus_per_worker: float = 0) -> Iterator[PredictionItem]:
    """`iter_predictions` on Ray: Ray Data `map_batches` over `workers` actors (default: one per
    `cpus_per_worker` CPUs of the cluster), each loading the model once with
    `Detector.load(model_path, **load_options)` (e.g. the weights options it was fitted with).
    Every node must read `model_path` and the images at the same paths.

    Yields one PredictionItem per path in input order; an unusable image is an error item, as
    locally. The batches are the local ones (`pipeline.plan_batches`: by count and pixels), so
    the scores equal a local run's with the same thread count. Each worker gets `cpus_per_worker` CPUs (its torch threads)
    and `gpus_per_worker` GPUs. The images and full-size maps travel back to this process, which
    writes the outputs."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"no saved detector at '{model_path}'")
    paths = [Path(p) for p in paths]
    if not paths:
        return
    batches = [{"batch": k, "paths": [str(p) for p in paths[part]]}
               for k, part in enumerate(plan_batches(paths, batch_size, max_pixels))]
    arguments = {"model_path": str(Path(model_path).resolve()), "max_pixels": max_pixels, "downscale": downscale,
                 "load_options": dict(load_options or {})}
    with ray_runtime(address) as ray:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))
        workers = min(workers, len(batches))
        dataset = ray.data.from_items(batches, override_num_blocks=min(len(batches), 16 * workers))
        dataset.context.execution_options.preserve_order = True
        dataset.context.enable_progress_bars = False  # the caller reports progress per item
        dataset = dataset.map_batches(
            PredictionWorker, batch_size=1, batch_format="numpy", num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
            compute=ray.data.ActorPoolStrategy(size=workers), fn_constructor_kwargs=arguments)
        waiting: dict[int, list[PredictionItem]] = {}  # batches that came early (order is kept anyway)
        expected = 0
        for row in dataset.iter_rows():
            waiting[int(row["batch"])] = pickle.loads(row["items"])
            while expected in waiting:
                yield from waiting.pop(expected)
                expected += 1
