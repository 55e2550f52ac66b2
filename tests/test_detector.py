import json

import numpy as np
import pytest
import torch

from astfad.detector import Detector, ModelFileError
from astfad.metrics import image_auroc

FAST = dict(semantic_size=112, texture_size=112, eval_size=112, adapter_steps=20)
STRATEGIES = ["texture", "semantic", "semantic_adapter", "fusion_add", "fusion_mul",
              "fusion_max", "fusion_weighted_sum:0.3"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_fits_and_separates(fake_backbones, parts, strategy):
    det = Detector(strategy, **FAST).fit(parts["train"])
    preds = det.predict(parts["test"])
    assert len(preds) == 8
    assert preds[0].anomaly_map.shape == parts["test"][0].shape[:2]
    assert preds[0].mask.dtype == bool
    assert image_auroc(parts["labels"], [p.score for p in preds]) >= 0.9
    assert det.threshold is not None and det.pixel_threshold is not None
    assert set(det.normalisers) == set(det.experts) | {"applied"}


def test_verdicts_and_masks_follow_the_defect(fake_backbones, parts):
    det = Detector("texture", **FAST).fit(parts["train"])
    preds = det.predict(parts["test"])
    assert all(p.is_anomalous for p in preds[4:])
    assert sum(p.is_anomalous for p in preds[:4]) <= 1
    for pred, truth in zip(preds[4:], parts["masks"][4:]):
        assert (pred.mask & truth).sum() > 0.3 * truth.sum()


def test_single_shot_uses_views_for_normalisation(fake_backbones, parts):
    det = Detector("fusion_add", **FAST).fit(parts["train"][:1])
    assert det.threshold is not None
    scores = [p.score for p in det.predict(parts["test"])]
    assert image_auroc(parts["labels"], scores) >= 0.75


def test_manual_threshold_override(fake_backbones, parts):
    det = Detector("semantic", threshold=1e9, pixel_threshold=1e9, **FAST).fit(parts["train"])
    assert det.threshold == 1e9
    assert not any(p.is_anomalous or p.mask.any() for p in det.predict(parts["test"]))


def test_auto_selects_with_a_report(fake_backbones, parts):
    det = Detector("auto", **FAST).fit(parts["train"])
    report = det.selection
    assert report["choice"] == det.strategy
    assert len(report["scores"]) == 9
    assert report["validation"]["anomalous"] >= 8
    assert image_auroc(parts["labels"], [p.score for p in det.predict(parts["test"])]) >= 0.9


def test_auto_validates_the_adapter_only_on_held_out_shots(fake_backbones, parts):
    single = Detector("auto", **FAST).fit(parts["train"][:1])
    assert "semantic_adapter" not in single.selection["scores"]
    assert any("one shot" in note for note in single.selection["validation"]["notes"])
    several = Detector("auto", **FAST).fit(parts["train"][:4])
    assert "semantic_adapter" in several.selection["scores"]
    assert any("other half" in note for note in several.selection["validation"]["notes"])


def test_fit_is_deterministic(fake_backbones, parts):
    a = [p.score for p in Detector("semantic_adapter", **FAST).fit(parts["train"]).predict(parts["test"])]
    b = [p.score for p in Detector("semantic_adapter", **FAST).fit(parts["train"]).predict(parts["test"])]
    assert a == b


@pytest.mark.parametrize("strategy", ["semantic_adapter", "fusion_mul", "texture"])
def test_save_load_round_trip_gives_identical_scores(fake_backbones, parts, tmp_path, strategy):
    det = Detector(strategy, mask_background=True, **FAST).fit(parts["train"])
    path = det.save(tmp_path / "model.safetensors")
    loaded = Detector.load(path)
    assert loaded.strategy == det.strategy and loaded.threshold == det.threshold
    before = det.predict(parts["test"])
    after = loaded.predict(parts["test"])
    assert [p.score for p in before] == [p.score for p in after]
    assert np.array_equal(before[5].anomaly_map, after[5].anomaly_map)
    with pytest.raises(FileExistsError):
        det.save(path)


def test_load_refuses_bad_files(fake_backbones, parts, tmp_path):
    with pytest.raises(ModelFileError, match="no saved detector"):
        Detector.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.safetensors"):
        Detector.load(junk)
    det = Detector("semantic", **FAST).fit(parts["train"])
    path = det.save(tmp_path / "m.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["astfad"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format"] = 999
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata={"astfad": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="format 999"):
        Detector.load(tmp_path / "future.safetensors")
    meta["format"], meta["backbones"]["semantic"] = 1, "other_vit@x"
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"astfad": json.dumps(meta)})
    with pytest.raises(ModelFileError, match="other_vit@x"):
        Detector.load(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match="without astfad metadata"):
        Detector.load(tmp_path / "plain.safetensors")


def test_feature_cache_is_shared(fake_backbones, parts, tmp_path):
    from PIL import Image
    paths = []
    for i, image in enumerate(parts["train"]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    cache = {}
    Detector("fusion_add", cache=cache, **FAST).fit(paths)
    size = len(cache)
    assert size >= 2 * len(paths)
    Detector("fusion_max", cache=cache, **FAST).fit(paths)
    assert len(cache) == size  # the second detector ran no backbone pass


def test_reweight_only_for_texture():
    with pytest.raises(ValueError, match="reweight"):
        Detector("semantic", image_score="reweight")
