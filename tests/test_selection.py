import json

import numpy as np
import pytest

from astfad.data.synthetic import ANOMALY_KINDS
from astfad.selection import (MIN_GAIN, ONE_SHOT_LOG_MARGIN, ONE_SHOT_MIN_GAIN, PAPER_PRESET, Evidence, SelectionReport, choose_image_score, choose_strategy,
                              load_pinned, min_gain, pixel_fractions, pinned_strategy, rule_scores, separation,
                              log_separation, separation_gain_low,
                              synthetic_anomalies, validation_terms)


def test_paper_preset_reproduces_the_seed_table():
    pinned = load_pinned("paper")
    assert pinned == PAPER_PRESET
    assert pinned_strategy("carpet", pinned) == "semantic_adapter"
    assert pinned_strategy("screw", pinned) == "fusion_weighted_sum:0.7"
    assert pinned_strategy("bottle", pinned) == "fusion_add"
    assert pinned_strategy("my_widget", pinned) == "fusion_add"  # '*' covers unlisted categories
    assert len([c for c in pinned if c != "*"]) == 15


def test_pinned_map_from_yaml_and_json(tmp_path):
    (tmp_path / "map.yaml").write_text("hazelnut: texture\nscrew: 'fusion_weighted_sum:0.3'\n")
    pinned = load_pinned(tmp_path / "map.yaml")
    assert pinned_strategy("hazelnut", pinned) == "texture"
    assert pinned_strategy("cable", pinned) is None  # not listed: auto decides
    (tmp_path / "map.json").write_text(json.dumps({"grid": "semantic", "*": "auto"}))
    assert pinned_strategy("tile", load_pinned(tmp_path / "map.json")) == "auto"
    (tmp_path / "bad.yaml").write_text("grid: blend_everything\n")
    with pytest.raises(ValueError, match="grid"):
        load_pinned(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pinned(tmp_path / "nowhere.yaml")
    assert load_pinned(None) == {}


def test_synthetic_anomalies_cycle_kinds_and_contrasts():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    anomalous, labels, sources, kinds = synthetic_anomalies(images, seed=0, count=10)
    assert len(anomalous) == 10 and sources == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert kinds == sorted(ANOMALY_KINDS)  # every anomaly kind is used
    for image, label, base in zip(anomalous, labels, sources, strict=True):
        assert set(np.unique(label)) <= {0, 1, 2} and (label == 2).any()  # a second anomaly in each
        assert label.any() and not label.all()
        changed = (image != images[base]).any(axis=2)
        assert not changed[label == 0].any()
    difference = [np.abs(a.astype(int) - images[b]) for a, b in zip(anomalous, sources)]
    full = [d[lab == 1].mean() for d, lab in zip(difference[::2], labels[::2]) if (lab == 1).any()]
    faint = [d[lab == 2].mean() for d, lab in zip(difference, labels)]
    assert np.mean(faint) < np.mean(full)  # the second anomaly is always blended back towards normal


def test_pixel_term_weighs_each_anomaly_alike():
    normal_maps = np.random.default_rng(0).normal(0, 1, (4, 16, 16))
    amap = np.zeros((16, 16))
    labels = np.zeros((16, 16), np.uint8)
    labels[:8, :8], labels[12, 12] = 1, 2  # a large anomaly the map sees, a one-pixel one it misses
    amap[:8, :8], amap[12, 12] = 10.0, -10.0
    ev = Evidence(normal_maps.max(axis=(1, 2)), normal_maps, amap[None].max(axis=(1, 2)), amap[None])
    pixel = pixel_fractions(ev, labels[None])
    assert pixel.shape == (1, 4)
    assert pixel.mean() == pytest.approx(0.5)  # the mean of 1 and 0, not the pixel-weighted 64/65
    pixel = pixel_fractions(ev, (labels > 0)[None])  # a bool mask: one anomaly
    assert pixel.mean() == pytest.approx(64 / 65)
    pooled = np.searchsorted(np.sort(normal_maps[:2].ravel()), amap[labels > 0]).mean() / normal_maps[:2].size
    assert pixel[0, :2].mean() == pytest.approx(pooled)  # a mean over normal images is their pooled fraction


def _evidence(rng, separation: float, m: int = 24, normal: int = 6) -> Evidence:
    normal_maps = rng.normal(0, 1, (normal, 16, 16))
    anomalous_maps = rng.normal(0, 1, (m, 16, 16))
    anomalous_maps[:, 4:8, 4:8] += separation
    return Evidence(normal_maps.max(axis=(1, 2)), normal_maps, anomalous_maps.max(axis=(1, 2)), anomalous_maps)


def test_default_kept_unless_beaten_beyond_noise():
    rng = np.random.default_rng(0)
    masks = np.zeros((24, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    same = {"semantic": _evidence(rng, 1.0), "texture": _evidence(rng, 1.05)}
    report = choose_strategy(validation_terms(same, masks), "semantic")
    assert report.choice == "semantic" and "no candidate beats it" in report.reason
    better = {"semantic": _evidence(rng, 1.0), "texture": _evidence(rng, 4.0)}
    report = choose_strategy(validation_terms(better, masks), "semantic")
    assert report.choice == "texture" and report.scores["texture"]["gain_low"] > 0
    # a minimum gain the mean gain does not clear keeps the default, and says so
    gain = report.scores["texture"]["gain"]
    kept = choose_strategy(validation_terms(better, masks), "semantic", min_gain=gain + 0.01)
    assert kept.choice == "semantic" and f"by a mean gain above {gain + 0.01:g}" in kept.reason
    assert choose_strategy(validation_terms(better, masks), "semantic", min_gain=gain - 0.01).choice == "texture"
    assert min_gain(1) == ONE_SHOT_MIN_GAIN > min_gain(2) == min_gain(16) == MIN_GAIN > 0
    with pytest.raises(ValueError, match="default"):
        choose_strategy(validation_terms({"texture": better["texture"]}, masks), "semantic")


def test_many_equal_challengers_rarely_switch_on_noise():
    # seven challengers exactly as good as the default, 8 normal images (what 4 shots give): at 5%
    # each on anomalous images alone (and a Gaussian image term), 13 of 20 trials with 6 normal
    # images switched; the paired, corrected rule on the pixel measure switches in 4 of 40 (also
    # with 4 normal images, one shot's; 9 of 40 when the image term weighed half)
    masks = np.zeros((24, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    names = ["semantic", "texture", "fusion_add", "fusion_mul", "fusion_max", "subspace",
             "fusion_weighted_sum:0.3", "fusion_weighted_sum:0.7"]
    switches = 0
    for trial in range(40):
        rng = np.random.default_rng(100 + trial)
        report = choose_strategy(validation_terms({n: _evidence(rng, 1.0, normal=8) for n in names}, masks),
                                 "semantic", seed=trial)
        switches += report.choice != "semantic"
    assert switches <= 4


def test_report_formats_the_evidence():
    report = SelectionReport("semantic", "the default",
                             {"semantic": {"image": 0.9, "pixel": 0.9, "score": 0.9},
                              "texture": {"image": 0.8, "pixel": 0.7, "score": 0.75, "gain": -0.15,
                                          "gain_low": -0.2, "gain_high": -0.1}},
                             {"normal": 4, "anomalous": 16, "kinds": ["blob"], "notes": ["a note"]},
                             {"choice": "max", "reason": "separates further", "separation": {"top1": 1.5, "max": 2.25}})
    text = report.format()
    assert "image score: max (separates further; separation top1 1.50, max 2.25)" in text
    assert text.index("semantic") < text.index("texture") and "<- chosen" in text
    assert "note: a note" in text and "-0.150" in text
    assert SelectionReport.from_dict(report.to_dict()) == report


def _maps_with(rng, count: int, spot: float = 0.0, patch: float = 0.0) -> np.ndarray:
    """Noisy 32x32 maps, each with a one-pixel spot and/or a 6x6 patch raised by the given amounts."""
    maps = rng.normal(0, 1, (count, 32, 32))
    maps[:, 5, 5] += spot
    maps[:, 20:26, 20:26] += patch
    return maps


def test_image_score_rule_follows_the_separation_of_the_validation():
    # above one shot: the separation in normal spreads
    rng = np.random.default_rng(0)
    normal = _maps_with(rng, 8)
    # defects of one hot pixel, which a top-1% mean (10 pixels here) dilutes: max separates further
    spots = Evidence(np.zeros(8), normal, np.zeros(24), _maps_with(rng, 24, spot=12.0))
    chosen = choose_image_score(rule_scores(spots), "top1", 4)
    assert chosen["choice"] == "max" and chosen["separation"]["max"] > chosen["separation"]["top1"]
    assert "further than 'top1'" in chosen["reason"]
    # broad faint defects, over which a noisy maximum wanders: the top-1% mean separates further
    patches = Evidence(np.zeros(8), normal, np.zeros(24), _maps_with(rng, 24, patch=2.5))
    chosen = choose_image_score(rule_scores(patches), "top1", 4)
    assert chosen["choice"] == "top1" and chosen["reason"].startswith("the default")
    assert choose_image_score(rule_scores(patches), "max", 4)["choice"] == "top1"  # a default that separates less gives way
    same = Evidence(np.zeros(8), normal, np.zeros(8), normal)
    assert choose_image_score(rule_scores(same), "max", 4)["choice"] == "max"
    with pytest.raises(ValueError, match="reweight"):
        choose_image_score(rule_scores(spots), "reweight", 4)


def test_rule_scores_leave_the_border_out_as_the_detector_does():
    """The image-score rule is chosen on scores read as the detector reads them: with a border,
    a hot edge of the normal validation maps no longer masks the anomalies' spots."""
    rng = np.random.default_rng(0)
    normal = _maps_with(rng, 8)
    normal[:, 0, :] += 20.0  # good parts whose edge lights up
    spots = Evidence(np.zeros(8), normal, np.zeros(24), _maps_with(rng, 24, spot=12.0))
    whole, inner = rule_scores(spots), rule_scores(spots, border=2)
    assert whole["normal_max"].min() > whole["anomalous_max"].max()
    assert inner["normal_max"].max() < inner["anomalous_max"].min()
    terms = validation_terms({"semantic": spots}, np.zeros((24, 32, 32), np.uint8), border=2)
    assert np.array_equal(terms["semantic"]["normal_max"], inner["normal_max"])


def test_image_score_is_the_maximum_above_max_above_shots_whatever_the_validation_says():
    rng = np.random.default_rng(0)
    patches = rule_scores(Evidence(np.zeros(8), _maps_with(rng, 8), np.zeros(24), _maps_with(rng, 24, patch=2.5)))
    assert choose_image_score(patches, "top1", 16)["choice"] == "top1"  # by default validated at any shot count
    assert choose_image_score(patches, "top1", 8, max_above=8)["choice"] == "top1"  # validated up to the bound
    above = choose_image_score(patches, "top1", 9, max_above=8)
    assert above["choice"] == "max" and "above 8 shots" in above["reason"]
    assert above["separation"]["top1"] > above["separation"]["max"]  # still reported


def test_separation_is_in_units_of_the_normal_spread_and_survives_constant_scores():
    assert separation(np.array([1.0, 3.0]), np.array([4.0, 5.0, 100.0])) == pytest.approx(3.0)
    assert np.isfinite(separation(np.ones(4), np.full(3, 2.0)))


def test_the_maximum_must_lead_by_the_margin_and_beyond_the_validations_noise():
    def spots(strength: float) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(0)
        return rule_scores(Evidence(np.zeros(4), _maps_with(rng, 4), np.zeros(12), _maps_with(rng, 12, spot=strength)))
    faint = spots(3.0)  # the maximum leads by about 2 normal spreads, on 4 normal images
    lead = choose_image_score(faint, "top1", 4)["separation"]
    assert lead["max"] - lead["top1"] > 1.5
    assert choose_image_score(faint, "top1", 4, min_gain=1.5)["choice"] == "max"
    held = choose_image_score(faint, "top1", 4, min_gain=lead["max"] - lead["top1"] + 0.1)
    assert held["choice"] == "top1" and "by more than" in held["reason"]
    assert separation_gain_low(faint, "max", "top1") < 0  # which 4 normal images were drawn decides the lead
    noisy = choose_image_score(faint, "top1", 4, bootstrap=True)
    assert noisy["choice"] == "top1" and "noise" in noisy["reason"]
    assert separation_gain_low(spots(5.0), "max", "top1") > 0
    assert choose_image_score(spots(5.0), "top1", 4, bootstrap=True)["choice"] == "max"


def test_at_one_shot_the_maximum_must_lead_in_log_separation():
    normal = np.abs(_maps_with(np.random.default_rng(0), 8)) + 1.0  # positive, as distances are

    def term(spot: float) -> dict[str, np.ndarray]:
        spots = np.abs(_maps_with(np.random.default_rng(1), 24, spot=spot)) + 1.0
        return rule_scores(Evidence(np.zeros(8), normal, np.zeros(24), spots))
    strong = choose_image_score(term(12.0), "top1", 1)
    assert strong["choice"] == "max" and "log separation" in strong["reason"]
    assert strong["log_separation"]["max"] - strong["log_separation"]["top1"] > ONE_SHOT_LOG_MARGIN
    # a faint spot the maximum sees a little better: under the margin at one shot, ahead in spreads above
    faint = choose_image_score(term(1.0), "top1", 1)
    lead = faint["log_separation"]["max"] - faint["log_separation"]["top1"]
    assert 0 < lead < ONE_SHOT_LOG_MARGIN and faint["choice"] == "top1" and "at one shot" in faint["reason"]
    assert choose_image_score(term(1.0), "top1", 4)["choice"] == "max"
    assert choose_image_score(term(1.0), "top1", 1, one_shot_log_margin=None)["choice"] == "max"
    assert log_separation(np.array([2.0, 2.0]), np.array([2.0, 4.0, 8.0])) == pytest.approx(np.log(2.0))
    # scores that are not all positive (fused, normalised maps) keep the spread separation
    rng = np.random.default_rng(2)
    signed = rule_scores(Evidence(np.zeros(8), _maps_with(rng, 8) - 5, np.zeros(24), _maps_with(rng, 24, spot=12.0) - 5))
    assert "log_separation" not in choose_image_score(signed, "top1", 1)
