"""ONNX Runtime for the backbones.

A feature reader (a backbone and its reading, `features.TextureReader` / `SemanticReader`) is
exported once with torch.onnx.export from our own modules, with batch and grid as dynamic axes,
and kept under the astfad cache dir (written to a temp name, then renamed). The file name carries
a digest of the reader's identity (backbone id with its weights, layers or pooling), the opset,
the astfad version and the source of every module in it, so a changed module or other weights
never reuse a stale graph. The torch exporter used here is the TorchScript one (`dynamo=False`):
it needs no onnxscript.

`int8` graphs quantise the weights of the ViT's linear layers to int8 per output channel, with
activations quantised per batch at run time (ONNX Runtime dynamic quantisation, so nothing is
calibrated and one graph serves every detector). The attention products and the patch embedding
stay float32: quantising those too (what a plain `quantize_dynamic` does) took the token cosine
to fp32 down to 0.92 (FINDINGS.md), and static activation scales on them to 0.47 (measured here).
Linear layers only: token cosine 0.9992 (mean), 150 against 246 ms/image for fp32 at 448 on an
AVX512-VNNI EPYC, 1 thread; static quantisation of the same layers calibrated on four shots was
no better (cosine 0.9988, 153 ms) and would need calibration per detector.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from astfad.backbones.weights import cache_dir
from astfad.data.images import write_atomically

OPSET = 17
PRECISIONS = ("fp32", "int8")
# MatMul nodes of the ViT's linear layers (names given by torch.onnx.export from dinov2.py)
INT8_NODE_SUFFIXES = ("qkv/MatMul", "proj/MatMul", "fc1/MatMul", "fc2/MatMul")


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def _source_digest(module: torch.nn.Module) -> str:
    """Digest of the source files of every module class inside `module`."""
    files = sorted({inspect.getfile(type(m)) for m in module.modules()})
    h = hashlib.sha256()
    for name in files:
        h.update(Path(name).read_bytes())
    return h.hexdigest()


def graph_file(module: torch.nn.Module, identity: str, precision: str = "fp32") -> Path:
    """Where the cached graph of a reader lives (see the module docstring for the key)."""
    from astfad import __version__

    key = f"{identity}|{precision}|opset{OPSET}|astfad{__version__}|{_source_digest(module)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9.,_-]+", "_", identity)[:80]
    return cache_dir() / "onnx" / f"{slug}-{precision}-opset{OPSET}-{digest}.onnx"


def export_onnx(module: torch.nn.Module, example: Sequence[torch.Tensor], dest: Path,
                input_names: Sequence[str], output_names: Sequence[str],
                dynamic_axes: Mapping[str, Mapping[int, str]]) -> Path:
    """torch.onnx.export of `module` to `dest`, atomically (temp file beside it, then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Python-side shape checks in the modules are constant for a valid input: the tracer's
        # warnings about them, and the exporter's notice that dynamo is the future, are noise.
        warnings.simplefilter("ignore")
        return write_atomically(dest, lambda tmp: torch.onnx.export(
            module.eval(), tuple(example), str(tmp), dynamo=False, opset_version=OPSET,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}))


def _quantise_int8(source: Path, dest: Path) -> None:
    """Dynamic int8 of the linear layers' MatMuls (see the module docstring), atomically."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    nodes = [n.name for n in onnx.load(str(source), load_external_data=False).graph.node
             if n.op_type == "MatMul" and n.name.endswith(INT8_NODE_SUFFIXES)]
    if not nodes:
        raise ValueError(f"'{source}' has no linear-layer MatMul to quantise (int8 is for ViTs)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice about a pre-processing pass it does not need
    try:
        write_atomically(dest, lambda tmp: quantize_dynamic(source, tmp, nodes_to_quantize=nodes, per_channel=True,
                                                            weight_type=QuantType.QInt8))
    finally:
        root.setLevel(level)


def reader_graph(module: torch.nn.Module, identity: str, example_grid: tuple[int, int],
                 precision: str = "fp32") -> Path:
    """The cached ONNX graph of a feature reader: image (B, 3, H, W) in [0, 1] -> features
    (B, C, h, w); exported (and quantised) on first use only."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    dest = graph_file(module, identity, precision)
    if dest.is_file():
        return dest
    if precision == "int8":
        _quantise_int8(reader_graph(module, identity, example_grid, "fp32"), dest)
        return dest
    example = torch.rand(1, 3, *example_grid, generator=torch.Generator().manual_seed(0))
    return export_onnx(module, [example], dest, ["image"], ["features"],
                       {"image": {0: "batch", 2: "height", 3: "width"},
                        "features": {0: "batch", 2: "rows", 3: "cols"}})


def session(path: str | os.PathLike, threads: int):
    """An ONNX Runtime CPU session with `threads` intra-op threads, one inter-op thread, and no
    spinning after a run (spinning threads would slow the kNN search that follows)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxReader:
    """A feature reader run by ONNX Runtime, called like the torch module it was exported from.

    Images go through one at a time: the graph holds each block's attention matrices (batch x
    heads x tokens x tokens) in memory, and per image the peak RSS stayed near torch's (720 MB
    against 1040 MB for batches of 4 at 1000 tokens) at the same speed per image."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self.session = session(path, threads)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(np.concatenate(
            [self.session.run(None, {"image": images[i:i + 1]})[0] for i in range(len(images))]))
