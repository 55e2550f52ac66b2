"""WideResNet-50-2 (the canonical PatchCore backbone) in plain PyTorch, torchvision checkpoint layout.

Keys: ``conv1``, ``bn1``, ``layer1..layer4`` of Bottlenecks (``conv1/bn1/conv2/bn2/conv3/bn3`` and
``downsample.0/1`` in the first block of each layer), ``fc``. Torchvision's "v1.5" Bottleneck puts the
stride on the 3x3 conv; the wide variant doubles the bottleneck width (``width_per_group = 128``).
ImageNet mean/std normalisation. Stages: ``s4`` = layer1 (256 ch), ``s8`` = layer2 (512), ``s16`` =
layer3 (1024), ``s32`` = layer4 (2048); layers after the deepest requested stage are not built.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WideResNet50_2"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYERS = (3, 4, 6, 3)
_STAGE_LAYER = {"s4": 1, "s8": 2, "s16": 3, "s32": 4}
_STAGE_STRIDE = {"s4": 4, "s8": 8, "s16": 16, "s32": 32}


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, width_factor: int):
        super().__init__()
        width = planes * width_factor
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        idt = x if self.downsample is None else self.downsample(x)
        return F.relu(y + idt, inplace=True)


class WideResNet50_2(nn.Module):
    """WideResNet-50-2 feature extractor (``kind == "cnn"``); forward returns ``{stage: tensor}``."""

    kind = "cnn"

    def __init__(self, stages: Sequence[str] = ("s8", "s16"), channels_last: bool = True, width_factor: int = 2):
        super().__init__()
        unknown = [s for s in stages if s not in _STAGE_LAYER]
        if unknown or not stages:
            raise ValueError(f"stages must be a non-empty subset of {list(_STAGE_LAYER)}, got {list(stages)}")
        ordered = sorted(stages, key=_STAGE_LAYER.__getitem__)
        self.stage_layers = {s: _STAGE_LAYER[s] for s in ordered}
        self.stages: dict[str, int] = {s: _STAGE_STRIDE[s] for s in ordered}
        self.stage_channels: dict[str, int] = {s: 64 * 2 ** (_STAGE_LAYER[s] - 1) * 4 for s in ordered}
        self.n_layers = max(self.stage_layers.values())
        self.channels_last = channels_last

        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for li in range(self.n_layers):
            planes = 64 * 2**li
            blocks = []
            for bi in range(_LAYERS[li]):
                stride = 2 if (li > 0 and bi == 0) else 1
                blocks.append(_Bottleneck(cin, planes, stride, width_factor))
                cin = planes * _Bottleneck.expansion
            setattr(self, f"layer{li + 1}", nn.Sequential(*blocks))
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if channels_last:  # measured faster on CPU (oneDNN); load_state_dict's copy_ keeps the layout
            self.to(memory_format=torch.channels_last)

    def ignored_checkpoint_key(self, key: str) -> bool:
        """Checkpoint keys of the layers not built (e.g. layer4) and of the classifier ``fc``."""
        if key.startswith("fc."):
            return True
        if key.startswith("layer"):
            return int(key[5]) > self.n_layers
        return False

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W RGB in [0, 1], got shape {tuple(x.shape)}")
        with torch.no_grad():
            x = (x.float() - self._mean) / self._std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            x = F.relu(self.bn1(self.conv1(x)), inplace=True)
            x = F.max_pool2d(x, 3, 2, 1)
            want = {li: s for s, li in self.stage_layers.items()}
            out: dict[str, Tensor] = {}
            for li in range(1, self.n_layers + 1):
                x = getattr(self, f"layer{li}")(x)
                if li in want:
                    out[want[li]] = x.contiguous()
            return {s: out[s] for s in self.stage_layers}
