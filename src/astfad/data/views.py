"""Augmented views of normal images and where their content came from: rotations for the
references, small shifted and photometric views for normal statistics, selection and the adapter.
All views keep the image size, so they share its grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def rotate(image: np.ndarray, angle: float) -> np.ndarray:
    """The image rotated by `angle` degrees about its centre, same size, corners filled by edge
    colour so no black wedge appears that a test image would never show."""
    if angle % 360 == 0:
        return image
    if angle % 90 == 0 and image.shape[0] == image.shape[1]:
        return np.ascontiguousarray(np.rot90(image, k=int(angle // 90) % 4))
    pil = Image.fromarray(image)
    fill = tuple(int(v) for v in np.median(np.concatenate(
        [image[0], image[-1], image[:, 0], image[:, -1]]), axis=0))
    return np.asarray(pil.rotate(angle, resample=Image.BILINEAR, fillcolor=fill))


@dataclass(frozen=True)
class Source:
    """Where a fitted or validation image came from: the shot it was made from, the crop of that
    shot it shows (normalised y0, x0, y1, x1) and its rotation in degrees (PIL's, counter-clockwise).
    This is what lets every patch be kept away from its own content when normal data is scored."""

    shot: int
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    angle: float = 0.0

    def owners(self, grid: tuple[int, int], aspect: float, regions: bool) -> torch.Tensor:
        """(h, w) owner of each patch of a `grid` feature map: the shot, or with `regions` (a single
        shot) the quadrant of the shot its content comes from (see `REGIONS`)."""
        if not regions:
            return torch.full(grid, self.shot, dtype=torch.long)
        h, w = grid
        v = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        u = (torch.arange(w, dtype=torch.float64) + 0.5) / w
        y0, x0, y1, x1 = self.box
        ys = (y0 + v * (y1 - y0))[:, None].expand(h, w)
        xs = (x0 + u * (x1 - x0))[None, :].expand(h, w)
        if self.angle % 360:
            # undo the rotation about the centre, in pixel-proportional units
            theta = math.radians(self.angle)
            dx, dy = (xs - 0.5) * aspect, ys - 0.5
            xs = 0.5 + (dx * math.cos(theta) - dy * math.sin(theta)) / aspect
            ys = 0.5 + (dx * math.sin(theta) + dy * math.cos(theta))
        return ((ys >= 0.5).long() * 2 + (xs >= 0.5).long())


REGIONS = 4  # quadrants: a single shot's owners


def normal_view(image: np.ndarray, rng: np.random.Generator, max_crop: float = 0.08,
                jitter: float = 0.1) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A normal-looking view of a shot for normal statistics: a small shifted crop resized back and
    brightness/contrast/saturation jitter; no flips or rotations, which an aligned part never shows.
    Returns the view and its crop box (normalised y0, x0, y1, x1)."""
    h, w = image.shape[:2]
    crop = rng.uniform(0.02, max_crop)
    ch, cw = max(1, int(round(h * (1 - crop)))), max(1, int(round(w * (1 - crop))))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = np.asarray(Image.fromarray(np.ascontiguousarray(image[top:top + ch, left:left + cw]))
                     .resize((w, h), Image.BILINEAR)).astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - jitter, 1 + jitter) + mean * rng.uniform(1 - jitter, 1 + jitter)
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(1 - jitter, 1 + jitter)
    box = (top / h, left / w, (top + ch) / h, (left + cw) / w)
    return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8)), box


def view_to_source(feats: torch.Tensor, box: tuple[float, float, float, float],
                   grid: tuple[int, int]) -> torch.Tensor:
    """Sample a (D, H, W) feature map of the source image at the patch centres of a view made from
    its crop `box` on `grid`: the source feature each view patch shows (bilinear)."""
    h, w = grid
    y0, x0, y1, x1 = box
    ys = y0 + (torch.arange(h, dtype=torch.float32) + 0.5) / h * (y1 - y0)
    xs = x0 + (torch.arange(w, dtype=torch.float32) + 0.5) / w * (x1 - x0)
    gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
    points = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(feats[None], points, mode="bilinear", align_corners=False)[0]
