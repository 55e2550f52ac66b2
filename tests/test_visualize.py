"""Comparison panels share one colour scale; overlays and masks have the documented format."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from astfad.visualize import comparison_panel, overlay, save_mask


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)


def map_images(fig, first_map_column: int):
    """The heat-map image (the top one) of each map column."""
    return [ax.images[-1] for ax in fig.axes[first_map_column:-1]]


def test_panel_columns_and_shared_scale(tmp_path, image):
    rng = np.random.default_rng(1)
    maps = {"texture 2.31": rng.uniform(0, 1, (6, 9)), "semantic 0.40": rng.uniform(2, 5, (30, 45))}
    truth = np.zeros((60, 90), bool)
    truth[10:30, 20:50] = True
    path = tmp_path / "nested" / "panel.png"
    fig = comparison_panel(image, maps, truth=truth, title="bottle / broken_large", path=path)

    assert len(fig.axes) == 1 + 1 + 2 + 1  # image, truth, two maps, colourbar
    assert [ax.get_title() for ax in fig.axes[2:4]] == ["texture 2.31", "semantic 0.40"]
    assert fig.get_suptitle() == "bottle / broken_large"
    heat = map_images(fig, 2)
    assert all(im.get_array().shape == (60, 90) for im in heat)  # resized to the image
    norms = {(im.norm.vmin, im.norm.vmax) for im in heat}
    assert len(norms) == 1
    low, high = norms.pop()
    assert 0 <= low <= 1 and 2 <= high <= 5  # the scale spans all maps together
    colourbar_ax = fig.axes[-1]
    assert colourbar_ax.get_ylim() == pytest.approx((low, high))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]


def test_panel_given_scale_threshold_and_no_truth(image):
    maps = {"a": np.linspace(0, 1, 100).reshape(10, 10), "b": np.full((10, 10), 0.3)}
    fig = comparison_panel(image, maps, vmin=-1.0, vmax=2.0, threshold=0.5, subtitles={"a": "score 0.9"})
    assert len(fig.axes) == 1 + 2 + 1
    assert fig.axes[1].get_title() == "a\nscore 0.9" and fig.axes[2].get_title() == "b"
    assert all((im.norm.vmin, im.norm.vmax) == (-1.0, 2.0) for im in map_images(fig, 1))
    assert len(fig.axes[1].collections) == 1  # the threshold contour crosses map a
    assert len(fig.axes[2].collections) == 0  # map b never reaches it


def test_panel_needs_a_map(image):
    with pytest.raises(ValueError, match="at least one"):
        comparison_panel(image, {})


def test_overlay_shape_dtype_and_colours():
    grey = np.full((20, 30), 100, np.uint8)
    anomaly = np.zeros((5, 5))
    anomaly[:, 3:] = 10.0  # beyond vmax: clipped to the top colour
    out = overlay(grey, anomaly, vmin=0.0, vmax=4.0)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    low = np.round(0.5 * 100 + 0.5 * 255 * np.array(colormaps["jet"](0.0)[:3])).astype(np.uint8)
    high = np.round(0.5 * 100 + 0.5 * 255 * np.array(colormaps["jet"](1.0)[:3])).astype(np.uint8)
    assert np.array_equal(out[0, 0], low) and np.array_equal(out[0, -1], high)
    with pytest.raises(ValueError, match="vmax > vmin"):
        overlay(grey, anomaly, vmin=1.0, vmax=1.0)


def test_overlay_accepts_float_images():
    out = overlay(np.ones((8, 8, 3), np.float32), np.zeros((8, 8)), vmin=0.0, vmax=1.0)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("mask", [np.eye(4, dtype=bool), np.eye(4, dtype=np.uint8),
                                  np.eye(4, dtype=np.uint8) * 255])
def test_save_mask_writes_0_255(tmp_path, mask):
    path = tmp_path / "masks" / "m.png"
    save_mask(mask, path)
    with Image.open(path) as png:
        assert png.mode == "L"
        values = np.asarray(png)
    assert np.array_equal(values, np.eye(4, dtype=np.uint8) * 255)


def test_save_mask_refuses_soft_masks(tmp_path):
    with pytest.raises(ValueError, match="binary"):
        save_mask(np.full((4, 4), 0.4), tmp_path / "m.png")
