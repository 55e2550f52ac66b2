"""One inference worker per process: a bounded queue of predict requests and a thread that scores
them in micro-batches, so requests that arrive together share one `Detector.predict` call.

Gathering a batch: the worker takes the oldest request, then every queued request of up to
`max_batch` images in all; while other predict requests are still arriving (being received or
decoded by the web layer, counted by `Arrival`), it waits up to `gather_s` for them to join. A lone
request therefore never waits, and a burst shares one forward pass."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np

from astfad.detector import Detector, Prediction
from astfad.serve.errors import Busy
from astfad.serve.metrics import Metrics
from astfad.serve.store import ModelStore

Result = tuple[Detector, list[Prediction]]
IDLE_TRIM_S = 1.0  # idle this long after work, the worker gives freed memory back


def _malloc_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0): hands freed heap pages back to the system. Without it the memory of
    a burst of large batches stays resident after the burst; a no-op where there is no glibc."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


release_memory = _malloc_trim()


@dataclass
class Task:
    model: str
    images: list[np.ndarray]
    future: Future = field(default_factory=Future)


class Arrival:
    """A predict request between its first byte and its place in the queue (or its refusal)."""

    def __init__(self, settle: Callable[[], None]) -> None:
        self._settle = settle
        self._open = True

    def settle(self) -> None:
        if self._open:
            self._open = False
            self._settle()


class InferenceWorker:
    def __init__(self, store: ModelStore, metrics: Metrics, max_queue: int = 32,
                 max_batch: int = 16, gather_s: float = 0.05) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError("max_queue and max_batch must be at least 1")
        self.store, self.metrics = store, metrics
        self.max_queue, self.max_batch, self.gather_s = max_queue, max_batch, gather_s
        self._queue: deque[Task] = deque()
        self._arriving = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._worked = False  # scored something since memory was last given back
        self.idle_trim_s, self.release_memory = IDLE_TRIM_S, release_memory
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 0.1  # running estimate, for Retry-After

    # ------------------------------------------------------------ web-layer side
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="astfad-inference", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            while self._queue:
                task = self._queue.popleft()
                if task.future.set_running_or_notify_cancel():
                    task.future.set_exception(Busy("the server is shutting down", 5))

    def arrival(self) -> Arrival:
        with self._cond:
            self._arriving += 1
        return Arrival(self._settle)

    def _settle(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def depth(self) -> int:
        return len(self._queue)

    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    def busy_error(self) -> Busy:
        with self._cond:
            images = sum(len(t.images) for t in self._queue)
        wait = math.ceil(images * self._seconds_per_image)
        return Busy(f"the inference queue is full ({self.max_queue} requests); retry in {max(1, wait)} s",
                    wait)

    def submit(self, model: str, images: list[np.ndarray], arrival: Arrival | None = None) -> Future:
        """Queue a request; its future gives (detector, predictions). Busy when the queue is full."""
        task = Task(model, images)
        with self._cond:
            full = len(self._queue) >= self.max_queue
            if not full:
                self._queue.append(task)
                self._cond.notify_all()
        if arrival is not None:
            arrival.settle()
        if full:
            raise self.busy_error()
        return task.future

    # ------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while True:
            tasks = self._gather()
            if tasks is None:
                return
            if not tasks:  # idle after work: hand the memory of the last batches back
                self.release_memory()
                continue
            for model, group in groupby(sorted(tasks, key=lambda t: t.model), key=lambda t: t.model):
                self._serve(model, list(group))
            self._worked = True

    def _gather(self) -> list[Task] | None:
        """The next batch; [] after `idle_trim_s` without requests following work; None to stop."""
        with self._cond:
            while not self._queue and not self._stopping:
                if not self._cond.wait(self.idle_trim_s if self._worked else None) and not self._queue:
                    self._worked = False
                    return []
            if self._stopping:
                return None
            batch, count = [], 0
            deadline = time.monotonic() + self.gather_s
            while True:
                if self._queue:
                    if batch and count + len(self._queue[0].images) > self.max_batch:
                        break
                    task = self._queue.popleft()
                    if task.future.set_running_or_notify_cancel():  # False: the client went away
                        batch.append(task)
                        count += len(task.images)
                    continue
                remaining = deadline - time.monotonic()
                if count >= self.max_batch or self._arriving == 0 or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch

    def _serve(self, model: str, tasks: list[Task]) -> None:
        try:
            det = self.store.get(model)
        except Exception as exc:  # unknown (deleted meanwhile) or unreadable model
            for task in tasks:
                task.future.set_exception(exc)
            return
        images = [image for task in tasks for image in task.images]
        start = time.perf_counter()
        try:
            predictions = det.predict(images, batch_size=self.max_batch)
        except Exception as exc:
            if len(tasks) == 1:
                tasks[0].future.set_exception(exc)
            else:  # one request's images must not fail the others: score each on its own
                for task in tasks:
                    self._serve(model, [task])
            return
        elapsed = time.perf_counter() - start
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(images)
        self.metrics.batch(len(images), elapsed)
        offset = 0
        for task in tasks:
            task.future.set_result((det, predictions[offset:offset + len(task.images)]))
            offset += len(task.images)
