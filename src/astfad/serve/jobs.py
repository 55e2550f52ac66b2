"""Fit jobs: POST /models hands the uploaded good images to one background thread that fits
detectors one at a time (fitting is CPU-heavy) and reports its stage and progress.

Stages: queued -> decoding -> fitting -> saving -> done (or failed with a one-line error).
Unreadable images are skipped and listed; the model file is written under a temporary name and
renamed (Detector.save), so it appears in the store complete or not at all."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from astfad.config import parse_strategy
from astfad.data.datasets import sample_shots
from astfad.data.images import ImageLoadError
from astfad.detector import Detector
from astfad.serve.errors import Busy, ModelExists, ServeError, UnknownJob
from astfad.serve.imaging import decode_upload
from astfad.serve.store import ModelStore, check_name

# progress (percent) at the start of each stage
_STAGE_START = {"decoding": 0, "fitting": 20, "saving": 90}


@dataclass
class FitJob:
    id: str
    name: str
    strategy: str
    shots: int | None
    seed: int
    images: int
    status: str = "queued"  # queued | running | done | failed
    stage: str = "queued"
    progress: float = 0.0
    error: str | None = None
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the fit's own (e.g. one good image only)
    model: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FitJobs:
    """At most `max_pending` queued or running jobs; the last `keep` finished ones stay readable."""

    def __init__(self, store: ModelStore, max_pixels: int, fit_config: dict[str, Any] | None = None,
                 max_pending: int = 4, keep: int = 100) -> None:
        self.store, self.max_pixels = store, max_pixels
        self.fit_config = dict(fit_config or {})
        self.max_pending, self.keep = max_pending, keep
        self._jobs: dict[str, FitJob] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="astfad-fit")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def get(self, job_id: str) -> FitJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job with id '{job_id[:64]}'")
        return job

    def fitting(self, name: str) -> bool:
        return any(j.name == name and j.status in ("queued", "running") for j in list(self._jobs.values()))

    def submit(self, name: str, uploads: list[tuple[str, bytes]], strategy: str,
               shots: int | None, seed: int) -> FitJob:
        """Validate what can be checked at once (name, strategy, shots, duplicates) and queue."""
        check_name(name)
        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise ServeError(str(exc)) from None
        if not uploads:
            raise ServeError("no image in the request: send the good images in the field 'images'")
        if shots is not None and not 1 <= shots <= len(uploads):
            raise ServeError(f"shots must be between 1 and the number of images ({len(uploads)}), got {shots}")
        with self._lock:
            if self.store.exists(name) or self.fitting(name):
                raise ModelExists(f"a model named '{name}' exists or is being fitted; "
                                  "choose another name or delete it first")
            pending = sum(j.status in ("queued", "running") for j in self._jobs.values())
            if pending >= self.max_pending:
                raise Busy(f"{pending} fit jobs are already waiting; retry later", 30)
            job = FitJob(uuid.uuid4().hex, name, strategy, shots, seed, len(uploads))
            self._jobs[job.id] = job
            self._forget_old()
        self._pool.submit(self._run, job, uploads)
        return job

    def _forget_old(self) -> None:
        done = sorted((j for j in self._jobs.values() if j.finished is not None), key=lambda j: j.finished)
        for job in done[:max(0, len(done) - self.keep)]:
            del self._jobs[job.id]

    def _stage(self, job: FitJob, stage: str, progress: float | None = None) -> None:
        job.stage = stage
        job.progress = float(_STAGE_START[stage] if progress is None else progress)

    def _run(self, job: FitJob, uploads: list[tuple[str, bytes]]) -> None:
        job.status = "running"
        try:
            self._stage(job, "decoding")
            arrays, keys = [], []
            for i, (filename, data) in enumerate(uploads):
                try:
                    arrays.append(decode_upload(data, filename, self.max_pixels))
                    keys.append(f"{i}:{filename}")  # unique: two uploads may share a file name
                except (ImageLoadError, ServeError) as exc:
                    job.skipped.append(str(exc))
                job.progress = _STAGE_START["fitting"] * (i + 1) / len(uploads)
            uploads.clear()  # the bytes are no longer needed
            if not arrays:
                raise ServeError("no readable image among the uploads: " + "; ".join(job.skipped[:3]))
            if job.shots is not None and job.shots < len(arrays):
                # sampled by file name as `astfad fit --shots k --seed s` samples paths, so the same
                # folder gives the same shots here and on the command line
                by_name = [f"{key.partition(':')[2]}\0{i:06d}" for i, key in enumerate(keys)]
                chosen = sorted(int(s.rpartition("\0")[2]) for s in sample_shots(by_name, job.shots, job.seed))
                arrays, keys = [arrays[i] for i in chosen], [keys[i] for i in chosen]
            self._stage(job, "fitting")
            det = Detector(job.strategy, **{**self.fit_config, "seed": job.seed}).fit(arrays, keys)
            job.warnings = list(det.fit_warnings)
            self._stage(job, "saving")
            det.save(self.store.path(job.name))
            job.model = self.store.summary(job.name)
            job.progress, job.stage, job.status = 100.0, "done", "done"
        except Exception as exc:  # the job reports every failure; the server keeps serving
            job.error = " ".join(str(exc).split()) or type(exc).__name__
            job.status = job.stage = "failed"
        finally:
            job.finished = time.time()
