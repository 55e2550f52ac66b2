"""The one scoring protocol every strategy shares: patch map -> evaluation grid (bilinear) ->
Gaussian blur -> image score -> the map at each image's own size."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps, truncated at 4 sigma, reflect padding."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(4 * sigma)))
    radius = min(radius, min(maps.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


def to_eval_grid(patch_maps: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch distances -> (B, H, W) smoothed maps on the evaluation grid."""
    up = F.interpolate(patch_maps.unsqueeze(1).float(), size=grid, mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


def image_scores(maps: torch.Tensor, rule: str = "top1", border: int = 0) -> torch.Tensor:
    """(B,) image scores from (B, H, W) maps: `top1` = mean of the top 1% pixels (robust to a
    single hot pixel, still sensitive to small defects), `max` = the largest pixel; `border`
    pixels on every edge are left out (at most what leaves the middle third of each side): the
    outermost patches light up on good parts, where the frame cuts the part and the ViT's tokens
    meet the image's edge."""
    if border > 0:
        h, w = maps.shape[-2:]
        by, bx = min(border, h // 3), min(border, w // 3)
        maps = maps[:, by:h - by, bx:w - bx]
    flat = maps.flatten(1)
    if rule == "max":
        return flat.max(dim=1).values
    if rule == "top1":
        k = max(1, int(round(int(flat.shape[1]) * 0.01)))  # int(): a traced graph keeps k fixed
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"image score rule '{rule}' is not computed from maps")


def mask_to_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to the evaluation grid (bilinear, kept where over half covered), so
    ground truth and maps are compared on the same grid."""
    resized = F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=grid,
                            mode="bilinear", align_corners=False)[0, 0]
    return resized.numpy() > 0.5


def to_image_size(eval_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """One (H, W) evaluation-grid map resized bilinearly to an image's (height, width)."""
    return F.interpolate(eval_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
