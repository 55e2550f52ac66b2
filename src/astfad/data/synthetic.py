"""Synthetic anomalies with exact masks, and a small generated dataset in MVTec AD layout.

The anomalies serve the selection system (a validation set built from the shots alone) and the
tests; the generated dataset lets the whole pipeline run end to end without downloads. Every
function is deterministic given its `np.random.Generator` (or seed).

Each anomaly returns (altered image, mask) where the mask is exactly the set of pixels whose value
changed: it is computed from the output, so a blend that rounds back to the original value in
some pixel leaves that pixel out. `region` (bool HxW) confines an anomaly to part of the image,
e.g. the object of an object category.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Anomaly = Callable[..., tuple[np.ndarray, np.ndarray]]

_MAX_TRIES = 50
_MARKER = "astfad_synthetic.json"
_FORMAT_VERSION = 1  # bump whenever the generator's output changes, so old folders are not reused


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_inputs(image: np.ndarray, region: np.ndarray | None) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image {image.shape[:2]} is too small for a synthetic anomaly")
    if region is not None and (region.shape != image.shape[:2] or not region.any()):
        raise ValueError("region must be a bool HxW map of the image with at least one True pixel")


def _place(image: np.ndarray, rng: np.random.Generator, region: np.ndarray | None,
           draw: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Draw anomalies until one changes some pixels (inside `region`) but not all of them; the
    mask is the set of changed pixels."""
    _check_inputs(image, region)
    for _ in range(_MAX_TRIES):
        out = draw()
        if region is not None:
            out = np.where(region[..., None], out, image)
        mask = np.any(out != image, axis=2)
        if mask.any() and not mask.all():
            return np.ascontiguousarray(out), mask
    raise RuntimeError(f"no visible anomaly after {_MAX_TRIES} tries: the region is too small or "
                       "the image too uniform")


def _centre(rng: np.random.Generator, shape: tuple[int, int],
            region: np.ndarray | None) -> tuple[int, int]:
    """A random pixel (y, x), inside `region` when given."""
    if region is None:
        return int(rng.integers(shape[0])), int(rng.integers(shape[1]))
    index = rng.choice(np.flatnonzero(region))
    return int(index // shape[1]), int(index % shape[1])


def _jitter(pixels: np.ndarray, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """Colour jitter: per-channel gain and a common brightness offset."""
    gain = rng.uniform(1 - strength, 1 + strength, size=3)
    offset = rng.uniform(-strength, strength) * 128
    return np.clip(pixels.astype(np.float32) * gain + offset, 0, 255)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def cutpaste(image: np.ndarray, rng: np.random.Generator | int, scar: bool = False,
             region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a colour-jittered patch of the image pasted elsewhere. Patch: a rectangle of 2-15%
    of the area with aspect 0.3-3.3; scar: a thin long strip (2-16 by 10-25 px at 256 px, scaled
    with the image) rotated by up to 45 degrees."""
    rng = _as_rng(rng)
    h, w = image.shape[:2]
    scale = min(h, w) / 256

    def draw() -> np.ndarray:
        if scar:
            ph = min(h - 2, max(2, round(rng.uniform(10, 25) * scale)))
            pw = min(w - 2, max(2, round(rng.uniform(2, 16) * scale)))
        else:
            area = rng.uniform(0.02, 0.15) * h * w
            aspect = np.exp(rng.uniform(np.log(0.3), np.log(3.3)))
            ph = int(np.clip(round(np.sqrt(area / aspect)), 2, h - 2))
            pw = int(np.clip(round(np.sqrt(area * aspect)), 2, w - 2))
        sy, sx = int(rng.integers(h - ph + 1)), int(rng.integers(w - pw + 1))
        patch = _to_uint8(_jitter(image[sy:sy + ph, sx:sx + pw], rng))
        keep = np.ones((ph, pw), dtype=bool)
        if scar:
            angle = rng.uniform(-45, 45)
            patch = np.asarray(Image.fromarray(patch).rotate(angle, Image.BILINEAR, expand=True))
            keep = np.asarray(Image.fromarray(keep).rotate(angle, Image.NEAREST, expand=True))
            ph, pw = keep.shape
        cy, cx = _centre(rng, (h, w), region)
        ty = int(np.clip(cy - ph // 2, 0, h - ph))
        tx = int(np.clip(cx - pw // 2, 0, w - pw))
        out = image.copy()
        target = out[ty:ty + ph, tx:tx + pw]
        target[keep] = patch[keep]
        return out

    return _place(image, rng, region, draw)


def cutpaste_scar(image: np.ndarray, rng: np.random.Generator | int,
                  region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste scar: a thin rotated strip (see `cutpaste`)."""
    return cutpaste(image, rng, scar=True, region=region)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int],
                 rng: np.random.Generator | int) -> np.ndarray:
    """2-D gradient (Perlin) noise of `shape` with `res` cells per axis, values about in [-1, 1];
    vectorised, any shape (the lattice need not divide it)."""
    rng = _as_rng(rng)
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    ys, xs = np.arange(h) * (ry / h), np.arange(w) * (rx / w)
    iy, ix = ys.astype(int), xs.astype(int)
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[(iy + dy)[:, None], (ix + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return np.sqrt(2) * (top * (1 - u) + bottom * u)


def _shuffled_self(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image cut into a 4x4 grid of blocks, shuffled and colour-jittered: a foreign-looking
    texture made from the image's own statistics (DRAEM uses DTD textures instead)."""
    h, w = image.shape[:2]
    bh, bw = h // 4, w // 4
    out = image.copy()
    blocks = [image[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] for i in range(4) for j in range(4)]
    for k, src in enumerate(rng.permutation(16)):
        i, j = divmod(k, 4)
        out[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = blocks[src]
    return _jitter(out, rng, strength=0.3)


def perlin_blend(image: np.ndarray, rng: np.random.Generator | int,
                 texture: np.ndarray | None = None,
                 region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style anomaly: Perlin noise (2^0..2^5 cells per axis) thresholded at 0.5 gives the
    shape, and `texture` (resized to the image; by default a shuffled, jittered copy of the image)
    is blended in as `beta * image + (1 - beta) * texture`, beta in [0.1, 0.8). DRAEM draws beta in
    [0, 0.8): weights nearer 1 leave the anomaly invisible and its changed pixels a speckle."""
    rng = _as_rng(rng)
    h, w = image.shape[:2]
    if texture is not None:
        texture = np.asarray(Image.fromarray(texture).convert("RGB").resize((w, h),
                                                                            Image.BILINEAR))

    def draw() -> np.ndarray:
        res = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))
        shape = perlin_noise((h, w), res, rng) > 0.5
        foreign = _shuffled_self(image, rng) if texture is None else texture.astype(np.float32)
        beta = rng.uniform(0.1, 0.8)
        blended = beta * image + (1 - beta) * foreign
        return np.where(shape[..., None], _to_uint8(blended), image)

    return _place(image, rng, region, draw)


def scratch(image: np.ndarray, rng: np.random.Generator | int,
            region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-3 thin curved scratches (quadratic Bezier polylines, 1-3 px wide at 256 px), all dark or
    all bright."""
    rng = _as_rng(rng)
    h, w = image.shape[:2]
    side = min(h, w)

    def draw() -> np.ndarray:
        layer = Image.new("L", (w, h), 0)
        pen = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = _centre(rng, (h, w), region)
            length = rng.uniform(0.15, 0.5) * side
            theta = rng.uniform(0, 2 * np.pi)
            start = np.array([x0, y0], dtype=float)
            end = start + length * np.array([np.cos(theta), np.sin(theta)])
            bend = rng.uniform(-0.3, 0.3) * length * np.array([-np.sin(theta), np.cos(theta)])
            control = (start + end) / 2 + bend
            t = np.linspace(0, 1, 24)[:, None]
            points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t ** 2 * end
            width = max(1, round(rng.uniform(1, 3.5) * side / 256))
            pen.line([tuple(p) for p in points], fill=255, width=width, joint="curve")
        alpha = np.asarray(layer, dtype=np.float32)[..., None] / 255 * rng.uniform(0.7, 1.0)
        value = rng.uniform(0, 50) if rng.random() < 0.5 else rng.uniform(205, 255)
        return _to_uint8(image * (1 - alpha) + value * alpha)

    return _place(image, rng, region, draw)


def blob(image: np.ndarray, rng: np.random.Generator | int,
         region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """1-3 smooth elliptical blobs (stain, discolouration, dent-like shading) that either pull the
    colour towards a random colour or scale the brightness, fading out at their rim."""
    rng = _as_rng(rng)
    h, w = image.shape[:2]
    side = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def draw() -> np.ndarray:
        weight = np.zeros((h, w), dtype=np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = _centre(rng, (h, w), region)
            ry, rx = rng.uniform(0.04, 0.15, size=2) * side
            phi = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * np.cos(phi) + dy * np.sin(phi)) / rx
            v = (-dx * np.sin(phi) + dy * np.cos(phi)) / ry
            t = np.clip((1 - np.sqrt(u * u + v * v)) / 0.4, 0, 1)  # rim: outer 40% of the radius
            weight = np.maximum(weight, t * t * (3 - 2 * t))
        weight = weight[..., None]
        if rng.random() < 0.5:
            colour = rng.uniform(0, 255, size=3)
            out = image + weight * rng.uniform(0.4, 0.9) * (colour - image)
        else:
            factor = rng.uniform(0.4, 0.7) if rng.random() < 0.5 else rng.uniform(1.3, 1.8)
            out = image * (1 + weight * (factor - 1))
        return _to_uint8(out)

    return _place(image, rng, region, draw)


ANOMALY_KINDS: dict[str, Anomaly] = {
    "cutpaste": cutpaste,
    "scar": cutpaste_scar,
    "perlin": perlin_blend,
    "scratch": scratch,
    "blob": blob,
}


def random_anomaly(image: np.ndarray, rng: np.random.Generator | int,
                   kinds: Sequence[str] | None = None,
                   region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """An anomaly of a kind drawn uniformly from `kinds` (default: all of `ANOMALY_KINDS`);
    returns (image, mask, kind)."""
    rng = _as_rng(rng)
    names = list(kinds) if kinds is not None else list(ANOMALY_KINDS)
    unknown = [k for k in names if k not in ANOMALY_KINDS]
    if not names or unknown:
        raise ValueError(f"unknown or no anomaly kinds {unknown or names}; choose from "
                         f"{', '.join(ANOMALY_KINDS)}")
    name = names[int(rng.integers(len(names)))]
    out, mask = ANOMALY_KINDS[name](image, rng, region=region)
    return out, mask, name


# ---- generated dataset -------------------------------------------------------------------------

_TEXTURES = {  # skimage sample -> RGB tint of the grey sample
    "brick": (1.0, 0.72, 0.58),
    "grass": (0.62, 0.95, 0.5),
    "gravel": (0.95, 0.92, 0.86),
}
_DEFECTS = {
    "brick": ("perlin", "scratch", "cutpaste"),
    "grass": ("blob", "scar"),
    "gravel": ("blob", "scratch"),
    "washer": ("scratch", "blob", "cutpaste"),
    "screw": ("scratch", "blob"),
}
SYNTHETIC_CATEGORIES: tuple[str, ...] = tuple(_DEFECTS)


def _texture_sample(name: str, size: int) -> np.ndarray:
    """The grey scikit-image sample of a texture category, enlarged when needed so that a crop of
    `size` covers at most 3/4 of it (crops must differ for normal images to vary)."""
    from skimage import data as skdata  # imported here: only the generator needs the samples

    sample = getattr(skdata, name)()
    side = max(sample.shape[0], round(size * 4 / 3))
    if side != sample.shape[0]:
        sample = np.asarray(Image.fromarray(sample).resize((side, side), Image.BICUBIC))
    return sample


def _texture(sample: np.ndarray, tint: Sequence[float], size: int,
             rng: np.random.Generator) -> np.ndarray:
    """A random crop of the sample with flips and a small brightness change, tinted to RGB."""
    top, left = (int(v) for v in rng.integers(0, sample.shape[0] - size + 1, size=2))
    crop = sample[top:top + size, left:left + size].astype(np.float32)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    crop = crop * rng.uniform(0.93, 1.07)
    return _to_uint8(crop[..., None] * np.asarray(tint, dtype=np.float32))


def _compose(background: float, metal: np.ndarray, coverage: np.ndarray, size: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Object over a plain background with a lighting gradient and sensor noise; the region for
    anomalies is the set of pixels fully covered by the object."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tilt = rng.uniform(-12, 12, size=2)
    grey = background + tilt[0] * (yy - 0.5) + tilt[1] * (xx - 0.5)
    grey = grey * (1 - coverage) + metal * coverage
    grey = grey * rng.uniform(0.92, 1.08) + rng.normal(0, 2.0, size=grey.shape)
    tint = np.array([1.0, 0.98, 0.94], dtype=np.float32)
    return _to_uint8(grey[..., None] * tint), coverage >= 1.0


def _washer(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A metal ring (washer) with brushed, directionally lit shading and a small random pose."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = (size / 2 + rng.uniform(-0.05, 0.05, size=2) * size)
    r_out = rng.uniform(0.30, 0.34) * size
    r_in = r_out * rng.uniform(0.42, 0.48)
    r = np.hypot(yy - cy, xx - cx)
    coverage = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    theta = np.arctan2(yy - cy, xx - cx)
    radial = np.clip((r - r_in) / (r_out - r_in), 0, 1)
    metal = (165 + 35 * np.cos(theta - rng.uniform(0, 2 * np.pi))
             + 18 * np.sin(np.pi * radial) + 4 * np.sin(r * 1.7))
    return _compose(rng.uniform(55, 75), metal, coverage, size, rng)


def _screw(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A screw-like bar: a threaded, cylinder-shaded shaft with a pointed tip and a wider head, at
    a small random angle and offset."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.uniform(-0.04, 0.04, size=2) * size
    phi = np.deg2rad(rng.uniform(-15, 15))
    u = (xx - cx) * np.cos(phi) + (yy - cy) * np.sin(phi)
    v = -(xx - cx) * np.sin(phi) + (yy - cy) * np.cos(phi)
    half_len, head_len = 0.3 * size, 0.09 * size
    shaft_w, head_w = 0.045 * size, 0.095 * size
    tip = np.clip((half_len - u) / (0.12 * size), 0, 1)  # tapers over the last 12%
    width = shaft_w * np.sqrt(tip)
    shaft = np.clip(width - np.abs(v) + 0.5, 0, 1) * np.clip(half_len - u + 0.5, 0, 1) \
        * np.clip(u + half_len - head_len + 0.5, 0, 1)
    head = np.clip(head_w - np.abs(v) + 0.5, 0, 1) * np.clip(u + half_len + 0.5, 0, 1) \
        * np.clip(-half_len + head_len - u + 0.5, 0, 1)
    coverage = np.maximum(shaft, head)
    pitch = 0.028 * size
    cylinder = np.sqrt(np.clip(1 - (v / np.maximum(width, 1e-3)) ** 2, 0, 1))
    threads = 22 * np.sin(2 * np.pi * (u + 0.35 * v) / pitch)
    shaft_shade = 70 + 90 * cylinder + threads
    head_shade = 90 + 70 * np.sqrt(np.clip(1 - (v / head_w) ** 2, 0, 1))
    metal = np.where(head > shaft, head_shade, shaft_shade)
    return _compose(rng.uniform(195, 215), metal, coverage, size, rng)


def _normal_images(category: str, size: int, rng: np.random.Generator
                   ) -> Callable[[], tuple[np.ndarray, np.ndarray | None]]:
    """A maker of normal images of a category, each with the region anomalies may touch (None:
    anywhere)."""
    if category in _TEXTURES:
        sample = _texture_sample(category, size)
        return lambda: (_texture(sample, _TEXTURES[category], size, rng), None)
    draw = _washer if category == "washer" else _screw
    return lambda: draw(size, rng)


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def _write_category(folder: Path, category: str, n_train: int, n_test_good: int,
                    n_test_per_defect: int, size: int, seed: int) -> None:
    # Seeded by name, so a category's images do not depend on which other categories are made.
    rng = np.random.default_rng([seed, zlib.crc32(category.encode())])
    normal = _normal_images(category, size, rng)
    for i in range(n_train):
        _save_png(normal()[0], folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save_png(normal()[0], folder / "test" / "good" / f"{i:03d}.png")
    for kind in _DEFECTS[category]:
        for i in range(n_test_per_defect):
            image, region = normal()
            altered, mask = ANOMALY_KINDS[kind](image, rng, region=region)
            _save_png(altered, folder / "test" / kind / f"{i:03d}.png")
            _save_png(mask.astype(np.uint8) * 255,
                      folder / "ground_truth" / kind / f"{i:03d}_mask.png")


def generate_synthetic_dataset(root: str | Path, categories: Sequence[str] | None = None,
                               n_train: int = 16, n_test_good: int = 6,
                               n_test_per_defect: int = 4, size: int = 256,
                               seed: int = 0) -> Path:
    """Write a small MVTec AD-layout dataset of texture (brick, grass, gravel: crops of the
    scikit-image samples) and object (washer, screw: procedural) categories, 2-3 synthetic defect
    types each with exact 0/255 masks; returns `root`.

    Safe to call repeatedly: an `astfad_synthetic.json` marker records the arguments, and a folder
    made with the same ones is reused as is. A folder made with other arguments, or any other
    non-empty folder, is refused, never overwritten. The data is written to a temporary sibling
    and renamed into place, so an interrupted run leaves no half-written dataset behind."""
    names = list(SYNTHETIC_CATEGORIES if categories is None else dict.fromkeys(categories))
    unknown = [c for c in names if c not in _DEFECTS]
    if not names or unknown:
        raise ValueError(f"unknown or no synthetic categories {unknown or names}; choose from "
                         f"{', '.join(SYNTHETIC_CATEGORIES)}")
    if n_train < 1 or n_test_good < 0 or n_test_per_defect < 0 or size < 32:
        raise ValueError("need n_train >= 1, n_test_good >= 0, n_test_per_defect >= 0 and "
                         f"size >= 32; got {n_train}, {n_test_good}, {n_test_per_defect}, {size}")
    marker = {"generator": "astfad.data.synthetic", "format": _FORMAT_VERSION,
              "arguments": {"categories": names, "n_train": n_train, "n_test_good": n_test_good,
                            "n_test_per_defect": n_test_per_defect, "size": size, "seed": seed}}
    root = Path(root)
    if root.exists():
        if not root.is_dir():
            raise FileExistsError(f"cannot generate a dataset at '{root}': it is a file")
        marker_path = root / _MARKER
        if marker_path.is_file():
            try:
                found = json.loads(marker_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FileExistsError(f"'{root}' has an unreadable {_MARKER}; pass another "
                                      "folder or delete this one") from exc
            if found == marker:
                return root
            made_with = found.get("arguments") if isinstance(found, dict) else found
            raise FileExistsError(f"'{root}' holds a synthetic dataset made with other arguments "
                                  f"({made_with}); pass another folder or delete it")
        if any(root.iterdir()):
            raise FileExistsError(f"refusing to write into '{root}': the folder is not empty and "
                                  f"is not an astfad synthetic dataset (no {_MARKER})")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        for name in names:
            _write_category(staging / name, name, n_train, n_test_good, n_test_per_defect,
                            size, seed)
        (staging / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if root.exists():
            root.rmdir()  # checked empty above; rmdir refuses if anything appeared since
        staging.rename(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
