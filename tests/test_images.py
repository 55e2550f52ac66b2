"""Image IO: every mode becomes HxWx3 uint8 RGB, failures name the file, masks are exact."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin

from astfad.data.images import (IMAGE_EXTENSIONS, ImageLoadError, MaskError, image_file_problem,
                                image_size, list_images, load_image, load_mask, scan_images, to_batch)


def _rgb(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check_rgb(out: np.ndarray, h: int, w: int) -> None:
    assert out.dtype == np.uint8 and out.shape == (h, w, 3) and out.flags["C_CONTIGUOUS"]


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    image = _rgb()
    Image.fromarray(image).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    _check_rgb(out, 6, 8)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), image)


def test_grey_and_bilevel(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(grey).save(tmp_path / "l.png")
    out = load_image(tmp_path / "l.png")
    _check_rgb(out, 6, 8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    bits = np.zeros((6, 8), dtype=bool)
    bits[2:4, 3:6] = True
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    out = load_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out[..., 0], bits.astype(np.uint8) * 255)


def test_palette(tmp_path: Path) -> None:
    img = Image.new("P", (4, 3), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 2), 1)
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    _check_rgb(out, 3, 4)
    assert tuple(out[2, 1]) == (200, 100, 50) and tuple(out[0, 0]) == (10, 20, 30)


def test_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    rgba = np.zeros((4, 5, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 150, 100)
    rgba[..., 3] = 64  # mostly transparent: compositing over black would darken it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert (out == np.array([200, 150, 100], dtype=np.uint8)).all()
    la = np.stack([np.full((4, 5), 77, np.uint8), np.zeros((4, 5), np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    assert (load_image(tmp_path / "la.png") == 77).all()


def test_16_bit_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896], [65535, 1000, 60000]], dtype=np.uint16)
    expected = np.rint(values / 257.0).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / "a.png")
    Image.fromarray(values).save(tmp_path / "a.tif")
    for name in ("a.png", "a.tif"):
        assert Image.open(tmp_path / name).mode == "I;16"
        np.testing.assert_array_equal(load_image(tmp_path / name)[..., 1], expected)
    big_endian = Image.frombytes("I;16B", (3, 2), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_image(big_endian)[..., 0], expected)
    np.testing.assert_array_equal(load_image(Image.fromarray(values).convert("I"))[..., 2],
                                  expected)
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I")
    with pytest.raises(ImageLoadError, match=r"outside 0\.\.65535"):
        load_image(wide)


def test_png_sbit_sets_the_bit_range(tmp_path: Path) -> None:
    values = np.array([[0, 4095, 2048]], dtype=np.uint16)  # 12-bit camera data in 16 bits
    info = PngImagePlugin.PngInfo()
    info.add(b"sBIT", bytes([12]))
    Image.fromarray(values).save(tmp_path / "a.png", pnginfo=info)
    out = load_image(tmp_path / "a.png")[0, :, 0]
    np.testing.assert_array_equal(out, np.rint(values[0] / 4095 * 255).astype(np.uint8))


def test_float_tiff(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values, "F").save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[0, :, 0], [0, 128, 255])
    Image.fromarray(values * 1000, "F").save(tmp_path / "big.tif")
    with pytest.raises(ImageLoadError, match=r"big\.tif.*expected 0\.\.1"):
        load_image(tmp_path / "big.tif")


def test_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(tmp_path / "c.tif")
    assert tuple(load_image(tmp_path / "c.tif")[0, 0]) == (255, 0, 255)


def test_exif_orientation_applied_and_reported_by_image_size(tmp_path: Path) -> None:
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[0, 0] = 255  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(image).save(tmp_path / "r.png", exif=exif)
    out = load_image(tmp_path / "r.png")
    assert out.shape == (6, 4, 3)
    assert out[0, -1].max() == 255  # top-left went to top-right
    assert image_size(tmp_path / "r.png") == (6, 4)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_names_the_file(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buf, fmt)
    path = tmp_path / f"broken.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert message == f"cannot read image '{path}': truncated file"
    assert "\n" not in message
    assert image_size(path) == (64, 64)  # the header alone is read, nothing decoded


def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nope\.png'.*no such file"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"junk\.png'.*not a recognised image format"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageLoadError, match=r"junk\.png"):
        image_size(tmp_path / "junk.png")
    with pytest.raises(ImageLoadError, match="no such file"):
        image_size(tmp_path / "nope.png")


def test_arrays() -> None:
    image = _rgb()
    np.testing.assert_array_equal(load_image(image), image)
    rgba = np.concatenate([image, np.zeros((6, 8, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba), image)
    _check_rgb(load_image(np.asfortranarray(image[:, :, 0])), 6, 8)
    assert load_image(image[..., :1])[..., 2].tolist() == image[..., 0].tolist()
    assert load_image(np.array([[True, False]]))[0, :, 1].tolist() == [255, 0]
    assert load_image(np.array([[0, 65535]], dtype=np.uint16))[0, :, 0].tolist() == [0, 255]
    assert load_image(np.array([[0.0, 1.0]]))[0, :, 0].tolist() == [0, 255]
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8),
                np.zeros((4, 4), np.int32), np.full((2, 2), np.nan), np.full((2, 2), 2.0),
                np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ImageLoadError):
            load_image(bad)


def test_image_size_is_height_width(tmp_path: Path) -> None:
    Image.fromarray(_rgb(7, 11)).save(tmp_path / "a.jpg")
    assert image_size(tmp_path / "a.jpg") == (7, 11)


def test_load_mask_variants(tmp_path: Path) -> None:
    truth = np.zeros((5, 7), dtype=bool)
    truth[1:3, 2:5] = True
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m255.png")
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "m01.png")
    rgb = np.zeros((5, 7, 3), dtype=np.uint8)
    rgb[truth] = (0, 0, 9)
    Image.fromarray(rgb).save(tmp_path / "mrgb.png")
    pal = Image.fromarray(truth.astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    pal.save(tmp_path / "mpal.png")
    for name in ("m255.png", "m01.png", "mrgb.png", "mpal.png"):
        mask = load_mask(tmp_path / name, shape=(5, 7))
        assert mask.dtype == np.bool_
        np.testing.assert_array_equal(mask, truth, err_msg=name)


def test_jpeg_mask_ignores_compression_noise(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    truth = (yy - 15.3) ** 2 + (xx - 17.1) ** 2 < 49  # a disc: edges off the 8x8 JPEG grid
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=50)
    noisy = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert (noisy[~truth] > 0).any()  # the premise: JPEG makes black pixels nonzero
    assert (load_mask(tmp_path / "m.jpg") == truth).mean() > 0.97


def test_mask_size_mismatch(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(MaskError) as info:
        load_mask(tmp_path / "m.png", shape=(6, 7), image_path=tmp_path / "img.png")
    message = str(info.value)
    assert f"'{tmp_path / 'm.png'}' is 5x7" in message
    assert f"'{tmp_path / 'img.png'}' is 6x7" in message
    assert isinstance(info.value, ImageLoadError)


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.PNG", "a.jpg", "c.tiff", "notes.txt", "._a.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.tiff"]
    assert [p.name for p in list_images(str(tmp_path / "*.jpg"))] == ["a.jpg"]
    assert [p.name for p in list_images(str(tmp_path / "**" / "*.png"))] == ["d.png"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    both = list_images([tmp_path / "sub", tmp_path / "a.jpg", str(tmp_path / "sub" / "*")])
    assert [p.name for p in both] == ["d.png", "a.jpg"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found in .*empty.*\.png, \.jpg"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images found"):
        list_images(str(tmp_path / "*.bmp"))
    with pytest.raises(ValueError, match="not an image file"):
        list_images(tmp_path / "notes.txt")
    assert ".tif" in IMAGE_EXTENSIONS


def test_to_batch_matches_the_reference_resize() -> None:
    a, b = _rgb(20, 30, seed=1), _rgb(8, 8, seed=2)
    batch = to_batch([a, b], (16, 12))
    assert batch.shape == (2, 3, 16, 12) and batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
    ref = F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255, size=(16, 12),
                        mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(batch[0], ref)
    same = to_batch([a], (20, 30))[0]
    torch.testing.assert_close(same, torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match="uint8"):
        to_batch([a.astype(np.float32)], (4, 4))
    with pytest.raises(ValueError, match="at least one"):
        to_batch([], (4, 4))


def test_scan_images_reports_every_bad_entry_in_order(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "b.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.gif")
    (tmp_path / "c.jpg").mkdir()
    (tmp_path / "d.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "notes.txt").write_text("not an image, not reported")
    (tmp_path / "._b.png").write_bytes(b"macOS resource fork, not reported")
    entries = scan_images([tmp_path, tmp_path / "b.png", tmp_path / "missing.png", str(tmp_path / "*.bmp")])
    names = [(p.name, reason is None) for p, reason in entries]
    assert names == [("a.gif", False), ("b.png", True), ("c.jpg", False), ("d.png", False),
                     ("missing.png", False), ("*.bmp", False)]
    reasons = [reason for _, reason in entries if reason]
    assert all("\n" not in r for r in reasons) and "no images found" in reasons[-1]
    assert image_file_problem(tmp_path / "b.png") is None
    assert "dangling symbolic link" in image_file_problem(tmp_path / "d.png")
    assert list_images(tmp_path) == [tmp_path / "b.png"]  # the strict listing skips them, as before


def test_max_pixels_for_arrays_and_pil_images() -> None:
    image = _rgb(300, 200)
    with pytest.raises(ImageLoadError, match=r"array: 200x300 pixels \(0\.06 MP\) is over the limit of 0\.01 MP"):
        load_image(image, max_pixels=10_000)
    small = load_image(Image.fromarray(image), max_pixels=10_000, downscale=True)
    assert small.shape[0] * small.shape[1] <= 10_000 and small.shape == (122, 81, 3)
    np.testing.assert_array_equal(load_image(image, max_pixels=60_000), image)
