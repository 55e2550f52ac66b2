"""Shared fixtures: tiny deterministic stand-in backbones with the real interfaces, so detector
logic is tested in seconds; the real backbones have their own tests and the end-to-end ones."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class FakeCNN(nn.Module):
    """Two fixed random convolution stages at strides 8 and 16."""

    kind = "cnn"
    backbone_id = "fake_cnn@test"
    stages = {"s8": 8, "s16": 16}
    stage_channels = {"s8": 12, "s16": 16}

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.c8 = nn.Conv2d(3, 12, 8, stride=8)
        self.c16 = nn.Conv2d(12, 16, 2, stride=2)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        s8 = torch.tanh(self.c8(x * 2 - 1))
        return {"s8": s8, "s16": torch.tanh(self.c16(s8))}


class FakeViT(nn.Module):
    """Patchify by 14 and project with fixed random matrices, one per 'block'."""

    kind = "vit"
    backbone_id = "fake_vit@test"
    patch_size = 14
    embed_dim = 24
    num_blocks = 12

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.proj = nn.Parameter(torch.randn(3 * 14 * 14, 24, generator=g) * 0.05, requires_grad=False)
        self.mix = nn.Parameter(torch.randn(12, 24, 24, generator=g) * 0.3, requires_grad=False)

    def forward_tokens(self, x: torch.Tensor, layers: Sequence[int], norm: bool = True):
        if x.shape[-1] % 14 or x.shape[-2] % 14:
            raise ValueError("input size must be a multiple of 14")
        b, _, h, w = x.shape
        patches = F.unfold(x, 14, stride=14).transpose(1, 2)  # B, L, 588
        t = patches @ self.proj
        outs = []
        for i in range(max(layers) + 1):
            t = t + torch.tanh(t @ self.mix[i])
            if i in layers:
                o = F.layer_norm(t, t.shape[-1:]) if norm else t
                outs.append(o.transpose(1, 2).reshape(b, -1, h // 14, w // 14))
        return outs, t.mean(1)


def fake_load_backbone(name: str, weights=None, device="cpu"):
    return (FakeViT() if "dino" in name else FakeCNN()).to(device)


@pytest.fixture
def fake_backbones(monkeypatch):
    """Route the detector's backbone loading to the fakes."""
    import astfad.detector

    monkeypatch.setattr(astfad.detector, "load_backbone", fake_load_backbone)


def make_part(rng: np.random.Generator, size: int = 112, defect: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A striped 'part' with jitter; a defect is a bright square. Returns image and mask."""
    yy, xx = np.mgrid[:size, :size]
    phase = rng.uniform(0, 0.3)  # aligned parts, small pose jitter
    base = 120 + 60 * np.sin(xx / 4.0 + phase)
    image = np.stack([base, base * 0.9, base * 0.8], axis=-1) + rng.normal(0, 4, (size, size, 3))
    mask = np.zeros((size, size), bool)
    if defect:
        y, x = rng.integers(10, size - 34, 2)
        mask[y:y + 24, x:x + 24] = True
        image[mask] = [250, 30, 30]
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture
def parts() -> dict[str, list]:
    """8 normal training parts, 4 normal and 4 defective test parts with masks."""
    rng = np.random.default_rng(0)
    train = [make_part(rng)[0] for _ in range(8)]
    good = [make_part(rng) for _ in range(4)]
    bad = [make_part(rng, defect=True) for _ in range(4)]
    return {"train": train, "test": [g[0] for g in good] + [b[0] for b in bad],
            "labels": [0] * 4 + [1] * 4, "masks": [g[1] for g in good] + [b[1] for b in bad]}


def read_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved model file's astfad metadata and tensors, unvalidated (to damage or edit them)."""
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["astfad"]), {k: handle.get_tensor(k) for k in handle.keys()}


def write_raw(path: Path, meta, tensors: dict[str, torch.Tensor], header: str | None = None) -> Path:
    """A model file from raw metadata (or a raw `header` string) and tensors, unvalidated."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"astfad": header if header is not None else json.dumps(meta)})
    return path
