"""Patch features of images for the experts: one backbone pass per image, cached by image key.

The reader runs in torch or, exported once, in ONNX Runtime (`runtime`, see astfad.runtime),
with one thread count for torch, faiss and ONNX Runtime (`threads`).

A `Featurizer` owns a frozen backbone and the expert-specific reading of its output (PatchCore's
pooled stages for the texture expert, L2-normalised ViT tokens for the semantic expert). A cache
shared between detectors lets a benchmark evaluate many strategies, shot counts and seeds from a
single pass of each backbone over each image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from astfad.config import grid_for
from astfad.data.images import to_batch
from astfad.runtime import OnnxReader, apply_threads, backbone_runtime, reader_graph

FeatureCache = dict[tuple, torch.Tensor]


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Featurizer:
    """Images -> (N, C, h, w) patch features on the CPU, float32, in batches, with a cache."""

    def __init__(self, backbone: torch.nn.Module, size: int, multiple: int,
                 read: Callable[[torch.Tensor], torch.Tensor], identity: str,
                 device: torch.device, batch_size: int, cache: FeatureCache | None = None,
                 runtime: str = "torch", threads: int | None = None) -> None:
        self.backbone = backbone.to(device)
        self.size = size
        self.multiple = multiple
        self.module = read  # the torch reader, also what an ONNX graph is exported from
        self.threads = apply_threads(threads)
        self.runtime = backbone_runtime(runtime, device, backbone)
        self.read = read
        self.identity = identity
        if self.runtime != "torch":
            if not isinstance(read, torch.nn.Module):
                raise ValueError(f"runtime '{runtime}' needs the reader as a torch module to export")
            precision = "int8" if self.runtime == "onnxruntime_int8" else "fp32"
            graph = reader_graph(read, identity, (4 * multiple, 4 * multiple), precision)
            self.read = OnnxReader(graph, self.threads)
            self.identity = f"{identity}|{self.runtime}"  # features differ slightly from torch's
        self.device = device
        self.batch_size = batch_size
        self.cache = cache if cache is not None else {}

    def grid(self, aspect: float) -> tuple[int, int]:
        return grid_for(self.size, aspect, self.multiple)

    def __call__(self, images: Sequence[np.ndarray], aspect: float,
                 keys: Sequence[str | None] | None = None, mirrored: bool = False) -> torch.Tensor:
        """(N, D, h, w) features of the images on the aspect's grid; `mirrored`: of their mirror
        images, flipped back (each patch where its content is in the image), made by flipping the
        resized batch, so no full-size copy of an image is made."""
        grid = self.grid(aspect)
        keys = list(keys) if keys is not None else [None] * len(images)
        out: list[torch.Tensor | None] = [
            self.cache.get((self.identity, grid, key)) if key is not None else None for key in keys]
        todo = [i for i, feat in enumerate(out) if feat is None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            batch = to_batch([images[i] for i in chunk], grid).to(self.device)
            with torch.inference_mode():
                feats = self.read(batch.flip(-1)).flip(-1) if mirrored else self.read(batch)
                feats = feats.float().cpu()
            for i, feat in zip(chunk, feats):
                out[i] = feat.clone()
                if keys[i] is not None:
                    self.cache[(self.identity, grid, keys[i])] = out[i]
        if not out:
            raise ValueError("no images to extract features from")
        return torch.stack(out)  # type: ignore[arg-type]


class TextureReader(torch.nn.Module):
    """PatchCore's features: each stage averaged over a pool x pool neighbourhood, the stride-16
    stage upsampled to the stride-8 grid, concatenated, and (if wider than max_dims) reduced by
    adaptive average pooling over channels, a fixed projection that needs no fitting. A module,
    so that the same reading runs in torch, in ONNX Runtime and inside an exported detector."""

    def __init__(self, backbone: torch.nn.Module, pool: int, max_dims: int | None) -> None:
        super().__init__()
        self.backbone, self.pool, self.max_dims = backbone, pool, max_dims

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        stages = self.backbone(batch)
        s8, s16 = stages["s8"], stages["s16"]
        if self.pool > 1:
            pool = self.pool
            s8 = F.avg_pool2d(s8, pool, stride=1, padding=pool // 2, count_include_pad=False)
            s16 = F.avg_pool2d(s16, pool, stride=1, padding=pool // 2, count_include_pad=False)
        s16 = F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)
        feats = torch.cat([s8, s16], dim=1)
        if self.max_dims is not None and feats.shape[1] > self.max_dims:
            b, c, h, w = feats.shape
            flat = feats.permute(0, 2, 3, 1).reshape(-1, 1, c)
            feats = F.adaptive_avg_pool1d(flat, self.max_dims).reshape(b, h, w, self.max_dims).permute(0, 3, 1, 2)
        return feats


class SemanticReader(torch.nn.Module):
    """ViT patch tokens of the chosen blocks after the final LayerNorm, each block L2-normalised
    and concatenated, so every block weighs the same in the cosine distance."""

    def __init__(self, backbone: torch.nn.Module, layers: Sequence[int]) -> None:
        super().__init__()
        self.backbone, self.layers = backbone, tuple(layers)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.backbone.forward_tokens(batch, self.layers, norm=True)
        return torch.cat([F.normalize(t, dim=1) for t in tokens], dim=1)


def texture_reader(backbone: torch.nn.Module, pool: int, max_dims: int | None) -> TextureReader:
    return TextureReader(backbone, pool, max_dims).eval()


def semantic_reader(backbone: torch.nn.Module, layers: Sequence[int]) -> SemanticReader:
    return SemanticReader(backbone, layers).eval()
