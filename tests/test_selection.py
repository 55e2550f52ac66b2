import json

import numpy as np
import pytest

from astfad.selection import PAPER_PRESET, SelectionReport, load_pinned, pinned_strategy, synthetic_validation


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


def test_synthetic_validation_cycles_kinds_and_keeps_exclusions():
    from astfad.detector import ValidationBases

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    bases = ValidationBases(images, [None] * 3, [0, 1, 2], {})
    anomalous, masks, exclude, kinds = synthetic_validation(bases, seed=0, count=8)
    assert len(anomalous) == 8 and exclude == [0, 1, 2, 0, 1, 2, 0, 1]
    assert len(set(kinds)) == 5  # every anomaly kind is used
    for image, mask, base in zip(anomalous, masks, exclude, strict=True):
        assert mask.any() and not mask.all()
        changed = (image != images[base]).any(axis=2)
        assert not changed[~mask].any()


def test_report_formats_the_evidence():
    report = SelectionReport("semantic", "highest validation score 0.900",
                             {"semantic": {"image_auroc": 0.9, "pixel_auroc": 0.9, "score": 0.9},
                              "texture": {"image_auroc": 0.8, "pixel_auroc": 0.7, "score": 0.75}},
                             {"normal": 4, "anomalous": 8, "kinds": ["blob"], "notes": ["a note"]})
    text = report.format()
    assert text.index("semantic") < text.index("texture") and "<- chosen" in text
    assert "note: a note" in text
    assert SelectionReport.from_dict(report.to_dict()) == report
