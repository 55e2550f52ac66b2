"""The benchmark on generated data with stand-in backbones: verdict measures, failed cells, panels
and identity checks on resume, and the independence of cells that lets Ray run them anywhere."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from astfad.benchmark import Benchmark, BenchmarkSpec
from astfad.cli import main
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.data.synthetic import generate_synthetic_dataset
from astfad.detector import Detector
from astfad.metrics import VERDICT_KEYS, verdict_metrics
from astfad.report import VERDICT_COLUMNS, read_failures, read_results, read_selections
from astfad.selection import choose_strategy, min_gain

FAST = {"semantic_size": 112, "texture_size": 112, "eval_size": 112, "adapter_steps": 10}
FAST_ARGS = [x for k, v in FAST.items() for x in ("--set", f"{k}={v}")]
TIMES = ("fit_seconds", "predict_seconds_per_image")


# ----------------------------------------------------------------------------- verdict_metrics

def test_verdicts_known_values():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.5, 0.4, 0.9]
    masks = np.zeros((4, 4, 4), bool)
    masks[2, :2, :2] = True  # 4 defect pixels
    masks[3, 0, :] = True  # 4 defect pixels
    maps = np.zeros((4, 4, 4))
    maps[0, 0, 0] = 1.0  # one false pixel on a good image
    maps[2, :2, :1] = 1.0  # 2 of 4 found, nothing extra: IoU 2/4, Dice 4/6
    maps[3, :2, :] = 1.0  # 4 of 4 found, 4 extra: IoU 4/8, Dice 8/12
    out = verdict_metrics(labels, scores, 0.45, masks, maps, 0.5)
    assert set(out) == set(VERDICT_KEYS) == set(VERDICT_COLUMNS)
    assert out["verdict_fpr"] == 0.5 and out["verdict_recall"] == 0.5  # 0.5 > 0.45 is a false alarm
    assert out["verdict_f1"] == pytest.approx(2 / (2 + 1 + 1))
    assert out["verdict_balanced_accuracy"] == pytest.approx(0.5)
    assert out["mask_iou"] == pytest.approx((2 / 4 + 4 / 8) / 2)  # per image, then the mean
    assert out["mask_dice"] == pytest.approx((4 / 6 + 8 / 12) / 2)
    assert out["pixel_fpr"] == pytest.approx(1 / 32)  # pooled over the good images' pixels
    assert verdict_metrics(labels, scores, 0.5)["verdict_fpr"] == 0.0  # strictly above, as predict


def test_an_always_yes_verdict_cannot_look_good():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 20 + [1] * 5)
    scores = rng.normal(size=25) + 2 * labels
    masks = np.zeros((25, 8, 8), bool)
    masks[20:, 2:4, 2:4] = True
    maps = rng.random((25, 8, 8))
    yes = verdict_metrics(labels, scores, scores.min() - 1, masks, maps, maps.min() - 1)
    assert yes["verdict_fpr"] == 1.0 and yes["verdict_recall"] == 1.0
    assert yes["verdict_balanced_accuracy"] == 0.5 and yes["verdict_f1"] == pytest.approx(10 / 30)
    assert yes["pixel_fpr"] == 1.0 and yes["mask_iou"] == pytest.approx(4 / 64)
    no = verdict_metrics(labels, scores, scores.max() + 1, masks, maps, maps.max() + 1)
    assert no["verdict_fpr"] == 0.0 and no["verdict_recall"] == 0.0
    assert no["verdict_balanced_accuracy"] == 0.5 and no["verdict_f1"] == 0.0
    assert no["pixel_fpr"] == 0.0 and no["mask_iou"] == 0.0


def test_undefined_verdicts_are_nan_and_bad_input_is_refused():
    out = verdict_metrics([0, 1], [0.2, 0.8], None, np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), None)
    assert all(math.isnan(v) for v in out.values())
    only_good = verdict_metrics([0, 0], [0.2, 0.8], 0.5)
    assert only_good["verdict_fpr"] == 0.5 and math.isnan(only_good["verdict_recall"])
    assert math.isnan(only_good["verdict_balanced_accuracy"])
    no_mask = verdict_metrics([0, 1], [0.2, 0.8], 0.5, np.zeros((2, 2, 2)), np.ones((2, 2, 2)), 0.5)
    assert math.isnan(no_mask["mask_iou"]) and no_mask["pixel_fpr"] == 1.0  # a defect without mask
    with pytest.raises(ValueError, match="NaN"):
        verdict_metrics([0, 1], [0.2, 0.8], math.nan)
    with pytest.raises(ValueError, match="both masks and maps"):
        verdict_metrics([0, 1], [0.2, 0.8], 0.5, masks=np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="3 masks"):
        verdict_metrics([0, 1], [0.2, 0.8], 0.5, np.zeros((3, 2, 2)), np.zeros((3, 2, 2)), 0.5)


# ----------------------------------------------------------------------------- the benchmark

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("bench") / "data", categories=["brick"],
                                      n_train=4, n_test_good=2, n_test_per_defect=1, size=112)


def bench_args(data, out, *more):
    return ["benchmark", "--data", str(data), "--shots", "1,2", "--seeds", "0,1", "--strategies",
            "texture,fusion_add,auto", "--out", str(out), *FAST_ARGS, *more]


def without_times(rows):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def same(a, b):
    """Row lists equal field by field, NaN equal to NaN."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == y[k] or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k])), (k, x, y)


def test_a_bad_data_path_leaves_out_untouched(tmp_path):
    runner = CliRunner()
    out = tmp_path / "results"
    result = runner.invoke(main, bench_args(tmp_path / "typo", out))
    assert result.exit_code == 2 and "typo" in result.output and not out.exists()
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, bench_args(tmp_path / "empty", out))
    assert result.exit_code == 2 and "empty" in result.output and not out.exists()


def test_run_records_verdicts_identity_and_redraws_damaged_panels(fake_backbones, dataset, tmp_path,
                                                                   monkeypatch):
    runner = CliRunner()
    out = tmp_path / "results"
    result = runner.invoke(main, bench_args(dataset, out))
    assert result.exit_code == 0, result.output
    rows = read_results(out / "results.csv")
    assert len(rows) == 2 * 2 * 3 and not (out / "failed.csv").exists()
    for row in rows:
        if row["strategy"] == "auto":  # auto always has thresholds: its verdicts are measured
            assert all(math.isfinite(row[c]) for c in VERDICT_COLUMNS), row
    summary = (out / "summary.md").read_text()
    assert "## Verdicts at the fitted thresholds" in summary and "Failed cells" not in summary
    # every auto cell's validation is recorded, and replaying the rule on it gives auto's choice
    selections = read_selections(out / "selection.csv")
    applied = {(r["category"], r["shots"], r["seed"]): r["applied_strategy"] for r in rows if r["strategy"] == "auto"}
    assert {(s["category"], s["shots"], s["seed"]): s["choice"] for s in selections} == applied
    for record in selections:
        assert choose_strategy(record["terms"], seed=record["seed"],
                               min_gain=min_gain(record["shots"])).choice == record["choice"]

    identity = json.loads((out / "run.json").read_text())
    assert identity["backbones"] == {"semantic": "fake_vit@test", "texture": "fake_cnn@test"}
    assert identity["astfad_version"] and "git_commit" in identity

    panels = out / "panels" / "brick"
    names = sorted(json.loads((panels / "panels.json").read_text()))
    assert names and sorted(p.name for p in panels.glob("*.png")) == names
    original = {n: (panels / n).read_bytes() for n in names}
    (panels / names[0]).write_bytes(original[names[0]][:100])  # cut by a crash or a full disk
    (panels / names[1]).unlink()
    result = runner.invoke(main, bench_args(dataset, out))
    assert result.exit_code == 0, result.output
    assert "12 already finished, 0 to run" in result.output
    assert {n: (panels / n).read_bytes() for n in names} == original  # redrawn, identical
    same(read_results(out / "results.csv"), rows)  # no row twice
    assert len(read_selections(out / "selection.csv")) == len(selections)

    monkeypatch.setattr("astfad.benchmark.__version__", "0.0.0-other")
    result = runner.invoke(main, bench_args(dataset, out))
    assert result.exit_code == 2 and "astfad_version" in result.output


def test_a_cell_that_cannot_run_is_reported_and_retried(fake_backbones, dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (category,) = scan_dataset(data)
    sampled = {(k, s): {x.path for x in sample_shots(category.train, k, s)} for k in (1, 2) for s in (0, 1)}
    broken = next(p for cell in sampled.values() for p in cell
                  if sum(p in c for c in sampled.values()) < len(sampled))
    failing = sorted(cell for cell, paths in sampled.items() if broken in paths)
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 2])  # its header still reads: the scan keeps it

    runner = CliRunner()
    out = tmp_path / "results"
    result = runner.invoke(main, bench_args(data, out))
    assert result.exit_code == 1, result.output
    assert "could not run" in result.output and broken.name in result.output
    rows = read_results(out / "results.csv")
    assert sorted({(r["shots"], r["seed"]) for r in rows}) == sorted(set(sampled) - set(failing))
    failures = read_failures(out / "failed.csv")
    assert sorted((f["shots"], f["seed"]) for f in failures) == failing
    assert all(broken.name in f["reason"] for f in failures)
    summary = (out / "summary.md").read_text()
    assert "## Failed cells" in summary and f"| brick | {failing[0][0]} | {failing[0][1]} |" in summary

    result = runner.invoke(main, bench_args(data, out))  # resumed: the failed cells are tried again
    assert result.exit_code == 1 and f"{3 * len(failing)} to run" in result.output
    assert len(read_failures(out / "failed.csv")) == 2 * len(failing)

    broken.write_bytes(good_bytes)  # repaired: the rerun finishes the run
    result = runner.invoke(main, bench_args(data, out))
    assert result.exit_code == 0, result.output
    assert len(read_results(out / "results.csv")) == 12
    assert "Failed cells" not in (out / "summary.md").read_text()


def test_cells_do_not_depend_on_the_cells_run_before(fake_backbones, dataset, tmp_path):
    """Every cell starts from the same prepared features, so any executor may run any subset of
    cells in any order (the basis of the Ray executor's equality with the local one)."""
    spec = dict(data=dataset, shots=(1, 2), strategies=("texture", "fusion_add", "auto"), config=FAST)
    everything = Benchmark(BenchmarkSpec(out=tmp_path / "a", seeds=(0, 1), **spec), progress=False).run()
    alone = Benchmark(BenchmarkSpec(out=tmp_path / "b", seeds=(1,), **spec), progress=False).run()
    same(without_times([r for r in everything if r["seed"] == 1]), without_times(alone))


def test_what_auto_validates_never_changes_a_fixed_strategys_row(fake_backbones, dataset, tmp_path, monkeypatch):
    """auto has a detector of its own: the image-score rule it validates applies to its row only."""
    monkeypatch.setattr("astfad.detector.choose_image_score",
                        lambda evidence, default, shots, max_above: {"choice": "max", "reason": "forced", "separation": {}})
    searched = []  # the test set's maps per expert: auto's detector reuses those of equal experts
    original = Detector.expert_maps
    monkeypatch.setattr(Detector, "expert_maps", lambda self, feats, exclude=None, experts=None, **kw: (
        searched.extend(experts or []), original(self, feats, exclude, experts, **kw))[1])
    spec = dict(data=dataset, shots=(2,), seeds=(0,), config=FAST)
    both = Benchmark(BenchmarkSpec(out=tmp_path / "a", strategies=("semantic", "subspace", "auto"), **spec),
                     progress=False).run()
    assert sorted(searched) == ["semantic", "subspace"]
    fixed = Benchmark(BenchmarkSpec(out=tmp_path / "b", strategies=("semantic", "subspace"), **spec),
                      progress=False).run()
    same(without_times([r for r in both if r["strategy"] != "auto"]), without_times(fixed))
    with_max = Benchmark(BenchmarkSpec(out=tmp_path / "c", strategies=("semantic", "subspace"),
                                       **{**spec, "config": {**FAST, "image_score": "max"}}), progress=False).run()
    (auto,) = [r for r in both if r["strategy"] == "auto"]
    (applied,) = [r for r in with_max if r["strategy"] == auto["applied_strategy"]]
    assert auto["image_auroc"] == applied["image_auroc"] and auto["verdict_fpr"] == applied["verdict_fpr"]


@pytest.mark.parametrize("test_flip", [True, None])
def test_a_test_flip_row_scores_as_the_fitted_detector_predicts(fake_backbones, dataset, tmp_path, monkeypatch,
                                                                test_flip):
    """With the flip the benchmark maps the test set's mirror images too: each row's image AUROC is
    that of the same detector's predict; by default only cells above FEW_SHOTS shots flip."""
    from astfad.benchmark import category_aspect
    from astfad.metrics import image_auroc

    monkeypatch.setattr("astfad.config.FEW_SHOTS", 1)
    config = {**FAST, "test_flip": test_flip}
    rows = Benchmark(BenchmarkSpec(data=dataset, out=tmp_path / "a", shots=(1, 2), seeds=(0,),
                                   strategies=("semantic",), config=config), progress=False).run()
    (category,) = scan_dataset(dataset)
    for row in rows:
        det = Detector("semantic", seed=0, aspect_ratio=category_aspect(category), **config)
        det.fit([s.path for s in sample_shots(category.train, row["shots"], 0, "random")])
        assert det.test_flip == (test_flip or row["shots"] > 1)
        scores = [p.score for p in det.predict([s.path for s in category.test])]
        assert row["image_auroc"] == pytest.approx(image_auroc([s.label for s in category.test], scores))


def test_own_grid_rows_score_as_the_fitted_detector_predicts(fake_backbones, batch_data, tmp_path, monkeypatch):
    """test_grid "own" on a test set of two image shapes (two good parts widened to 2:1): each
    group of the test set is read on its own grid, and each row's image AUROC is that of the same
    detector's predict, with and without the flip; zero-shot still scores on the category's grid."""
    from PIL import Image

    from astfad.benchmark import category_aspect
    from astfad.metrics import image_auroc

    data = tmp_path / "data"
    shutil.copytree(batch_data, data)
    good = sorted((data / "brick" / "test" / "good").iterdir())[:2]
    for path in good:
        image = np.asarray(Image.open(path).convert("RGB"))
        Image.fromarray(np.concatenate([image, image[:, ::-1]], axis=1)).save(path)
    monkeypatch.setattr("astfad.config.FEW_SHOTS", 1)
    read = []  # (aspect, images) of every feature extraction
    original = Detector.features
    monkeypatch.setattr(Detector, "features", lambda self, family, images, keys=None, mirrored=False, aspect=None: (
        read.append((aspect or self.aspect, len(images))), original(self, family, images, keys, mirrored, aspect))[1])
    config = {**FAST, "test_grid": "own"}
    rows = Benchmark(BenchmarkSpec(data=data, out=tmp_path / "a", shots=(0, 1, 2), seeds=(0,),
                                   strategies=("semantic", "zero_shot"), config=config), progress=False).run()
    assert (2.0, 2) in read  # the widened parts, together, unsquashed
    assert sorted((r["shots"], r["strategy"]) for r in rows) == [(0, "zero_shot"), (1, "semantic"), (2, "semantic")]
    (category,) = scan_dataset(data)
    for row in (r for r in rows if r["shots"]):
        det = Detector("semantic", seed=0, aspect_ratio=category_aspect(category), **config)
        det.fit([s.path for s in sample_shots(category.train, row["shots"], 0, "random")])
        assert det.test_flip == (row["shots"] > 1)
        scores = [p.score for p in det.predict([s.path for s in category.test])]
        assert row["image_auroc"] == pytest.approx(image_auroc([s.label for s in category.test], scores))


def test_a_results_file_of_another_format_is_refused_before_any_work(fake_backbones, dataset, tmp_path):
    out = tmp_path / "results"
    spec = BenchmarkSpec(data=dataset, out=out, shots=(1,), seeds=(0,), strategies=("texture",), config=FAST)
    Benchmark(spec, progress=False).run()
    lines = (out / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, c in enumerate(header) if c not in VERDICT_COLUMNS]
    old = "\n".join(",".join(line.split(",")[i] for i in keep) for line in lines[:1]) + "\n"
    (out / "results.csv").write_text(old)  # an older astfad's header, no rows yet
    with pytest.raises(ValueError, match="columns differ.*missing: verdict_fpr"):
        Benchmark(spec, progress=False).run()
    assert (out / "results.csv").read_text() == old


def test_importing_the_benchmark_does_not_import_ray():
    code = "import sys, astfad.benchmark, astfad.cli; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ----------------------------------------------------------------------------- zero-shot

@pytest.fixture(scope="module")
def batch_data(tmp_path_factory):
    """16 test images (10 good, 6 defective): one zero-shot batch at the default size, two of 8."""
    return generate_synthetic_dataset(tmp_path_factory.mktemp("zero") / "data", categories=["brick"],
                                      n_train=2, n_test_good=10, n_test_per_defect=2, size=112)


def zero_args(data, out, shots="0,1", strategies="semantic,zero_shot"):
    return ["benchmark", "--data", str(data), "--shots", shots, "--seeds", "0,1", "--strategies", strategies,
            "--out", str(out), *FAST_ARGS]


def test_zero_shot_runs_at_zero_shots_only_and_scores_as_predict_does(fake_backbones, batch_data, tmp_path):
    from astfad.detector import Detector
    from astfad.metrics import image_auroc

    runner = CliRunner()
    out = tmp_path / "results"
    result = runner.invoke(main, zero_args(batch_data, out))
    assert result.exit_code == 0, result.output
    assert "4 cells, 0 already finished, 4 to run" in result.output
    rows = read_results(out / "results.csv")
    assert sorted((r["shots"], r["strategy"]) for r in rows) == [(0, "zero_shot")] * 2 + [(1, "semantic")] * 2
    zero = [r for r in rows if r["strategy"] == "zero_shot"]
    for row in zero:
        assert row["applied_strategy"] == "zero_shot" and row["shot_files"] == "" and row["fit_seconds"] == 0
        assert row["image_auroc"] >= 0.75 and row["pixel_auroc"] >= 0.75 and 0 < row["aupro"] <= 1
        assert all(math.isfinite(row[c]) for c in VERDICT_COLUMNS), row  # thresholds from the batch
        assert row["predict_seconds_per_image"] > 0

    # one batch here: the cell scores exactly as `Detector.predict_zero_shot` scores the test set
    (category,) = scan_dataset(batch_data)
    det = Detector("semantic", **FAST)
    preds = det.predict_zero_shot([s.path for s in category.test])
    labels = [s.label for s in category.test]
    seed0 = next(r for r in zero if r["seed"] == 0)
    assert seed0["image_auroc"] == pytest.approx(image_auroc(labels, [p.score for p in preds]), abs=1e-6)
    said = np.array([p.is_anomalous for p in preds])
    assert seed0["verdict_fpr"] == pytest.approx(said[np.array(labels) == 0].mean(), abs=1e-6)
    assert seed0["verdict_recall"] == pytest.approx(said[np.array(labels) == 1].mean(), abs=1e-6)

    summary = (out / "summary.md").read_text()
    from test_report import section, table_row

    zero_table = section(summary, "## Image AUROC", "### 0-shot")
    assert table_row(zero_table, "zero_shot")[1].startswith(f"{100 * seed0['image_auroc']:.1f}")
    assert table_row(section(summary, "## Image AUROC", "### All categories"), "zero_shot")[2] == "–"
    assert table_row(section(summary, "## Verdicts at the fitted thresholds", "### 0-shot"), "zero_shot")
    assert "### 0-shot" not in section(summary, "## astfad (`auto`) vs baseline `texture` (PatchCore)")
    assert (out / "auroc_vs_shots.png").exists() and (out / "per_category_1shot.png").exists()
    assert sorted(p.name for p in (out / "panels").iterdir()) == ["brick"]  # drawn at 1 shot only

    result = runner.invoke(main, zero_args(batch_data, out))
    assert result.exit_code == 0, result.output
    assert "4 cells, 4 already finished, 0 to run" in result.output
    same(read_results(out / "results.csv"), rows)


def test_zero_shot_batches_follow_the_seed(fake_backbones, batch_data, tmp_path, monkeypatch):
    monkeypatch.setattr("astfad.benchmark.ZERO_SHOT_BATCH", 8)  # two batches of 8

    def run(out, seeds):
        spec = BenchmarkSpec(data=batch_data, out=tmp_path / out, shots=(0,), seeds=seeds,
                             strategies=("zero_shot",), config=FAST)
        return without_times(Benchmark(spec, progress=False).run())

    both = run("a", (0, 1))
    assert both[0]["pixel_auroc"] != both[1]["pixel_auroc"]  # other seed, other batches
    same(run("b", (1,)), both[1:])  # the same seed draws the same batches


def test_zero_shot_plans_are_checked_and_small_test_sets_fail_by_name(fake_backbones, dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "results"
    for shots, strategies, message in (("1", "zero_shot", "add 0 to --shots"),
                                       ("0", "semantic", "add it to --strategies"),
                                       ("0,1", "zero_shot", "alone runs only at 0 shots")):
        result = runner.invoke(main, zero_args(dataset, out, shots, strategies))
        assert result.exit_code == 2 and message in result.output, result.output
        assert not out.exists()
    result = runner.invoke(main, zero_args(dataset, out, "0", "zero_shot"))  # 5 test images
    assert result.exit_code != 0
    assert [f["reason"] for f in read_failures(out / "failed.csv")] == \
        ["ValueError: zero-shot scoring needs a batch of at least 8 images, got 5"] * 2
