"""End to end with the real offline backbones: generated data always, ../shared/data when present."""

import pytest
from click.testing import CliRunner

from astfad.benchmark import category_aspect, load_test_set
from astfad.cli import main
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.data.synthetic import generate_synthetic_dataset
from astfad.detector import Detector

from conftest import SHARED_DATA

pytestmark = pytest.mark.slow
SMALL = dict(semantic_size=224, texture_size=224, adapter_steps=30)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), categories=["brick", "washer"],
                                      n_train=8, n_test_good=4, n_test_per_defect=3, size=224)


def test_real_backbones_detect_synthetic_defects(synthetic):
    for category in scan_dataset(synthetic):
        det = Detector("fusion_add", **SMALL).fit([s.path for s in category.train[:4]])
        tests = load_test_set(category, det.eval_grid(), print)
        feats = det.extract(tests.images)
        maps = det.combine(det.strategy, det.expert_maps(feats))
        m = tests.metrics(det.scores(det.strategy, maps).numpy(), maps.numpy())
        assert m["image_auroc"] >= 0.8, (category.name, m)
        assert m["pixel_auroc"] >= 0.8, (category.name, m)


def test_cli_round_trip_gives_identical_scores(synthetic, tmp_path):
    train = synthetic / "washer" / "train" / "good"
    test = synthetic / "washer" / "test"
    model = tmp_path / "washer.safetensors"
    settings = [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(main, ["fit", "--train", str(train), "--shots", "4", "--out", str(model), *settings])
    assert result.exit_code == 0, result.output
    images = sorted(test.rglob("*.png"))
    fitted = Detector("auto", **SMALL).fit(sample_shots(sorted(train.glob("*.png")), 4, 0))
    loaded = Detector.load(model)
    assert loaded.strategy == fitted.strategy
    assert [p.score for p in loaded.predict(images)] == [p.score for p in fitted.predict(images)]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_shared_hazelnut_at_four_shots():
    (category,) = scan_dataset(SHARED_DATA, categories=["hazelnut"])
    shots = sample_shots(category.train, 4, 0)
    for strategy, image_min, pixel_min in (("texture", 0.95, 0.95), ("semantic", 0.95, 0.95)):
        det = Detector(strategy, aspect_ratio=category_aspect(category), **SMALL).fit([s.path for s in shots])
        tests = load_test_set(category, det.eval_grid(), print)
        feats = det.extract(tests.images, tests.keys)
        maps = det.combine(strategy, det.expert_maps(feats))
        m = tests.metrics(det.scores(strategy, maps, feats.get("texture")).numpy(), maps.numpy())
        assert m["image_auroc"] >= image_min and m["pixel_auroc"] >= pixel_min, (strategy, m)
