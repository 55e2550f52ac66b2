"""Streaming prediction over many image files: the engine of `astfad predict`.

Images are decoded on a background thread one batch ahead while the backbones run on the current
batch, so decoding and scoring overlap. Memory stays bounded whatever the number and the size of
the files: a batch holds at most `batch_size` images and `BATCH_PIXELS` pixels (from the file
headers), at most two batches of decoded images exist at once (the one being scored, the next one
being decoded), maps are kept on the small evaluation grid and each full-size map is made only
when its item is handed out, and no feature of a test image is cached. Every unusable input
(missing, a dangling link, a folder or GIF named like an image, unreadable, corrupt, over the
pixel budget) comes out as an item with `error` set, in its place in the input order, and the rest
goes on. `PredictionOutputs` writes the items to a folder so that a crash loses nothing.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astfad.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, image_file_problem, image_size, load_image
from astfad.detector import Detector, Prediction

DEFAULT_BATCH_SIZE = 16
BATCH_PIXELS = 64_000_000  # decoded pixels in one batch (about 190 MB of RGB), beyond its first image


@dataclass
class PredictionItem:
    """One input's outcome: the decoded image (as scored) and its prediction, or the one-line
    reason it could not be scored (then `image` and `prediction` are None)."""

    path: Path
    image: np.ndarray | None
    prediction: Prediction | None
    error: str | None


Decoded = list[tuple[Path, np.ndarray | None, str | None]]


def decode(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, downscale: bool = False
           ) -> tuple[np.ndarray | None, str | None]:
    """(image, None) or (None, one-line reason): a bad file is an answer, not an exception."""
    problem = image_file_problem(path)
    if problem is not None:
        return None, problem
    try:
        return load_image(path, max_pixels, downscale), None
    except ImageLoadError as exc:
        return None, str(exc)


def _decode_batch(paths: Sequence[Path], max_pixels: int | None, downscale: bool) -> Decoded:
    return [(path, *decode(path, max_pixels, downscale)) for path in paths]


def _reason(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _score(detector: Detector, decoded: Decoded) -> Iterator[PredictionItem]:
    """Items of one decoded batch in order; the batch is scored in one pass, and should that fail,
    image by image, so that only the image at fault becomes an error."""
    good = [i for i, (_, image, _) in enumerate(decoded) if image is not None]
    results: dict[int, tuple[torch.Tensor, torch.Tensor] | str] = {}
    if good:
        try:
            maps, scores = detector.score_arrays([decoded[i][1] for i in good])
            results = {i: (maps[j], scores[j]) for j, i in enumerate(good)}
        except Exception:  # noqa: BLE001 - a batch boundary: find the one image at fault
            for i in good:
                try:
                    maps, scores = detector.score_arrays([decoded[i][1]])
                    results[i] = (maps[0], scores[0])
                except Exception as exc:  # noqa: BLE001 - reported as that image's row
                    results[i] = f"cannot score image '{decoded[i][0]}': {_reason(exc)}"
    for i, (path, image, error) in enumerate(decoded):
        decoded[i] = (path, None, None)  # hand the image over: the batch list no longer holds it
        result = results.get(i)
        if isinstance(result, str):
            error = result
        if error is not None:
            yield PredictionItem(path, None, None, error)
            continue
        eval_map, score = result
        prediction = detector.prediction(eval_map, score, image.shape[:2], str(path))
        yield PredictionItem(path, image, prediction, None)


def plan_batches(paths: Sequence[Path], batch_size: int = DEFAULT_BATCH_SIZE,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[slice]:
    """Consecutive batches of at most `batch_size` images and, beyond their first image,
    `BATCH_PIXELS` pixels, sized from the file headers (nothing is decoded). Greedy from the
    start, so the plan of a list that starts at a batch boundary continues the same boundaries."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches, start, pixels = [], 0, 0
    for i, path in enumerate(paths):
        try:
            height, width = image_size(path)
            size = height * width if max_pixels is None else min(height * width, max_pixels)
        except ImageLoadError:
            size = 0  # reported when it is decoded
        if i > start and (i - start >= batch_size or pixels + size > BATCH_PIXELS):
            batches.append(slice(start, i))
            start, pixels = i, 0
        pixels += size
    if start < len(paths):
        batches.append(slice(start, len(paths)))
    return batches


def iter_predictions(detector: Detector, paths: Sequence[str | os.PathLike],
                     batch_size: int = DEFAULT_BATCH_SIZE, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     downscale: bool = False) -> Iterator[PredictionItem]:
    """Predict every path, yielding one PredictionItem per path in input order (see the module
    docstring). `max_pixels` refuses bigger images (None: no limit); `downscale` resizes them
    to fit instead, so their maps and masks are at the reduced size."""
    if detector.strategy is None:
        raise RuntimeError("the detector is not fitted; call fit() or Detector.load()")
    paths = [Path(p) for p in paths]
    batches = [paths[batch] for batch in plan_batches(paths, batch_size, max_pixels)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="astfad-decode") as pool:
        def submit(index: int) -> Future | None:
            if index >= len(batches):
                return None
            return pool.submit(_decode_batch, batches[index], max_pixels, downscale)

        upcoming = submit(0)
        for index in range(len(batches)):
            current = upcoming.result()
            upcoming = submit(index + 1)  # decoded while this batch is scored and handed out
            yield from _score(detector, current)


# ------------------------------------------------------------------------------ crash-safe outputs

HEADER = ("file", "score", "verdict", "error", "overlay", "mask")
TABLE = "predictions.csv"
FOLDERS = ("overlays", "masks")
PICTURES = (".jpg", ".png")  # overlays are JPEG (.png from earlier versions), masks PNG


def unique_name(stem: str, used: set[str]) -> str:
    """A file stem not in `used` (two input folders may hold the same file name); adds it."""
    name, i = stem, 1
    while name in used:
        name, i = f"{stem}_{i}", i + 1
    used.add(name)
    return name


def overlay_scale(detector: Detector, pixel_threshold: float | None = None) -> tuple[float, float]:
    """One colour scale for every overlay of a model: from its normal mean to at least four
    normal standard deviations above it (and past the pixel threshold, the detector's own unless
    another is given, e.g. one request's override)."""
    norm = detector.normalisers["applied"]
    threshold = detector.pixel_threshold if pixel_threshold is None else pixel_threshold
    return norm.center, max(threshold, norm.center + 4 * norm.scale)


class PredictionOutputs:
    """predictions.csv, overlays/ and masks/ in one folder, written so that a crash loses nothing
    that was finished: each row is appended and flushed as soon as its image is done (after its
    overlay and mask, each written to a temporary name and renamed), and synced to disk every
    `sync_every` rows. Nothing existing is overwritten unless asked:

    - a new run refuses a folder that already holds predictions.csv or overlay/mask pictures;
    - `resume` continues a cut-off run: `done` holds its rows (a cut-off last row is removed);
    - `force` first removes what an earlier run wrote there (predictions.csv and the pictures in
      overlays/ and masks/), and nothing else.
    """

    def __init__(self, folder: str | os.PathLike, scale: tuple[float, float], resume: bool = False,
                 force: bool = False, sync_every: int = DEFAULT_BATCH_SIZE) -> None:
        if resume and force:
            raise ValueError("resume (keep the earlier rows) and force (remove them) exclude each other")
        self.folder = Path(folder)
        self.table = self.folder / TABLE
        self.scale = scale
        self.sync_every = max(1, sync_every)
        self.done: dict[str, list[str]] = {}
        self.repaired = False
        earlier = self._earlier_outputs()
        if force:
            for path in earlier:
                path.unlink()
        elif resume and self.table.exists():
            self.done = self._read_done()
        elif earlier:
            how = "--force to replace it" if resume else "--resume to continue it or --force to replace it"
            raise FileExistsError(f"'{earlier[0]}' is from an earlier run; pass {how}")
        for path in self._leftovers():
            path.unlink()
        for name in FOLDERS:
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        self._used = {Path(row[4]).stem for row in self.done.values() if row[4]}
        self._handle = open(self.table, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._handle)
        self._unsynced = 0
        if not self.done and self.table.stat().st_size == 0:
            self._append(list(HEADER))

    def _earlier_outputs(self) -> list[Path]:
        """What a run writes here: predictions.csv and the pictures in overlays/ and masks/."""
        found = [self.table] if self.table.is_file() else []
        for name in FOLDERS:
            folder = self.folder / name
            if folder.is_dir():
                found += sorted(p for p in folder.iterdir() if p.suffix in PICTURES and p.is_file())
        return found

    def _leftovers(self) -> list[Path]:
        """Temporary files of an interrupted write (see `write_atomically`)."""
        found = []
        for name in FOLDERS:
            folder = self.folder / name
            if folder.is_dir():
                found += [p for p in folder.glob(".*.tmp") if p.is_file()]
        return found

    def _read_done(self) -> dict[str, list[str]]:
        """The rows of a cut-off run; an unfinished last line (no newline) is cut off the file."""
        data = self.table.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[:data.rfind(b"\n") + 1]
            with open(self.table, "r+b") as handle:
                handle.truncate(len(data))
            self.repaired = True
        try:
            rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"'{self.table}' is damaged ({exc}); pass --force to start over") from None
        if not rows:
            return {}
        if tuple(rows[0]) != HEADER:
            raise ValueError(f"'{self.table}' was not written by this astfad (columns "
                             f"{', '.join(rows[0])}); pass --force to start over")
        for number, row in enumerate(rows[1:], start=2):
            if len(row) != len(HEADER):
                raise ValueError(f"'{self.table}' is damaged at line {number}; pass --force to start over")
        return {row[0]: row for row in rows[1:]}

    def write(self, item: PredictionItem) -> list[str]:
        """Write one item's overlay and mask, then its row; returns the row."""
        from astfad.visualize import overlay, save_image, save_mask  # matplotlib: only when drawing

        if item.error is not None:
            row = [str(item.path), "", "error", item.error, "", ""]
        else:
            pred = item.prediction
            name = unique_name(item.path.stem, self._used)
            overlay_path, mask_path = f"overlays/{name}.jpg", f"masks/{name}.png"
            save_image(overlay(item.image, pred.anomaly_map, *self.scale), self.folder / overlay_path)
            save_mask(pred.mask, self.folder / mask_path)
            verdict = "anomalous" if pred.is_anomalous else "normal"
            row = [str(item.path), f"{pred.score:.6g}", verdict, "", overlay_path, mask_path]
        self._append(row)
        return row

    def _append(self, row: list[str]) -> None:
        try:
            self._writer.writerow(row)
            self._handle.flush()
            self._unsynced += 1
            if self._unsynced >= self.sync_every:
                self.sync()
        except OSError as exc:
            exc.filename = exc.filename or str(self.table)
            raise

    def sync(self) -> None:
        """Flush the rows written so far to disk."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self._handle.closed:
            try:
                self.sync()
            finally:
                self._handle.close()

    def __enter__(self) -> "PredictionOutputs":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
