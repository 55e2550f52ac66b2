"""Augmented views of normal images: rotations for the references, random views for the adapter,
the normalisers and the validation set. All views keep the image size, so they share its grid."""

from __future__ import annotations

import numpy as np
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


def random_view(image: np.ndarray, rng: np.random.Generator, max_crop: float = 0.1,
                jitter: float = 0.1) -> np.ndarray:
    """One random normal-looking view: flip, right-angle rotation (square images), a small crop
    resized back, and brightness/contrast/saturation jitter."""
    h, w = image.shape[:2]
    out = image
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    if h == w:
        out = np.rot90(out, k=int(rng.integers(0, 4)))
    crop = rng.uniform(0.0, max_crop)
    if crop > 0.01:
        ch, cw = int(round(h * (1 - crop))), int(round(w * (1 - crop)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out = np.asarray(Image.fromarray(np.ascontiguousarray(out[top:top + ch, left:left + cw]))
                         .resize((w, h), Image.BILINEAR))
    out = out.astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(1 - jitter, 1 + jitter) + mean * rng.uniform(1 - jitter, 1 + jitter)
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(1 - jitter, 1 + jitter)
    return np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))
