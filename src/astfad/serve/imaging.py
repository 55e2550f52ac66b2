"""Uploaded bytes in, PNG bytes out: decoding with a pixel limit checked on the header alone (so a
decompression bomb is refused before any pixel is decoded), and the heat-map overlay and mask
pictures of a prediction. Uploads are decoded from memory and never written to disk here."""

from __future__ import annotations

import base64
import io
import re
import warnings

import numpy as np
from PIL import Image

from astfad.data.images import ImageLoadError, load_image
from astfad.serve.errors import TooLarge
from astfad.visualize import overlay

_UNSAFE = re.compile(r"[^\w.+ -]")


def display_name(filename: str | None, index: int) -> str:
    """The upload's base name, cleaned for messages and CSV rows (at most 100 characters)."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base)[:100]
    return base or f"image{index}"


def decode_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 RGB from an uploaded file; ImageLoadError (400) for anything unreadable,
    TooLarge (413) for more than `max_pixels` pixels, judged from the header before decoding."""
    if not data:
        raise ImageLoadError(f"cannot read image '{name}': empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise TooLarge(f"image '{name}' declares too many pixels to decode safely "
                           f"(limit {max_pixels:,})") from None
        except Exception:  # a decoder boundary: anything here means "not an image we can read"
            raise ImageLoadError(f"cannot read image '{name}': not a recognised image format") from None
    width, height = img.size
    if width * height > max_pixels:
        raise TooLarge(f"image '{name}' is {width}x{height} = {width * height:,} pixels; "
                       f"the limit is {max_pixels:,}")
    img.filename = name  # load_image names the file in its one-line errors
    return load_image(img)


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pictures(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray,
             vmin: float, vmax: float) -> dict[str, str]:
    """Base64 PNGs: the heat-map overlay and the mask (white where anomalous)."""
    return {"overlay_png": png_base64(overlay(image, anomaly_map, vmin, vmax)),
            "mask_png": png_base64(mask.astype(np.uint8) * 255)}
