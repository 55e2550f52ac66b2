"""Robust image IO: every image the library sees enters through `load_image` as HxWx3 uint8 RGB,
every mask through `load_mask` as a bool HxW map, and every model input through `to_batch`.

Decoding is strict on purpose: a truncated or unreadable file fails here, with its path in a
one-line message, rather than deep inside a benchmark as a silently grey image.
"""

from __future__ import annotations

import glob
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Image formats that are not read on purpose (animation, or no lossless single-frame guarantee):
# inside a folder they are reported, not silently skipped like other files.
UNSUPPORTED_IMAGE_EXTENSIONS = (".gif", ".webp", ".heic", ".heif", ".avif", ".jp2", ".svg", ".ico")
DEFAULT_MAX_PIXELS = 40_000_000

_LOSSY_FORMATS = {"JPEG", "MPO"}
_EXIF_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}  # orientations that transpose the image (h and w swap)
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageLoadError(ValueError):
    """An image or mask that cannot be used; the message is one line naming the file and why."""


class MaskError(ImageLoadError):
    """A mask that does not match its image pixel for pixel."""


def is_image_file(path: str | Path) -> bool:
    """True for a file name with one of `IMAGE_EXTENSIONS` (any case), skipping hidden files such
    as macOS `._name.png` resource forks, which carry an image extension but no image."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for a failed open or decode."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not a recognised image format"
    text = " ".join(str(exc).split())
    if "truncated" in text.lower():
        return "truncated file"
    return text or type(exc).__name__


def _open(path: Path) -> Image.Image:
    """Open a file lazily (header only), turning any failure into an ImageLoadError."""
    try:
        return Image.open(path)
    except Exception as exc:  # a decoder boundary: any failure means "cannot read this file"
        raise ImageLoadError(f"cannot read image '{path}': {_reason(exc)}") from exc


def _pixel_budget(size: tuple[int, int], max_pixels: int | None, downscale: bool,
                  source: str) -> tuple[int, int] | None:
    """(width, height) to score an image of `size` (w, h) at when it exceeds `max_pixels` and
    `downscale` is on, None when it fits; ImageLoadError when it exceeds and downscale is off."""
    w, h = size
    if max_pixels is None or w * h <= max_pixels:
        return None
    if not downscale:
        raise ImageLoadError(f"cannot read image {source}: {w}x{h} pixels ({w * h / 1e6:.3g} MP) is over "
                             f"the limit of {max_pixels / 1e6:.3g} MP; downscale it or raise the limit")
    scale = (max_pixels / (w * h)) ** 0.5
    height = max(1, int(h * scale))
    return max(1, min(int(w * scale), max_pixels // height)), height


def _downscaled(rgb: np.ndarray, max_pixels: int | None) -> np.ndarray:
    """An HxWx3 uint8 image shrunk (antialiased) to at most `max_pixels`, aspect kept."""
    target = _pixel_budget((rgb.shape[1], rgb.shape[0]), max_pixels, True, "")
    if target is None:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(target, Image.BILINEAR, reducing_gap=2.0))


def _decode(path: Path, max_pixels: int | None = None,
            downscale: bool = False) -> tuple[Image.Image, str | None]:
    """Fully decode a file with EXIF orientation applied, so truncation fails here; also returns
    the file format, which the decoded copy no longer carries. An image over `max_pixels` is
    refused from its header, before any pixel is decoded (or, with `downscale`, JPEGs are decoded
    at a reduced scale)."""
    img = _open(path)
    try:
        target = _pixel_budget(img.size, max_pixels, downscale, f"'{path}'")
    except ImageLoadError:
        img.close()
        raise
    try:
        if target is not None:
            img.draft(img.mode, target)  # JPEG decodes at 1/2, 1/4 or 1/8 scale; others ignore it
        img.load()
        return ImageOps.exif_transpose(img), img.format
    except Exception as exc:
        raise ImageLoadError(f"cannot read image '{path}': {_reason(exc)}") from exc
    finally:
        img.close()


def _png_significant_bits(path: Path) -> int | None:
    """Significant bits of a grey PNG from its sBIT chunk (e.g. 12 for 12-bit camera data stored
    in 16 bits), or None when the file does not say."""
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG_MAGIC:
            return None
        while header := fh.read(8):
            if len(header) < 8:
                return None
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"sBIT":
                bits = fh.read(1)
                return bits[0] if bits and 1 <= bits[0] <= 16 else None
            if kind in (b"IDAT", b"IEND"):
                return None
            fh.seek(length + 4, 1)  # chunk data + CRC
    return None


def _integer_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    """Scale unsigned integers of `bits` significant bits to 0..255 (rounded, not clipped)."""
    top = float((1 << bits) - 1)
    scaled = np.minimum(values.astype(np.float64), top) * (255.0 / top)
    return np.rint(scaled).astype(np.uint8)


def _float_to_uint8(values: np.ndarray, source: str) -> np.ndarray:
    """Map float data in 0..1 to 0..255. Other ranges are refused rather than stretched per image,
    which would change the brightness of one image relative to another."""
    if not np.isfinite(values).all():
        raise ImageLoadError(f"cannot read image {source}: float data contains NaN or infinity")
    lo, hi = float(values.min()), float(values.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ImageLoadError(f"cannot read image {source}: float values span [{lo:g}, {hi:g}], "
                             "expected 0..1; rescale to 0..1 first")
    return np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, source: str, bits: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB from a 2-D or HxWx{1,3,4} array of bool, uint8, uint16 or float (0..1).
    A fourth channel is alpha and is dropped; `bits` overrides the 16-bit range."""
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = array[..., :3]
    elif array.ndim != 2:
        raise ImageLoadError(f"cannot read image {source}: shape {array.shape} is not HxW or "
                             "HxWx{1,3,4}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"cannot read image {source}: empty image of shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = _integer_to_uint8(array, bits or 16)
    elif array.dtype.kind == "f":
        array = _float_to_uint8(array, source)
    elif array.dtype != np.uint8:
        raise ImageLoadError(f"cannot read image {source}: unsupported dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """The pixel array of a PIL image in a mode `_array_to_rgb` understands.

    Alpha is dropped, not composited: inspection images with an alpha channel are almost always
    fully opaque, and compositing would darken semi-transparent pixels in a way no camera does."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "LA":
        img = img.getchannel("L")
    elif mode not in ("L", "RGB", "RGBA", "RGBX", "F", "I") and not mode.startswith("I;16"):
        img = img.convert("RGB")  # CMYK, YCbCr, HSV, ...
    array = np.asarray(img)
    if mode == "I":  # 32-bit integers: Pillow's mode for some 16-bit files; other data is refused
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError("32-bit integer values outside 0..65535 are not supported")
        return array.astype(np.uint16)
    if array.dtype.byteorder == ">":  # I;16B and friends
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def load_image(src: str | Path | Image.Image | np.ndarray, max_pixels: int | None = None,
               downscale: bool = False) -> np.ndarray:
    """Load a file, PIL image or array as C-contiguous HxWx3 uint8 RGB.

    Grey, 1-bit, palette and CMYK images become RGB; alpha is dropped (see `_pil_to_array`);
    16-bit data is scaled by its bit range (16 bits, or a PNG's sBIT), never clipped; float data
    must lie in 0..1; EXIF orientation is applied. An image of more than `max_pixels` pixels is
    refused (a file: from its header, nothing decoded), or with `downscale` shrunk to fit: a
    bound on the memory of everything computed from it. Any failure raises ImageLoadError."""
    if isinstance(src, np.ndarray):
        _pixel_budget((src.shape[1], src.shape[0]) if src.ndim >= 2 else (0, 0), max_pixels, downscale, "array")
        return _downscaled(_array_to_rgb(src, "array"), max_pixels)
    if isinstance(src, Image.Image):
        source = f"'{src.filename}'" if getattr(src, "filename", "") else "PIL image"
        _pixel_budget(src.size, max_pixels, downscale, source)
        try:
            img = ImageOps.exif_transpose(src)
            return _downscaled(_array_to_rgb(_pil_to_array(img), source), max_pixels)
        except ImageLoadError:
            raise
        except Exception as exc:
            raise ImageLoadError(f"cannot read image {source}: {_reason(exc)}") from exc
    path = Path(src)
    img, _ = _decode(path, max_pixels, downscale)
    bits = _png_significant_bits(path) if img.mode.startswith("I") else None
    try:
        array = _pil_to_array(img)
    except Exception as exc:
        raise ImageLoadError(f"cannot read image '{path}': {_reason(exc)}") from exc
    return _downscaled(_array_to_rgb(array, f"'{path}'", bits), max_pixels)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file header alone, as `load_image` will return it (EXIF rotations
    that swap the sides are taken into account). Cheap: nothing is decoded."""
    path = Path(path)
    img = _open(path)
    try:
        w, h = img.size
        # PNG's getexif decodes the whole file when no eXIf chunk precedes the pixel data; the
        # writers in use put it first, so only that placement is honoured here.
        has_exif = img.format != "PNG" or "exif" in img.info
        orientation = img.getexif().get(_EXIF_ORIENTATION) if has_exif else None
    except Exception as exc:
        raise ImageLoadError(f"cannot read image '{path}': {_reason(exc)}") from exc
    finally:
        img.close()
    return (w, h) if orientation in _SWAPPED_ORIENTATIONS else (h, w)


def load_mask(path: str | Path, shape: tuple[int, int] | None = None,
              image_path: str | Path | None = None) -> np.ndarray:
    """A ground-truth mask as bool HxW, True where anomalous.

    Any nonzero pixel counts (0/255, 0/1, label-index, palette and RGB masks all work), except in
    lossy files (JPEG), where compression noise makes near-black pixels nonzero, so the threshold
    is half range there. With `shape`, a mask of another size raises MaskError: masks are never
    resized, since a mismatch usually means the wrong mask was paired with the image."""
    path = Path(path)
    img, file_format = _decode(path)
    lossy = file_format in _LOSSY_FORMATS
    try:
        array = _pil_to_array(img)
    except Exception as exc:
        raise ImageLoadError(f"cannot read image '{path}': {_reason(exc)}") from exc
    if array.ndim == 3:
        array = array[..., :3].max(axis=2)
    mask = array > 127 if lossy else array != 0
    if shape is not None and mask.shape != tuple(shape):
        image = f"image '{image_path}'" if image_path is not None else "its image"
        raise MaskError(f"mask '{path}' is {mask.shape[0]}x{mask.shape[1]} (HxW) but {image} is "
                        f"{shape[0]}x{shape[1]}; masks must match their image pixel for pixel")
    return np.ascontiguousarray(mask)


def _has_glob_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def image_file_problem(path: str | Path) -> str | None:
    """Why a path cannot be read as an image (one line naming it), or None when it is a regular
    file with a supported image extension. Nothing is opened: decoding problems come later."""
    path = Path(path)
    prefix = f"cannot read image '{path}'"
    if not path.exists():
        return f"{prefix}: dangling symbolic link" if path.is_symlink() else f"{prefix}: no such file"
    if path.is_dir():
        return f"{prefix}: is a directory"
    if not path.is_file():
        return f"{prefix}: not a regular file"
    suffix = path.suffix.lower()
    if suffix in UNSUPPORTED_IMAGE_EXTENSIONS:
        return (f"{prefix}: {suffix[1:].upper()} is not supported (convert it to one of "
                f"{', '.join(IMAGE_EXTENSIONS)})")
    if suffix not in IMAGE_EXTENSIONS:
        return f"'{path}' is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})"
    return None


def _looks_like_image(path: Path) -> bool:
    """A folder entry meant as an image: a supported or a known unsupported image extension."""
    name = path.name
    return not name.startswith(".") and Path(name).suffix.lower() in (*IMAGE_EXTENSIONS,
                                                                      *UNSUPPORTED_IMAGE_EXTENSIONS)


def _expand(spec: str | Path) -> tuple[list[tuple[Path, str | None]], Exception | None]:
    """The entries one spec names (a directory's, a glob's matches or a single file), each with
    None or the one-line reason it cannot be an image (a sub-folder or dangling link named like an
    image, a GIF; other files in a folder are not images and are left out), plus the spec's own
    error when it names no usable image (missing, empty, not an image)."""
    text = str(spec)
    looked_for = ", ".join(IMAGE_EXTENSIONS)

    def entries(candidates: list[Path]) -> list[tuple[Path, str | None]]:
        out = []
        for candidate in candidates:
            if candidate.is_file() and is_image_file(candidate):
                out.append((candidate, None))
            elif _looks_like_image(candidate):
                out.append((candidate, image_file_problem(candidate) or f"cannot read image '{candidate}'"))
        return out

    path = Path(text)
    if _has_glob_magic(text) and not path.exists():
        found = entries(sorted((Path(p) for p in glob.glob(text, recursive=True)), key=str))
    elif path.is_dir():
        found = entries(sorted(path.iterdir(), key=str))
    elif not path.exists() and not path.is_symlink():
        return [], FileNotFoundError(f"no such file or directory: '{path}'")
    else:
        problem = image_file_problem(path)
        return ([], ValueError(problem)) if problem else ([(path, None)], None)
    if not any(reason is None for _, reason in found):
        return found, ValueError(f"no images found in '{text}' (looked for {looked_for})")
    return found, None


def _specs(spec: str | Path | Sequence[str | Path]) -> list[str | Path]:
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise ValueError("no images given: the list of paths is empty")
    return specs


def list_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image paths from a directory (not recursive, sorted), a glob pattern (sorted; `**`
    recurses), a single image file, or a list of these (in list order, duplicates dropped).
    A spec that names no usable image raises; unusable entries of a folder are left out."""
    result: dict[Path, None] = {}
    for item in _specs(spec):
        found, error = _expand(item)
        if error is not None:
            raise error
        result.update(dict.fromkeys(path for path, reason in found if reason is None))
    return list(result)


def scan_images(spec: str | Path | Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """Like `list_images`, but nothing is dropped and nothing raises: every input comes back as
    (path, None) or (path, one-line reason it cannot be an image) in `list_images`' order, so that
    a batch can report each bad input, named or found in a folder, beside the good ones."""
    result: dict[Path, str | None] = {}
    for item in _specs(spec):
        found, error = _expand(item)
        if not found and error is not None:
            result.setdefault(Path(item), str(error))
        for path, reason in found:
            result.setdefault(path, reason)
    return list(result.items())


def write_atomically(path: str | Path, write: Callable[[Path], object], overwrite: bool = True,
                     sync: bool = False) -> Path:
    """Create `path` whole or not at all: `write(tmp)` fills a temporary file in the same folder,
    which is then renamed over `path` (so a crash or a full disk never leaves a truncated file
    under the final name). The file gets the usual permissions (0666 less the umask). `sync`
    flushes it to disk before the rename. overwrite=False refuses an existing `path`."""
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"'{path}' exists; choose another path or allow overwriting it")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # e.g. a full disk: name the file meant, not the temporary one
        if exc.errno is not None:  # a system error; one raised with a message keeps its message
            exc.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def to_batch(images: Sequence[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """Float32 Bx3xHxW in [0, 1], each image resized to `size` (H, W) by antialiased bilinear
    interpolation: the one resize path for model input, so every strategy sees the same pixels."""
    if len(images) == 0:
        raise ValueError("to_batch needs at least one image")
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"to_batch size must be positive (H, W), got {tuple(size)}")
    out = torch.empty((len(images), 3, h, w), dtype=torch.float32)
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"to_batch expects HxWx3 uint8 images (use load_image), image {i} "
                             f"is {image.dtype} with shape {image.shape}")
        tensor = torch.tensor(image).permute(2, 0, 1).float() / 255.0  # copies: views may be read-only
        if tensor.shape[1:] != (h, w):
            tensor = F.interpolate(tensor[None], size=(h, w), mode="bilinear", antialias=True,
                                   align_corners=False)[0]
        out[i] = tensor
    return out
