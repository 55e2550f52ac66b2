import warnings

import numpy as np
import pytest
import torch

from astfad.config import candidate_strategies
from astfad.detector import FORMAT_VERSION, Detector, ModelFileError
from astfad.metrics import image_auroc
from astfad.scoring import image_scores
from astfad.selection import MIN_GAIN, ONE_SHOT_MIN_GAIN, choose_strategy
from conftest import read_raw, write_raw

FAST = dict(semantic_size=112, texture_size=112, eval_size=112, adapter_steps=20)
STRATEGIES = ["texture", "semantic", "semantic_adapter", "subspace", "fusion_add", "fusion_mul",
              "fusion_max", "fusion_weighted_sum:0.3", "fusion_max:texture+subspace"]


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
    with pytest.warns(UserWarning, match="one good image.*calibrate"):
        det = Detector("fusion_add", **FAST).fit(parts["train"][:1])
    assert det.threshold is not None
    scores = [p.score for p in det.predict(parts["test"])]
    assert image_auroc(parts["labels"], scores) >= 0.75


def test_manual_threshold_override(fake_backbones, parts):
    det = Detector("semantic", threshold=1e9, pixel_threshold=1e9, **FAST).fit(parts["train"])
    assert det.threshold == 1e9
    assert not any(p.is_anomalous or p.mask.any() for p in det.predict(parts["test"]))
    with warnings.catch_warnings():  # a threshold the user set needs no warning about one shot
        warnings.simplefilter("error")
        Detector("semantic", threshold=1.0, **FAST).fit(parts["train"][:1])


def test_auto_selects_with_a_report(fake_backbones, parts):
    det = Detector("auto", **FAST).fit(parts["train"])
    report = det.selection
    assert report["choice"] == det.strategy
    # semantic and subspace alone; texture and the adapter only when auto_experts names them, and
    # then the texture backbone is never loaded; fusions only with auto_fusions
    assert list(report["scores"]) == ["semantic", "subspace"] and "texture" not in det.featurizers
    assert any("fusions of the experts not validated" in note for note in report["validation"]["notes"])
    assert any("semantic_adapter not validated" in note and "leave-one-category-out" in note
               for note in report["validation"]["notes"])
    both = Detector("auto", auto_experts=("texture", "semantic"), auto_fusions=True, **FAST).fit(parts["train"])
    # texture, semantic and five fusions (fusion_weighted_sum:0.5 is fusion_add halved)
    assert list(both.selection["scores"]) == [*candidate_strategies(("texture", "semantic"))]
    assert len(both.selection["scores"]) == 7
    assert report["validation"]["anomalous"] >= 12
    chosen = report["scores"][det.strategy]
    # the default, unless beaten beyond noise and by more than the minimum gain
    assert det.strategy == "semantic" or (chosen["gain_low"] > 0 and chosen["gain"] > MIN_GAIN)
    assert image_auroc(parts["labels"], [p.score for p in det.predict(parts["test"])]) >= 0.9


def test_auto_asks_its_minimum_gain_by_the_shot_count(fake_backbones, parts, monkeypatch):
    asked = []

    def recording(*args, **kwargs):
        asked.append(kwargs["min_gain"])
        return choose_strategy(*args, **kwargs)
    monkeypatch.setattr("astfad.detector.choose_strategy", recording)
    for shots in (1, 2):
        Detector("auto", **FAST).fit(parts["train"][:shots])
    assert asked == [ONE_SHOT_MIN_GAIN, MIN_GAIN]


def test_auto_validates_the_image_score_rule_and_scores_with_it(fake_backbones, parts, tmp_path, monkeypatch):
    det = Detector("auto", **FAST).fit(parts["train"])
    assert det.selection["image_score"]["choice"] == det.image_score
    assert set(det.selection["image_score"]["separation"]) == {"top1", "max"}
    above = Detector("auto", auto_max_score_above=1, **FAST).fit(parts["train"])
    assert above.image_score == "max" and "auto_max_score_above" in above.selection["image_score"]["reason"]
    with pytest.raises(ValueError, match="auto_max_score_above"):
        Detector("auto", auto_max_score_above=-1)
    off = Detector("auto", auto_image_score=False, image_score="max", **FAST).fit(parts["train"])
    assert off.image_score == "max" and off.selection["image_score"] == {}
    assert Detector("semantic", **FAST).fit(parts["train"]).image_score == "top1"  # fixed: no validation
    # whichever rule auto takes, its thresholds come from normal scores under that rule, and a
    # saved model (its config carrying the rule) scores with it after loading
    monkeypatch.setattr("astfad.detector.choose_image_score",
                        lambda evidence, default, shots, max_above: {"choice": "max", "reason": "forced", "separation": {}})
    forced = Detector("auto", **FAST).fit(parts["train"])
    fixed = Detector(forced.strategy, image_score="max", **FAST).fit(parts["train"])
    assert forced.image_score == "max" and forced.threshold == fixed.threshold
    assert [p.score for p in forced.predict(parts["test"])] == [p.score for p in fixed.predict(parts["test"])]
    loaded = Detector.load(forced.save(tmp_path / "auto.safetensors"))
    assert loaded.image_score == "max" and loaded.config.image_score == "max"
    assert [p.score for p in loaded.predict(parts["test"])] == [p.score for p in fixed.predict(parts["test"])]


def test_auto_validates_the_adapter_with_adapters_that_did_not_see_the_shot(fake_backbones, parts):
    for shots in (1, 4):
        det = Detector("auto", auto_experts=("texture", "semantic", "semantic_adapter"), **FAST
                       ).fit(parts["train"][:shots])
        assert "semantic_adapter" in det.selection["scores"]
        assert any("never saw" in note for note in det.selection["validation"]["notes"])


def test_held_out_adapter_pairs_leave_out_their_group(fake_backbones, parts):
    from astfad.detector import owner_group

    for shots in (1, 4):
        det = Detector("semantic", **FAST).fit(parts["train"][:shots])
        normal = det._normal_set(parts["train"][:shots], [None] * shots, ["semantic"], True)
        _, _, everyone = det._view_pairs(normal, "semantic")
        assert len(set(owner_group(everyone, shots == 1).tolist())) == 2
        for group in (0, 1):
            _, _, owners = det._view_pairs(normal, "semantic", group)
            assert len(owners) and (owner_group(owners, shots == 1) != group).all()


def test_normal_data_is_never_matched_against_itself(fake_backbones, parts, monkeypatch):
    """Every normal image scored during fit carries an exclusion, and no patch of a shot finds its
    own (identical) row among the bank rows it may match; with one shot too."""
    from astfad.experts.base import KNNExpert, flatten_patches

    calls = []
    original = KNNExpert.distances

    def spy(self, feats, exclude=None):
        calls.append((self, feats, exclude))
        return original(self, feats, exclude)

    monkeypatch.setattr(KNNExpert, "distances", spy)
    for shots, test_flip in ((1, False), (3, False), (1, True)):
        calls.clear()
        Detector("fusion_add", test_flip=test_flip, **FAST).fit(parts["train"][:shots])
        assert calls
        for expert, feats, exclude in calls:
            assert exclude is not None and all(e is not None for e in exclude)
            bank = expert.bank
            for image, owner in zip(feats, exclude):
                queries = flatten_patches(expert.transform(image[None]))
                owners = torch.as_tensor(owner).reshape(-1).expand(len(queries))
                same = torch.cdist(queries, bank.features) < 1e-6
                allowed = bank.owners[None, :] != owners[:, None]
                assert not (same & allowed).any()


@pytest.mark.parametrize("strategy", ["semantic", "fusion_mul:semantic+subspace"])
def test_test_flip_averages_the_image_and_its_mirror_everywhere(fake_backbones, parts, tmp_path, strategy):
    """With test_flip each expert's map is the mean of the plain detector's maps of the image and
    of its mirror image flipped back (same banks), the normal maps behind the thresholds too; a
    saved model keeps the flip, and a file from before the setting loads without it."""
    plain = Detector(strategy, test_flip=False, **FAST).fit(parts["train"][:3])
    flip = Detector(strategy, test_flip=True, **FAST).fit(parts["train"][:3])
    test = parts["test"]
    _, base = plain.maps_of(test, strategy="all")
    _, mirrored = plain.maps_of([np.ascontiguousarray(x[:, ::-1]) for x in test], strategy="all")
    _, both = flip.maps_of(test, strategy="all")
    for name in base:
        assert torch.allclose(both[name], (base[name] + mirrored[name].flip(-1)) / 2, atol=1e-5)
    assert flip.threshold != plain.threshold  # fitted on flip-averaged normal maps
    with pytest.raises(ValueError, match="test_flip"):
        flip.expert_maps(flip.extract(test, strategy="all"))
    path = flip.save(tmp_path / "flip.safetensors")
    assert [p.score for p in Detector.load(path).predict(test)] == [p.score for p in flip.predict(test)]
    meta, tensors = read_raw(plain.save(tmp_path / "plain.safetensors"))
    del meta["config"]["test_flip"]
    assert Detector.load(write_raw(tmp_path / "before.safetensors", meta, tensors)).config.test_flip is False


def test_the_flip_is_on_above_few_shots_by_default_and_saved_resolved(fake_backbones, parts, tmp_path):
    from astfad.config import FEW_SHOTS

    few = Detector("semantic", **FAST).fit(parts["train"][:FEW_SHOTS])
    many = Detector("semantic", **FAST).fit(parts["train"][:FEW_SHOTS + 1])
    assert not few.test_flip and many.test_flip
    loaded = Detector.load(many.save(tmp_path / "many.safetensors"))
    assert loaded.config.test_flip is True and loaded.test_flip
    assert [p.score for p in loaded.predict(parts["test"])] == [p.score for p in many.predict(parts["test"])]
    with pytest.raises(ValueError, match="test_flip"):
        Detector("semantic", test_flip="yes")


@pytest.mark.parametrize("shots", [3, 5])  # without and with the test-time flip
def test_own_test_grid_reads_each_image_shape_unsquashed(fake_backbones, parts, tmp_path, shots):
    """test_grid "own" (the default): each test image shape is read at its own aspect (not squashed to the
    category's), mapped as it would be alone, resized to the evaluation grid, in the batch's order;
    an image of the category's shape reads as before, and a saved model keeps the setting."""
    square = parts["test"][5]
    wide = np.ascontiguousarray(np.concatenate([parts["test"][1], square], axis=1))  # 112 x 224
    batch = [wide, square, np.ascontiguousarray(wide[:, ::-1])]
    own = Detector("auto", test_grid="own", **FAST).fit(parts["train"][:shots])
    squashed = Detector("auto", test_grid="category", **FAST).fit(parts["train"][:shots])
    assert own.strategy == squashed.strategy and own.threshold == squashed.threshold  # fitting is unchanged
    maps, scores = own.score_arrays(batch)
    assert maps.shape == (3, *own.eval_grid())
    for i, image in enumerate(batch):
        alone_maps, alone_scores = own.score_arrays([image])
        assert torch.allclose(maps[i], alone_maps[0], atol=1e-5) and torch.isclose(scores[i], alone_scores[0])
    # shapes whose own grids agree for every family are read as one group
    smaller = np.ascontiguousarray(square[:-2, :-2])
    assert own.test_groups([wide, square, smaller], own.families()) == [(2.0, [0]), (1.0, [1, 2])]
    before, _ = squashed.score_arrays(batch)
    assert torch.allclose(maps[1], before[1], atol=1e-5)
    assert not torch.allclose(maps[0], before[0], atol=1e-3)
    assert own.predict([wide])[0].anomaly_map.shape == wide.shape[:2]
    loaded = Detector.load(own.save(tmp_path / "own.safetensors"))
    assert loaded.config.test_grid == "own"
    assert torch.allclose(loaded.score_arrays(batch)[1], scores)
    with pytest.raises(ValueError, match="test_grid must be"):
        Detector("semantic", test_grid="image")
    # PatchCore's reweighting scores the features of one grid: it reads every image on the category's
    reweight = Detector("texture", image_score="reweight", **FAST).fit(parts["train"][:shots])
    assert reweight.test_groups(batch, ["texture"]) == [(reweight.aspect, [0, 1, 2])]


def test_thresholds_follow_the_target_false_positive_rate(fake_backbones, parts):
    det = Detector("semantic", **FAST).fit(parts["train"])
    assert det.threshold == det.threshold_for(0.01)
    assert det.threshold_for(0.2) < det.threshold_for(0.01) < det.threshold_for(0.0001)
    assert det.pixel_threshold_for(0.01) < det.pixel_threshold_for(0.001) < det.pixel_threshold_for(1e-5)
    assert set(det.threshold_models) >= {"semantic"}
    lenient = Detector("semantic", target_fpr=0.3, **FAST).fit(parts["train"])
    assert lenient.threshold < det.threshold
    with pytest.raises(ValueError, match="target_fpr"):
        Detector("semantic", target_fpr=1.5)


def test_every_candidate_has_its_own_thresholds(fake_backbones, parts):
    det = Detector("auto", **FAST).fit(parts["train"])
    assert set(det.threshold_models) == set(candidate_strategies(det.experts)) >= set(det.selection["scores"])
    for name in det.threshold_models:
        assert np.isfinite(det.threshold_for(strategy=name))


def test_calibrate_refits_thresholds_on_extra_good_images(fake_backbones, parts):
    from astfad.thresholds import CALIBRATION_WIDENING, TAIL_WIDENING, ScoreModel

    det = Detector("fusion_add", **FAST).fit(parts["train"][:2])
    assert det.threshold_models["fusion_add"].image.widening == TAIL_WIDENING
    bank = det.experts["semantic"].bank.features.clone()
    det.calibrate(parts["train"][2:], target_fpr=0.05)
    # new good parts show the spread held-out shots hide: a narrower tail
    assert {m.image.widening for m in det.threshold_models.values()} == {CALIBRATION_WIDENING}
    saved = det.threshold_models["fusion_add"].image
    old = {k: v for k, v in saved.__dict__.items() if k != "widening"}  # a model saved before the field
    assert ScoreModel(**old).widening == TAIL_WIDENING
    assert torch.equal(det.experts["semantic"].bank.features, bank)
    assert det.config.target_fpr == 0.05 and det.threshold == det.threshold_for(0.05)
    preds = det.predict(parts["test"])
    assert sum(p.is_anomalous for p in preds[4:]) >= 3 and sum(p.is_anomalous for p in preds[:4]) <= 1
    with pytest.raises(ValueError, match="at least 2 good images"):
        det.calibrate(parts["train"][:1])


def test_robust_pixel_tail_keeps_the_good_parts_upper_tail_and_drops_the_flagged_ones():
    """Of 19 good maps and one with a defect, the unflagged images' pixel tail is the 19 good ones'
    (the defect flagged and left out), while the more normal half loses the good parts' own upper
    tail and sets the pixel threshold lower."""
    from astfad.thresholds import ThresholdModel, TailModel

    rng = np.random.default_rng(0)
    good = torch.from_numpy(rng.gamma(2.0, 1.0, (19, 32, 32)) * rng.uniform(0.8, 1.2, (19, 1, 1)))
    defect = good[0].clone()
    defect[8:16, 8:16] += 20.0
    maps = torch.cat([good, defect[None]])
    scores = maps.flatten(1).topk(10, dim=1).values.mean(dim=1)
    clean = TailModel.fit(good.flatten().numpy()).threshold(0.001)
    unflagged = ThresholdModel.fit_robust(scores, maps, image_fpr=0.01).pixel.threshold(0.001)
    half = ThresholdModel.fit_robust(scores, maps).pixel.threshold(0.001)
    assert abs(unflagged - clean) < 0.05 * clean and half < unflagged


def test_unlabelled_calibration_is_robust_to_a_few_defective_parts(fake_backbones, parts):
    """Fitted on one shot, calibrated on 9 unsorted parts of which one is defective: the robust fit
    lands near the one on the 8 good parts alone, while a plain (labelled) fit on the same 9 is
    dragged up by the defective part; the normalisers stay the shots'; the model records the
    calibration."""
    good = parts["train"][1:] + parts["test"][:1]
    mixed = good + parts["test"][4:5]
    thresholds, records = {}, {}
    for name, images, unlabelled in (("robust, good only", good, True), ("robust, mixed", mixed, True),
                                     ("plain, mixed", mixed, False)):
        with pytest.warns(UserWarning, match="one good image"):
            det = Detector("semantic", **FAST).fit(parts["train"][:1])
        normalisers = {k: v.to_list() for k, v in det.normalisers.items()}
        det.calibrate(images, unlabelled=unlabelled)
        thresholds[name], records[name] = det.threshold, det.calibration
        if unlabelled:
            assert {k: v.to_list() for k, v in det.normalisers.items()} == normalisers
    # the robust fit flags the defective part among the nine it was calibrated on; the plain one absorbs it
    assert records["robust, mixed"] == {"images": 9, "unlabelled": True, "above_threshold": 1}
    assert records["plain, mixed"] == {"images": 9, "unlabelled": False, "above_threshold": 0}
    clean, robust, plain = thresholds["robust, good only"], thresholds["robust, mixed"], thresholds["plain, mixed"]
    assert abs(robust - clean) < 0.5 * abs(plain - clean)
    scores = [p.score for p in det.predict(parts["test"])]
    assert sum(s > robust for s in scores[4:]) >= 3
    with pytest.raises(ValueError, match="at least 8 unlabelled images, got 7"):
        det.calibrate(mixed[:7], unlabelled=True)


def test_reweighted_scores_share_one_scale_with_their_threshold(fake_backbones, parts):
    det = Detector("texture", image_score="reweight", **FAST).fit(parts["train"])
    preds = det.predict(parts["test"])
    normal_scores = [p.score for p in preds[:4]]
    # the threshold comes from reweighted held-out scores: good parts sit below it, not far under
    assert max(normal_scores) < det.threshold < 10 * max(normal_scores)
    assert all(p.is_anomalous for p in preds[4:])


def test_fit_is_deterministic(fake_backbones, parts):
    a = [p.score for p in Detector("semantic_adapter", **FAST).fit(parts["train"]).predict(parts["test"])]
    b = [p.score for p in Detector("semantic_adapter", **FAST).fit(parts["train"]).predict(parts["test"])]
    assert a == b


@pytest.mark.parametrize("strategy", ["semantic_adapter", "fusion_mul", "texture", "subspace"])
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
    meta, tensors = read_raw(det.save(tmp_path / "m.safetensors"))
    meta["format"] = 999
    with pytest.raises(ModelFileError, match="format 999"):
        Detector.load(write_raw(tmp_path / "future.safetensors", meta, tensors))
    meta["format"], meta["backbones"]["semantic"] = FORMAT_VERSION, "other_vit@x"
    with pytest.raises(ModelFileError, match="other_vit@x"):
        Detector.load(write_raw(tmp_path / "other.safetensors", meta, tensors))
    from safetensors.torch import save_file
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


def test_auto_experts_are_checked(fake_backbones, parts):
    with pytest.raises(ValueError, match="auto_experts must name experts"):
        Detector("auto", auto_experts=("texture", "nope"))
    with pytest.raises(ValueError, match="auto's default 'semantic'"):
        Detector("auto", auto_experts=("texture",), **FAST).fit(parts["train"][:2])


def test_adapter_trains_with_pasted_anomalies_from_both_groups(fake_backbones, parts):
    from astfad.detector import owner_group

    det = Detector("semantic_adapter", **FAST).fit(parts["train"][:4])
    assert "separation" in det.adapter_stats and "held_out_0_separation" in det.adapter_stats
    normal = det._normal_set(parts["train"][:4], [None] * 4, ["semantic"], True)
    negatives, owners = det._negatives(normal, "semantic")
    assert len(negatives) == len(owners) > 0
    assert set(owner_group(owners, False).tolist()) == {0, 1}  # each held-out copy keeps the other's


def test_reference_rotations_follow_the_frame():
    from astfad.detector import reference_angles

    assert reference_angles(1, 0.75, None) == tuple(range(45, 360, 45))  # a 4:3 frame turns fully
    assert reference_angles(4, 1.5, None) == tuple(range(45, 360, 45))
    assert reference_angles(1, 2.46, None) == (180.0,)  # a quarter turn of 2.5:1 is mostly fill
    assert reference_angles(8, 1.0, None) == () and reference_angles(1, 1.0, False) == ()


def test_batch_evidence_never_raises_a_score_and_keeps_rare_defects_first(fake_backbones, parts):
    det = Detector("fusion_add", **FAST).fit(parts["train"][:1])
    batch = parts["train"][1:] + parts["test"][:4] + parts["test"][4:6]  # 11 normal parts, 2 defective
    labels = [0] * 11 + [1] * 2
    plain = [p.score for p in det.predict(batch)]
    with_batch = det.predict(batch, batch_size=8, batch_evidence=True)  # 8 + 5: the short batch joins
    assert all(b.score <= score + 1e-6 for b, score in zip(with_batch, plain))
    assert sum(b.score < score - 1e-6 for b, score in zip(with_batch, plain)) >= 6  # the batch explains variation
    assert image_auroc(labels, [p.score for p in with_batch]) == 1.0
    with pytest.raises(ValueError, match="at least 8 images"):
        det.predict(batch[:5], batch_evidence=True)


def test_self_match_is_saved_and_a_file_from_before_loads_without_it(fake_backbones, parts, tmp_path):
    """The default detector discounts its semantic distances by the part's own look-alikes (maps
    never higher than without); a saved model keeps that, a file from before the setting loads
    with it off and scores as a detector fitted without it."""
    matched = Detector("semantic", **FAST).fit(parts["train"][:2])
    plain = Detector("semantic", self_match=0, **FAST).fit(parts["train"][:2])
    tile = np.random.default_rng(5).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    test = [*parts["test"], np.tile(tile, (4, 4, 1))]  # a pattern the shots lack, repeated on the part
    _, with_self = matched.maps_of(test, strategy="all")
    _, without = plain.maps_of(test, strategy="all")
    assert bool((with_self["semantic"] <= without["semantic"] + 1e-6).all())
    assert torch.allclose(with_self["semantic"][-1], without["semantic"][-1] * 0.5, rtol=0.05)
    path = matched.save(tmp_path / "matched.safetensors")
    assert [p.score for p in Detector.load(path).predict(test)] == [p.score for p in matched.predict(test)]
    meta, tensors = read_raw(plain.save(tmp_path / "plain.safetensors"))
    del meta["config"]["self_match"]
    before = Detector.load(write_raw(tmp_path / "before.safetensors", meta, tensors))
    assert before.config.self_match == 0
    assert [p.score for p in before.predict(test)] == [p.score for p in plain.predict(test)]


def test_score_border_is_saved_and_a_file_from_before_loads_without_it(fake_backbones, parts, tmp_path):
    """With `score_border` the image score leaves the map's edge out, for normal and test images
    alike: the same maps, scores read inside the border; a saved model keeps it, a file from before
    the setting loads with the whole map scored, as it was fitted."""
    bordered = Detector("semantic", score_border=0.1, **FAST).fit(parts["train"][:2])
    whole = Detector("semantic", score_border=0.0, **FAST).fit(parts["train"][:2])
    assert bordered.score_border == round(0.1 * FAST["eval_size"]) and whole.score_border == 0
    _, maps = bordered.maps_of(parts["test"], strategy="all")
    _, whole_maps = whole.maps_of(parts["test"], strategy="all")
    assert torch.equal(maps["semantic"], whole_maps["semantic"])
    inner = maps["semantic"][:, 11:-11, 11:-11]
    scores = [p.score for p in bordered.predict(parts["test"])]
    assert scores == pytest.approx(image_scores(inner, bordered.image_score).tolist(), rel=1e-5)
    assert scores != pytest.approx([p.score for p in whole.predict(parts["test"])], rel=1e-3)
    path = bordered.save(tmp_path / "bordered.safetensors")
    assert [p.score for p in Detector.load(path).predict(parts["test"])] == scores
    meta, tensors = read_raw(whole.save(tmp_path / "whole.safetensors"))
    del meta["config"]["score_border"]
    before = Detector.load(write_raw(tmp_path / "before.safetensors", meta, tensors))
    assert before.config.score_border == 0.0
    assert [p.score for p in before.predict(parts["test"])] == [p.score for p in whole.predict(parts["test"])]
