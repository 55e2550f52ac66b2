"""Tests of astfad.metrics against scikit-learn and a slow, obvious AUPRO reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from astfad import metrics as M


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def reference_aupro(masks, maps, limit=0.3, thresholds=None):
    """Loop over thresholds; binary prediction, FPR, per-region overlap; cut; trapezoid; / limit."""
    masks = [np.asarray(m) != 0 for m in masks]
    maps = [np.asarray(a, dtype=np.float64) for a in maps]
    if thresholds is None:
        thresholds = np.unique(np.concatenate([a.ravel() for a in maps]))
    regions = []
    for i, m in enumerate(masks):
        labelled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, n + 1)]
    n_normal = sum(int((~m).sum()) for m in masks)
    xs, ys = [0.0], [0.0]
    for t in sorted(thresholds, reverse=True):
        predicted = [a >= t for a in maps]
        fp = sum(int((p & ~m).sum()) for p, m in zip(predicted, masks))
        xs.append(fp / n_normal)
        ys.append(float(np.mean([predicted[i][r].mean() for i, r in regions])))
    xs.append(1.0)
    ys.append(1.0)
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            if x0 < limit:
                y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
                area += (limit - x0) * (y0 + y_limit) / 2
            break
    return area / limit


def blob_case(seed, n=4, size=12, ties=False, normal_images=1):
    """Random blob masks (smoothed noise above a threshold) and noisy maps brighter on the blobs."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(n):
        if i < normal_images:
            masks.append(np.zeros((size, size), bool))
        else:
            field = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.2)
            masks.append(field > np.quantile(field, 0.8))
    masks = np.stack(masks)
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if ties:
        maps = np.round(maps * 6) / 6
    return masks, maps.astype(np.float32)


def f1_reference(labels, scores):
    p, r, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return f1.max()


# ----------------------------------------------------------------------------------------------
# Agreement with scikit-learn
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    labels[:2] = [True, False]
    scores = rng.random(60) + 0.5 * labels
    if ties:
        scores = np.round(scores * 4) / 4
    assert M.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    expected_ap = average_precision_score(labels, scores)
    assert M.average_precision(labels, scores) == pytest.approx(expected_ap, abs=1e-12)
    assert M.f1_max(labels, scores) == pytest.approx(f1_reference(labels, scores), abs=1e-12)
    # plain lists work too
    as_lists = M.image_auroc(labels.astype(int).tolist(), scores.tolist())
    assert as_lists == pytest.approx(roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_pixel_metrics_match_sklearn(seed, ties):
    masks, maps = blob_case(seed, n=5, size=16, ties=ties)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert M.pixel_average_precision(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-10)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(f1_reference(y, s), abs=1e-10)


def test_pixel_metrics_accept_lists_of_different_sizes():
    rng = np.random.default_rng(3)
    shapes = [(10, 14), (7, 7), (20, 9)]
    masks = [rng.random(sh) < 0.2 for sh in shapes]
    maps = [rng.random(sh) + 0.3 * m for sh, m in zip(shapes, masks)]
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.pixel_average_precision(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(f1_reference(y, s), abs=1e-12)
    assert M.aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-9)


def test_uint8_255_masks_are_accepted():
    masks, maps = blob_case(1)
    assert M.pixel_auroc(masks.astype(np.uint8) * 255, maps) == M.pixel_auroc(masks, maps)
    assert M.aupro(masks.astype(np.uint8) * 255, maps) == M.aupro(masks, maps)


# ----------------------------------------------------------------------------------------------
# AUPRO against the slow reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, ties, limit):
    masks, maps = blob_case(seed, ties=ties)
    expected = reference_aupro(masks, maps, limit)
    assert M.aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("ties", [False, True])
def test_evaluate_matches_the_single_metrics_and_references(seed, ties):
    masks, maps = blob_case(seed, ties=ties)
    labels = masks.reshape(len(masks), -1).any(1)
    scores = maps.reshape(len(maps), -1).max(1)
    result = M.evaluate(labels, scores, masks, maps)
    assert result["aupro"] == pytest.approx(reference_aupro(masks, maps), abs=1e-9)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-10)
    expected_ap = average_precision_score(masks.ravel(), maps.ravel())
    assert result["pixel_ap"] == pytest.approx(expected_ap, abs=1e-10)
    assert result["pixel_f1_max"] == pytest.approx(f1_reference(masks.ravel(), maps.ravel()), abs=1e-10)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert result["image_f1_max"] == pytest.approx(f1_reference(labels, scores))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_thresholds", [2, 7, 50])
def test_aupro_threshold_grid_matches_reference_on_same_grid(seed, num_thresholds):
    masks, maps = blob_case(seed)
    grid = np.linspace(maps.min(), maps.max(), num_thresholds)
    expected = reference_aupro(masks, maps, 0.3, thresholds=grid)
    assert M.aupro(masks, maps, num_thresholds=num_thresholds) == pytest.approx(expected, abs=1e-9)


def test_aupro_fine_grid_approaches_exact():
    masks, maps = blob_case(0, n=6, size=32)
    assert M.aupro(masks, maps, num_thresholds=5000) == pytest.approx(M.aupro(masks, maps), abs=2e-3)


@pytest.mark.parametrize("seed", range(4))
def test_heavy_ties_between_normal_and_anomalous_pixels(seed):
    # Four score levels only, shared by normal and anomalous pixels: nearly every vertex is a tie.
    masks, _ = blob_case(seed, n=3, size=10)
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, 3, masks.shape).astype(np.float64) + masks * rng.integers(0, 2, masks.shape)
    y, s = masks.ravel(), maps.ravel()
    assert M.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.pixel_average_precision(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert M.pixel_f1_max(masks, maps) == pytest.approx(f1_reference(y, s), abs=1e-12)
    for limit in (0.3, 0.5, 1.0):
        assert M.aupro(masks, maps, limit) == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-12)


def test_aupro_uses_8_connectivity():
    # Pixels (0,0), (1,1), (2,1): one region under 8-connectivity, two under 4-connectivity.
    mask = np.zeros((1, 5, 5), bool)
    mask[0, [0, 1, 2], [0, 1, 1]] = True
    amap = np.zeros((1, 5, 5))
    amap[0, 0, 0] = 1.0
    # Curve (0,0) -> (0,1/3) -> (1,1): PRO at FPR 0.3 is 1/3 + 0.3 * 2/3 = 8/15, so the area
    # up to 0.3 divided by 0.3 is (1/3 + 8/15) / 2 = 13/30.
    # (4-connectivity would give PRO 1/2 at the top threshold and 0.575.)
    assert M.aupro(mask, amap) == pytest.approx(13 / 30, abs=1e-12)


def test_aupro_counts_each_region_equally_across_images():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, :4, :4] = True  # 16-pixel region, fully detected
    masks[1, 0, 0] = True  # 1-pixel region, missed
    maps = np.zeros((2, 6, 6))
    maps[0, :4, :4] = 1.0
    # Top threshold: FPR 0, PRO (1 + 0) / 2; then everything: (1, 1).
    expected = (0.5 + (0.5 + 0.5 * 0.3)) / 2
    assert M.aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Known values
# ----------------------------------------------------------------------------------------------

def test_known_values():
    masks, _ = blob_case(2, n=5, size=16)
    rng = np.random.default_rng(0)
    perfect = np.where(masks, 1.0 + rng.random(masks.shape), rng.random(masks.shape))
    inverted = -perfect
    constant = np.full(masks.shape, 0.25)
    labels = np.array([0, 1, 1, 0, 1])
    assert M.pixel_auroc(masks, perfect) == 1.0
    assert M.aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_average_precision(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_f1_max(masks, perfect) == 1.0
    assert M.pixel_auroc(masks, inverted) == 0.0
    assert M.aupro(masks, inverted) == 0.0
    assert M.pixel_auroc(masks, constant) == 0.5
    assert M.aupro(masks, constant) == pytest.approx(0.15, abs=1e-12)  # the diagonal: limit / 2
    assert M.image_auroc(labels, labels * 2.0) == 1.0
    assert M.image_auroc(labels, -labels) == 0.0
    assert M.image_auroc(labels, np.zeros(5)) == 0.5
    assert M.f1_max(labels, labels) == 1.0
    assert M.average_precision(labels, labels) == 1.0


def test_evaluate_without_masks_gives_nan_pixel_keys_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = M.evaluate([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.3])
    assert set(result) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                           "pixel_f1_max", "aupro"}
    assert result["image_auroc"] == 1.0
    assert all(math.isnan(result[k]) for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"))


# ----------------------------------------------------------------------------------------------
# Degenerate cases and invalid input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [M.image_auroc, M.average_precision, M.f1_max])
def test_no_anomalous_image_is_nan(fn):
    with pytest.warns(RuntimeWarning, match="no anomalous"):
        assert math.isnan(fn([0, 0, 0], [0.1, 0.5, 0.2]))


def test_no_normal_image():
    with pytest.warns(RuntimeWarning, match="image_auroc is undefined: no normal images"):
        assert math.isnan(M.image_auroc([1, 1], [0.1, 0.5]))
    with warnings.catch_warnings():  # AP and F1 are defined without negatives
        warnings.simplefilter("error")
        assert M.average_precision([1, 1], [0.1, 0.5]) == 1.0
        assert M.f1_max([1, 1], [0.1, 0.5]) == 1.0


def test_empty_input_is_nan():
    with pytest.warns(RuntimeWarning):
        assert math.isnan(M.image_auroc([], []))
    with pytest.warns(RuntimeWarning):
        assert math.isnan(M.aupro([], []))


@pytest.mark.parametrize("fn", [M.pixel_auroc, M.pixel_average_precision, M.pixel_f1_max, M.aupro])
def test_all_masks_empty_is_nan(fn):
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(fn(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4))))


@pytest.mark.parametrize("fn", [M.pixel_auroc, M.aupro])
def test_no_normal_pixel_is_nan(fn):
    with pytest.warns(RuntimeWarning, match="no normal"):
        assert math.isnan(fn(np.ones((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4))))


def test_evaluate_degenerate_does_not_crash():
    maps = np.random.default_rng(0).random((3, 4, 4))
    with pytest.warns(RuntimeWarning) as record:
        result = M.evaluate([0, 0, 0], [0.1, 0.2, 0.3], np.zeros((3, 4, 4)), maps)
    assert all(math.isnan(v) for v in result.values())
    messages = " ".join(str(w.message) for w in record)
    for key in result:
        assert key in messages


def test_shape_mismatch_raises_with_index_and_shapes():
    masks = [np.zeros((4, 4), bool), np.zeros((4, 5), bool)]
    maps = [np.zeros((4, 4)), np.zeros((5, 4))]
    for fn in (M.pixel_auroc, M.aupro):
        with pytest.raises(ValueError, match=r"mask 1 .*\(4, 5\).*map 1.*\(5, 4\)"):
            fn(masks, maps)
    with pytest.raises(ValueError, match="masks but"):
        M.pixel_auroc(masks, maps[:1])
    with pytest.raises(ValueError, match="differ in length"):
        M.image_auroc([0, 1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="image labels"):
        M.evaluate([0, 1, 1], [0.1, 0.2, 0.3], np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="N x H x W"):
        M.pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_raise(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        M.image_auroc([0, 1], [0.1, bad])
    maps = np.zeros((2, 3, 3))
    maps[1, 2, 2] = bad
    masks = np.zeros((2, 3, 3), bool)
    masks[1, 0, 0] = True
    with pytest.raises(ValueError, match=r"maps\[1\]"):
        M.aupro(masks, maps)
    with pytest.raises(ValueError, match="NaN or inf"):
        M.evaluate([0, 1], [0.0, 1.0], masks, maps)


def test_invalid_arguments_raise():
    masks, maps = blob_case(0)
    with pytest.raises(ValueError, match="binary"):
        M.pixel_auroc(masks * 0.5, maps)  # e.g. a bilinearly resized mask
    with pytest.raises(ValueError, match="binary"):
        M.image_auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="fpr_limit"):
        M.aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        M.aupro(masks, maps, num_thresholds=1)
    with pytest.raises(ValueError, match="both"):
        M.evaluate([0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4], masks=masks)
