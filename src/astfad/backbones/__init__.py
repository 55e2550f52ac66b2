"""Frozen feature extractors and where their weights come from.

``load_backbone(name, weights=None, device="cpu")`` returns a frozen module with ``backbone_id`` and
``kind``: CNNs (``kind == "cnn"``) map RGB in [0, 1] to ``{"s8": ..., "s16": ...}`` (attributes
``stages`` and ``stage_channels``); ViTs (``kind == "vit"``) offer ``forward_tokens(x, layers, norm)``.
``BACKBONES`` lists the names; ``weights.py`` decides where weights come from.
"""

from .dinov2 import DinoV2ViT
from .efficientnet_lite import EfficientNetLite
from .registry import BACKBONES, available_offline, default_weights_file, default_weights_url, load_backbone
from .resnet import WideResNet50_2
from .weights import WeightsUnavailableError, cache_dir

__all__ = [
    "BACKBONES",
    "load_backbone",
    "available_offline",
    "default_weights_file",
    "default_weights_url",
    "WeightsUnavailableError",
    "cache_dir",
    "EfficientNetLite",
    "DinoV2ViT",
    "WideResNet50_2",
]
