"""Synthetic anomalies (exact masks, determinism, regions) and the generated dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from astfad.data.datasets import scan_mvtec
from astfad.data.images import load_image, load_mask
from astfad.data.synthetic import (ANOMALY_KINDS, SYNTHETIC_CATEGORIES, cutpaste,
                                   generate_synthetic_dataset, perlin_blend, perlin_noise,
                                   random_anomaly)


def _image(seed: int = 0, size: int = 96) -> np.ndarray:
    """A textured image, so shuffled or pasted pixels really differ from the original."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = (120 + 50 * np.sin(xx / 5.0)[..., None] * np.array([1.0, 0.6, 0.3])
            + 20 * np.cos(yy / 7.0)[..., None])
    return np.clip(base + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", sorted(ANOMALY_KINDS))
def test_anomaly_mask_is_exactly_the_changed_pixels(kind: str) -> None:
    image = _image()
    for seed in range(3):
        out, mask = ANOMALY_KINDS[kind](image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == np.bool_
        assert mask.any() and not mask.all()
        changed = np.any(out != image, axis=2)
        np.testing.assert_array_equal(changed, mask)  # changed inside, untouched outside
        again_out, again_mask = ANOMALY_KINDS[kind](image, np.random.default_rng(seed))
        np.testing.assert_array_equal(again_out, out)
        np.testing.assert_array_equal(again_mask, mask)
    assert (image == _image()).all()  # the input is never modified in place


@pytest.mark.parametrize("kind", sorted(ANOMALY_KINDS))
def test_anomaly_stays_in_region(kind: str) -> None:
    image = _image(1)
    region = np.zeros(image.shape[:2], dtype=bool)
    region[30:70, 20:60] = True
    out, mask = ANOMALY_KINDS[kind](image, 7, region=region)
    assert mask.any() and not (mask & ~region).any()
    np.testing.assert_array_equal(out[~region], image[~region])


def test_cutpaste_patch_area_and_scar_thinness() -> None:
    image = _image(size=128)
    areas = [cutpaste(image, s)[1].mean() for s in range(10)]
    assert max(areas) <= 0.15 and np.median(areas) > 0.01
    scale = 128 / 256  # scar sizes are given for 256 px images
    scars = [cutpaste(image, s, scar=True)[1].sum() for s in range(10)]
    assert max(scars) <= 25 * 16 * scale ** 2 * 1.1 < 0.01 * image[..., 0].size


def test_perlin_noise_and_foreign_texture() -> None:
    noise = perlin_noise((50, 70), (4, 8), 0)
    assert noise.shape == (50, 70) and -1.5 < noise.min() < 0 < noise.max() < 1.5
    np.testing.assert_array_equal(noise, perlin_noise((50, 70), (4, 8), 0))
    image = np.full((64, 64, 3), 100, dtype=np.uint8)
    texture = np.full((10, 10, 3), 250, dtype=np.uint8)
    out, mask = perlin_blend(image, 3, texture=texture)
    assert (out[mask] > 100).all() and (out[mask] < 250).all()  # a blend of the two, beta < 1


def test_random_anomaly() -> None:
    image = _image()
    _, mask, kind = random_anomaly(image, 5, kinds=["scratch", "blob"])
    assert kind in {"scratch", "blob"} and mask.any()
    assert random_anomaly(image, 5, kinds=["scratch", "blob"])[2] == kind
    kinds = {random_anomaly(image, s)[2] for s in range(30)}
    assert kinds == set(ANOMALY_KINDS)
    with pytest.raises(ValueError, match="unknown"):
        random_anomaly(image, 0, kinds=["smudge"])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        random_anomaly(image[..., 0], 0)


def test_generated_dataset_scans_cleanly(tmp_path: Path) -> None:
    root = generate_synthetic_dataset(tmp_path / "syn", n_train=3, n_test_good=2,
                                      n_test_per_defect=2, size=64)
    cats = {c.name: c for c in scan_mvtec(root)}
    assert list(cats) == sorted(SYNTHETIC_CATEGORIES)
    assert {"brick", "grass", "gravel", "washer", "screw"} <= set(cats)
    for cat in cats.values():
        assert cat.problems == []
        counts = cat.counts()
        assert counts["train"] == {"good": 3} and counts["test"]["good"] == 2
        assert 2 <= len(cat.defect_types) <= 3
        assert cat.mask_counts() == {t: 2 for t in cat.defect_types}
    normals = [load_image(s.path) for s in cats["brick"].train]
    assert not np.array_equal(normals[0], normals[1])  # normal images vary
    washer = cats["washer"]
    for sample in (s for s in washer.test if s.label):
        image = load_image(sample.path)
        mask = load_mask(sample.path.parent.parent.parent / "ground_truth" / sample.defect_type
                         / f"{sample.path.stem}_mask.png", shape=image.shape[:2])
        assert 0 < mask.mean() < 0.5
        background = image[:3, :3].mean()
        assert abs(background - 65) < 25  # the corners stay plain background: anomaly on object


def test_generator_reuses_and_refuses(tmp_path: Path) -> None:
    args = dict(categories=["washer"], n_train=1, n_test_good=0, n_test_per_defect=1, size=48)
    root = generate_synthetic_dataset(tmp_path / "syn", **args)
    marker = json.loads((root / "astfad_synthetic.json").read_text())
    assert marker["arguments"]["categories"] == ["washer"]
    stamp = (root / "washer" / "train" / "good" / "000.png").stat().st_mtime_ns
    assert generate_synthetic_dataset(tmp_path / "syn", **args) == root
    assert (root / "washer" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="other arguments"):
        generate_synthetic_dataset(tmp_path / "syn", **{**args, "seed": 1})
    user = tmp_path / "user"
    user.mkdir()
    (user / "precious.png").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic_dataset(user, **args)
    assert [p.name for p in user.iterdir()] == ["precious.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_synthetic_dataset(empty, **args) / "washer").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "syn", "user"]  # no leftovers
    with pytest.raises(ValueError, match="choose from"):
        generate_synthetic_dataset(tmp_path / "other", categories=["marble"])


def test_generator_is_deterministic(tmp_path: Path) -> None:
    args = dict(categories=["gravel", "screw"], n_train=2, n_test_good=0, n_test_per_defect=1,
                size=48, seed=4)
    a = generate_synthetic_dataset(tmp_path / "a", **args)
    b = generate_synthetic_dataset(tmp_path / "b", **{**args, "categories": ["screw"]})
    for rel in ("screw/train/good/001.png", "screw/ground_truth/scratch/000_mask.png"):
        np.testing.assert_array_equal(load_image(a / rel), load_image(b / rel))
