"""Saved detector files: one safetensors file, the tensors of the experts plus JSON metadata in its
header, written whole or not at all and validated completely before anything is built from it.

A model file may come from anywhere, so reading one trusts nothing: every defect (broken JSON, a
missing or mistyped field, an unknown config key, a bank of the wrong shape or full of NaN, a
flipped byte in the tensor data) becomes one `ModelFileError` naming the file and the field. A
SHA-256 of the tensor payload is stored in the metadata on write and checked on read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from astfad.backbones import BACKBONES
from astfad.config import DetectorConfig, experts_of, parse_strategy
from astfad.data.images import write_atomically
from astfad.experts.base import INT_DTYPES, TensorLayoutError
from astfad.experts.registry import REGISTRY, expert_spec

EXPERTS = tuple(REGISTRY)
METADATA_KEY = "astfad"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ModelFileError(ValueError):
    """A saved detector that cannot be loaded: wrong file, missing part, incompatible version,
    malformed field or damaged data. The message is one line naming the file and the field."""


def payload_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def write_model_file(path: str | Path, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                     overwrite: bool = False) -> Path:
    """Validate, then write `tensors` with `meta` (plus the payload checksum) atomically: the
    file appears whole under its name or not at all, with permissions from the umask. A detector
    that would not load again is refused here (ModelFileError) rather than written."""
    path = Path(path)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = {**meta, "checksum": payload_checksum(tensors)}
    validate(path, meta, tensors, meta.get("format"))
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory (a model file path is needed)", str(path))
    # serialised here and written by Python: a full disk is then an OSError naming the file, and
    # the file keeps the permissions write_atomically gave it (safetensors' own writer makes 0600)
    data = save(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, sync=True)


def _open(path: Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(astfad metadata, tensors or {}) of a safetensors file; ModelFileError for a file that is
    missing, unreadable, not safetensors, without astfad metadata or whose metadata is no JSON object."""
    if path.is_dir():
        raise ModelFileError(f"'{path}' is a directory, not a saved detector")
    if not path.is_file():
        raise ModelFileError(f"no saved detector at '{path}'")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except OSError as exc:
        raise ModelFileError(f"cannot read '{path}': {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors raises several types for a foreign or damaged file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelFileError(f"'{path}' is not an astfad detector file ({reason})") from None
    if METADATA_KEY not in header:
        raise ModelFileError(f"'{path}' is a safetensors file without astfad metadata")
    try:
        meta = json.loads(header[METADATA_KEY])
    except (ValueError, RecursionError) as exc:
        raise ModelFileError(f"'{path}': the astfad metadata is not a JSON object: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"'{path}': the astfad metadata must be a JSON object, got {_show(meta)}")
    return meta, tensors


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A saved detector's JSON metadata from the file's header alone (no tensor is read), for
    listings; not validated beyond being a JSON object: loading validates."""
    return _open(Path(path), with_tensors=False)[0]


def read_model_file(path: str | Path, format_version: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved detector, every field and tensor checked; ModelFileError
    for any defect. Nothing is unpickled, executed or fetched."""
    path = Path(path)
    meta, tensors = _open(path, with_tensors=True)
    validate(path, meta, tensors, format_version)
    return meta, tensors


# ------------------------------------------------------------------------------------ validation


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Checker:
    """Checks of one file's fields; each failure is a ModelFileError naming file and field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field: str, problem: str) -> typing.NoReturn:
        """One line, whatever the file holds: control characters of keys and values are escaped."""
        raise ModelFileError(_printable(f"'{self.path}': field '{field}' {problem}"))

    def get(self, meta: Mapping[str, Any], field: str, kind: type | tuple[type, ...],
            optional: bool = False) -> Any:
        if field not in meta:
            if optional:
                return None
            self.fail(field, "is missing")
        value = meta[field]
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.fail(field, f"must be {_kind_name(kind)}, got {_show(value)}")
        return value

    def number(self, value: Any, field: str, positive: bool = False) -> float:
        if not _finite_number(value):
            self.fail(field, f"must be a finite number, got {_show(value)}")
        if positive and value <= 0:
            self.fail(field, f"must be positive, got {value}")
        return float(value)

    def strategy(self, value: Any, field: str, allow_auto: bool = False) -> str:
        if not isinstance(value, str):
            self.fail(field, f"must be a strategy name, got {_show(value)}")
        try:
            rule, _ = parse_strategy(value)
        except ValueError as exc:
            self.fail(field, str(exc))
        if rule == "auto" and not allow_auto:
            self.fail(field, "must be the applied strategy, not 'auto'")
        return value


def validate(path: Path, meta: Any, tensors: Mapping[str, torch.Tensor], format_version: int | None) -> None:
    """Every check of a saved detector's metadata and tensors (see the module docstring)."""
    check = _Checker(path)
    if not isinstance(meta, dict):
        raise ModelFileError(f"'{path}': the astfad metadata must be a JSON object, got {_show(meta)}")
    if meta.get("format") != format_version:
        raise ModelFileError(f"'{path}' has detector format {_show(meta.get('format'))} "
                             f"(astfad {meta.get('astfad_version')}); this astfad reads format "
                             f"{format_version}: refit it")
    checksum = check.get(meta, "checksum", str)
    if checksum != payload_checksum(tensors):
        raise ModelFileError(f"'{path}': the tensor data does not match its checksum (the file is "
                             "damaged or was altered)")
    _check_config(check, check.get(meta, "config", dict))
    strategy = check.strategy(check.get(meta, "strategy", str), "strategy")
    check.number(check.get(meta, "aspect", (int, float)), "aspect", positive=True)
    shots = check.get(meta, "shots", list)
    if not all(isinstance(s, str) for s in shots):
        check.fail("shots", "must be a list of strings")
    backbones = check.get(meta, "backbones", dict)
    for family, backbone_id in backbones.items():
        if family not in ("texture", "semantic") or not isinstance(backbone_id, str):
            check.fail(f"backbones.{family}", f"must map 'texture' or 'semantic' to a backbone id, "
                                              f"got {_show(backbone_id)}")
    experts = _check_experts(check, meta, strategy)
    check.number(check.get(meta, "threshold", (int, float)), "threshold")
    check.number(check.get(meta, "pixel_threshold", (int, float)), "pixel_threshold")
    _check_threshold_models(check, meta)
    check.get(meta, "selection", dict, optional=True)  # the record of a choice: never used to score
    check.get(meta, "adapter_stats", dict, optional=True)
    check.get(meta, "calibration", dict, optional=True)  # the record of a calibration: never used to score
    if "fit_seconds" in meta:
        check.number(meta["fit_seconds"], "fit_seconds")
    _check_tensors(check, experts, tensors)


def _check_config(check: _Checker, config: dict[str, Any]) -> None:
    """Known keys of the declared types, accepted by DetectorConfig; a device torch knows; known
    backbones."""
    try:
        check_config_values(config)
        DetectorConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        check.fail("config", " ".join(str(exc).split()))
    device = config.get("device", "auto")
    if device != "auto":
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            check.fail("config.device", f"is not a device torch knows, got {_show(device)}")
    for key in ("texture_backbone", "semantic_backbone"):
        name = config.get(key, getattr(DetectorConfig, key))
        if name not in BACKBONES:
            check.fail(f"config.{key}", f"names an unknown backbone {_show(name)}")


def _check_experts(check: _Checker, meta: Mapping[str, Any], strategy: str) -> list[str]:
    """The saved experts (every one the strategy needs) and a normaliser for each."""
    experts = check.get(meta, "experts", list)
    unknown = [e for e in experts if e not in EXPERTS]
    if unknown or not experts or len(set(experts)) != len(experts):
        check.fail("experts", f"must list distinct experts among {', '.join(EXPERTS)}, got {_show(experts)}")
    missing = [e for e in experts_of(strategy) if e not in experts]
    if missing:
        check.fail("experts", f"lacks {', '.join(missing)}, which strategy '{strategy}' needs")
    normalisers = check.get(meta, "normalisers", dict)
    for name in ("applied", *experts):
        if name not in normalisers:
            check.fail("normalisers", f"lacks '{name}'")
    for name, values in normalisers.items():
        if name not in (*EXPERTS, "applied"):
            check.fail(f"normalisers.{name}", "is not an expert or 'applied'")
        if not isinstance(values, list) or len(values) != 3:
            check.fail(f"normalisers.{name}", f"must be [center, scale, median], got {_show(values)}")
        for value, part in zip(values, ("center", "scale", "median")):
            check.number(value, f"normalisers.{name}.{part}", positive=part != "center")
    return experts


def _check_threshold_models(check: _Checker, meta: Mapping[str, Any]) -> None:
    models = check.get(meta, "threshold_models", dict, optional=True)
    if models is None:
        return
    from astfad.thresholds import ThresholdModel

    for name, model in models.items():
        field = f"threshold_models.{name}"
        check.strategy(name, field)
        if not isinstance(model, dict):
            check.fail(field, f"must be an object, got {_show(model)}")
        for part, values in model.items():
            if not isinstance(values, dict):
                check.fail(f"{field}.{part}", f"must be an object, got {_show(values)}")
            for key, value in values.items():
                check.number(value, f"{field}.{part}.{key}")
        try:
            ThresholdModel.from_dict(model)
        except (TypeError, ValueError, KeyError) as exc:
            check.fail(field, f"is malformed ({type(exc).__name__}: {exc})")


def _check_tensors(check: _Checker, experts: list[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Each expert's tensors in the layout its class declares (`check_tensors`: a bank and its
    owners, PCA vectors, adapter layers, a projector...); every float finite; nothing else."""
    for key, tensor in tensors.items():
        if tensor.dtype not in (*FLOAT_DTYPES, *INT_DTYPES):
            check.fail(f"tensor {key}", f"has an unsupported dtype {tensor.dtype}")
    allowed = set()
    for name in experts:
        prefix = f"{name}."
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            accepted = expert_spec(name).kind.check_tensors(own)
        except TensorLayoutError as exc:
            check.fail(f"tensor {prefix}{exc.key}", exc.problem)
        allowed |= {prefix + k for k in accepted}
    extra = sorted(set(tensors) - allowed)
    if extra:
        check.fail(f"tensor {extra[0]}", "belongs to no saved expert")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            check.fail(f"tensor {key}", "holds NaN or infinite values")


# ------------------------------------------------------------------------- config value types


def config_field_types() -> dict[str, Any]:
    """DetectorConfig's fields and their declared types."""
    hints = typing.get_type_hints(DetectorConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(DetectorConfig)}


def check_config_values(values: Mapping[str, Any]) -> None:
    """ValueError naming the key and its expected type for a value that does not match
    DetectorConfig's declared field type (unknown keys are DetectorConfig.from_dict's to refuse)."""
    types_ = config_field_types()
    for key, value in values.items():
        if key in types_ and not _matches(value, types_[key]):
            raise ValueError(f"'{key}' must be {_type_name(types_[key])}, got {_show(value)}")


def _matches(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return _finite_number(value)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    return True  # a type this check does not know: DetectorConfig itself decides


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp in (int, bool, str):
        return {int: "a whole number", bool: "true or false", str: "a string"}[tp]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}s"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    return str(tp)


def _finite_number(value: Any) -> bool:
    """A JSON number that is finite (an integer too large for a float is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in _as_tuple(kind)))


def _show(value: Any) -> str:
    """A short repr for messages (a huge or nested value stays one short line)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
