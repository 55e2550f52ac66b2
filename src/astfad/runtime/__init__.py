"""How the backbones run: torch or ONNX Runtime (fp32, or int8 for the ViT), on how many threads,
and which kNN kernel suits this CPU. Nothing here imports onnxruntime until a session is made.

`runtime="auto"` decides from facts known without timing anything on the hot path (measured with
benchmarks/speed.py, drift against torch fp32 under the issue's rule): see `backbone_runtime`.
"""

from __future__ import annotations

import torch

from astfad.runtime.cpu import apply_threads, cpu_flags, native_bf16, resolve_threads
from astfad.runtime.ort import OnnxReader, onnxruntime_available, reader_graph

RUNTIMES = ("torch", "onnxruntime", "onnxruntime_int8", "auto")
# x86 flags of int8 dot products that ONNX Runtime's int8 kernels use without saturating
INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})

__all__ = ["RUNTIMES", "backbone_runtime", "apply_threads", "resolve_threads", "cpu_flags",
           "native_bf16", "OnnxReader", "reader_graph"]


def backbone_runtime(runtime: str, device: torch.device, backbone: torch.nn.Module) -> str:
    """The engine that runs `backbone`: 'torch', 'onnxruntime' or 'onnxruntime_int8' (ViTs only;
    a CNN asked for int8 runs in ONNX Runtime fp32).

    `auto` (no timing on the hot path; figures from benchmarks/speed.py): on the CPU, when ONNX
    Runtime is installed and the backbone exports with a dynamic grid, ONNX Runtime: fp32 (faster
    than torch on both CPUs measured, features equal to ~1e-5, no drift), int8 for the ViT on CPUs
    with int8 dot-product instructions (VNNI/AMX: 1.6x faster than fp32 here, drift within the
    0.5-point rule in the reduced run). Without VNNI, int8 products can saturate and were barely
    faster (FINDINGS.md), so fp32 there. Torch on CUDA or when the graph cannot be exported."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got '{runtime}'")
    if runtime == "torch":
        return "torch"
    exportable = getattr(backbone, "dynamic_grid_export", True)
    if runtime == "auto":
        if device.type != "cpu" or not onnxruntime_available() or not exportable:
            return "torch"
        vit = getattr(backbone, "kind", "cnn") == "vit"
        return "onnxruntime_int8" if vit and cpu_flags() & INT8_FLAGS else "onnxruntime"
    if not exportable:
        raise ValueError(f"runtime '{runtime}': backbone {getattr(backbone, 'backbone_id', '')} interpolates "
                         "its position embeddings in a way ONNX export cannot keep for every grid; "
                         "use runtime 'torch' (or 'auto')")
    if device.type != "cpu":
        raise ValueError(f"runtime '{runtime}' runs the backbones on the CPU, but the device is "
                         f"'{device}': use device 'cpu' or runtime 'torch'")
    if not onnxruntime_available():
        raise ValueError(f"runtime '{runtime}' needs ONNX Runtime: pip install onnxruntime")
    return runtime if getattr(backbone, "kind", "cnn") == "vit" else "onnxruntime"
