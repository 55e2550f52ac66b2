"""The probes' result cache: rows collected once into a JSON file, re-read on a rerun (which then
only re-evaluates). Imported by the scripts beside it (`python benchmarks/<script>.py`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def cached_rows(path: Path, collect: Callable[[], list[dict]]) -> list[dict]:
    if path.exists():
        return json.loads(path.read_text())
    rows = collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return rows


def recorded_rows(paths: list[Path]) -> list[dict]:
    """The rows of several recorded runs (`--rows`), read together for one report."""
    return [row for path in paths for row in json.loads(path.read_text())]
