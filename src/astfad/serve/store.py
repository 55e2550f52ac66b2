"""The model store: every `<name>.safetensors` detector in one folder, listed from the file headers
(cheap: no tensor is read), loaded on first use and kept in an LRU under a memory budget.

Model names are the file stems and must match NAME_PATTERN (letters, digits, '-' and '_'), so a
name can never reach outside the folder. Temporary files of a fit in progress start with a dot and
do not match, so a model appears only once its file has been renamed into place."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astfad.detector import Detector, ModelFileError
from astfad.modelfile import read_metadata
from astfad.serve.errors import BadModelName, UnknownModel

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
SUFFIX = ".safetensors"


def check_name(name: str) -> str:
    """The name itself when safe, else BadModelName (400)."""
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise BadModelName(f"invalid model name {shown!r}: use 1-64 letters, digits, '-' or '_', "
                           "starting with a letter or digit")
    return name


def detector_bytes(det: Detector, path: Path) -> int:
    """Resident size estimate of a loaded detector: its tensors (the file) plus its backbones."""
    total = path.stat().st_size
    for featurizer in det.featurizers.values():
        backbone = featurizer.backbone
        for tensors in (getattr(backbone, "parameters", None), getattr(backbone, "buffers", None)):
            if tensors is not None:
                total += sum(t.numel() * t.element_size() for t in tensors())
    return total


@dataclass
class _Loaded:
    detector: Detector
    signature: tuple[int, int]  # (mtime_ns, size) of the file it was loaded from
    nbytes: int


class ModelStore:
    """Detectors by name from `root`; `get` loads on first use and evicts least recently used ones
    while the loaded total exceeds `memory_budget` bytes (the newest always stays)."""

    def __init__(self, root: Path, memory_budget: int,
                 load: Callable[[Path], Detector] = Detector.load) -> None:
        self.root = Path(root)
        self.memory_budget = memory_budget
        self.loader = load  # how a file becomes a Detector (tests substitute it)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def require(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise UnknownModel(f"no model named '{name}'")
        return path

    def names(self) -> list[str]:
        return sorted(p.name[:-len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}")
                      if p.is_file() and NAME_PATTERN.fullmatch(p.name[:-len(SUFFIX)]))

    def summary(self, name: str) -> dict[str, Any]:
        """What /models lists: strategy, shots, thresholds and how they were last calibrated
        (None: the fit's), size; an unreadable file says why."""
        path = self.require(name)
        stat = path.stat()
        out: dict[str, Any] = {"name": name, "size_bytes": stat.st_size,
                               "modified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime)),
                               "loaded": name in self._loaded}
        try:
            meta = read_metadata(path)
        except ModelFileError as exc:
            return {**out, "error": str(exc)}
        return {**out, "strategy": meta.get("strategy"), "requested_strategy": meta.get("config", {}).get("strategy"),
                "shots": len(meta.get("shots", [])), "threshold": meta.get("threshold"),
                "pixel_threshold": meta.get("pixel_threshold"), "calibration": meta.get("calibration"),
                "fit_seconds": meta.get("fit_seconds"),
                "astfad_version": meta.get("astfad_version")}

    def details(self, name: str) -> dict[str, Any]:
        """The summary plus the shots, the configuration and the SelectionReport (auto only)."""
        summary = self.summary(name)
        if "error" in summary:
            raise ModelFileError(summary["error"])
        meta = read_metadata(self.path(name))
        return {**summary, "shot_names": meta.get("shots", []), "selection": meta.get("selection"),
                "experts": meta.get("experts"), "backbones": meta.get("backbones"),
                "config": meta.get("config"), "adapter_stats": meta.get("adapter_stats")}

    def get(self, name: str) -> Detector:
        """The loaded detector, (re)loading it when its file is new or has changed."""
        path = self.require(name)
        stat = path.stat()
        signature = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.signature == signature:
                self._loaded.move_to_end(name)
                return entry.detector
        det = self.loader(path)
        with self._lock:
            self._loaded[name] = _Loaded(det, signature, detector_bytes(det, path))
            self._loaded.move_to_end(name)
            while len(self._loaded) > 1 and self.memory_bytes() > self.memory_budget:
                self._loaded.popitem(last=False)
        return det

    def memory_bytes(self) -> int:
        return sum(entry.nbytes for entry in list(self._loaded.values()))

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def delete(self, name: str) -> None:
        path = self.require(name)
        with self._lock:
            self._loaded.pop(name, None)
        path.unlink()
