import json

import numpy as np
import pytest

from astfad.selection import (PAPER_PRESET, Evidence, SelectionReport, choose_strategy, load_pinned,
                              pinned_strategy, synthetic_anomalies)


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
    anomalous, masks, sources, kinds = synthetic_anomalies(images, seed=0, count=10)
    assert len(anomalous) == 10 and sources == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert len(set(kinds)) == 5  # every anomaly kind is used
    for image, mask, base in zip(anomalous, masks, sources, strict=True):
        assert mask.any() and not mask.all()
        changed = (image != images[base]).any(axis=2)
        assert not changed[~mask].any()
    full = [np.abs(a.astype(int) - images[b])[m].mean() for a, m, b in zip(anomalous[::2], masks[::2], sources[::2])]
    faint = [np.abs(a.astype(int) - images[b])[m].mean() for a, m, b in zip(anomalous[1::2], masks[1::2], sources[1::2])]
    assert np.mean(faint) < np.mean(full)  # every other anomaly is blended back towards normal


def _evidence(rng, separation: float, m: int = 24) -> Evidence:
    normal_maps = rng.normal(0, 1, (6, 16, 16))
    anomalous_maps = rng.normal(0, 1, (m, 16, 16))
    anomalous_maps[:, 4:8, 4:8] += separation
    return Evidence(normal_maps.max(axis=(1, 2)), normal_maps, anomalous_maps.max(axis=(1, 2)), anomalous_maps)


def test_default_kept_unless_beaten_beyond_noise():
    rng = np.random.default_rng(0)
    masks = np.zeros((24, 16, 16), bool)
    masks[:, 4:8, 4:8] = True
    same = {"semantic": _evidence(rng, 1.0), "texture": _evidence(rng, 1.05)}
    report = choose_strategy(same, masks, "semantic")
    assert report.choice == "semantic" and "no candidate beats it" in report.reason
    better = {"semantic": _evidence(rng, 1.0), "texture": _evidence(rng, 4.0)}
    report = choose_strategy(better, masks, "semantic")
    assert report.choice == "texture" and report.scores["texture"]["gain_low"] > 0
    with pytest.raises(ValueError, match="default"):
        choose_strategy({"texture": better["texture"]}, masks, "semantic")


def test_report_formats_the_evidence():
    report = SelectionReport("semantic", "the default",
                             {"semantic": {"image": 0.9, "pixel": 0.9, "score": 0.9},
                              "texture": {"image": 0.8, "pixel": 0.7, "score": 0.75, "gain": -0.15,
                                          "gain_low": -0.2, "gain_high": -0.1}},
                             {"normal": 4, "anomalous": 16, "kinds": ["blob"], "notes": ["a note"]})
    text = report.format()
    assert text.index("semantic") < text.index("texture") and "<- chosen" in text
    assert "note: a note" in text and "-0.150" in text
    assert SelectionReport.from_dict(report.to_dict()) == report
