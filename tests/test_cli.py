"""End to end through the command line, on generated data, with stand-in backbones."""

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from astfad.cli import main
from astfad.detector import Detector

FAST = ["--set", "semantic_size=112", "--set", "texture_size=112", "--set", "eval_size=112",
        "--set", "adapter_steps=10"]


@pytest.fixture
def folders(tmp_path, parts):
    train, test = tmp_path / "train", tmp_path / "test"
    train.mkdir()
    test.mkdir()
    for i, image in enumerate(parts["train"]):
        Image.fromarray(image).save(train / f"good_{i}.png")
    for i, (image, label) in enumerate(zip(parts["test"], parts["labels"])):
        Image.fromarray(image).save(test / f"{'bad' if label else 'ok'}_{i}.png")
    (test / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return train, test


def test_fit_predict_round_trip(fake_backbones, folders, tmp_path):
    train, test = folders
    runner = CliRunner()
    model = tmp_path / "model.safetensors"
    result = runner.invoke(main, ["fit", "--train", str(train), "--strategy", "fusion_add", "--out", str(model), *FAST])
    assert result.exit_code == 0, result.output
    assert "fusion_add" in result.output and model.is_file()
    again = runner.invoke(main, ["fit", "--train", str(train), "--out", str(model), *FAST])
    assert again.exit_code == 2 and "exists" in again.output
    out = tmp_path / "pred"
    result = runner.invoke(main, ["predict", str(model), str(test), "--out", str(out)])
    assert result.exit_code == 1, result.output  # finished, with one failed input
    assert "broken.png" in result.output and "images/s" in result.output  # reported, the rest still ran
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 9
    broken = [r for r in rows if r["file"].endswith("broken.png")][0]
    assert broken["verdict"] == "error" and "broken.png" in broken["error"]
    scored = {r["file"].split("/")[-1]: r for r in rows if r["verdict"] != "error"}
    assert all(scored[n]["verdict"] == "anomalous" for n in scored if n.startswith("bad"))
    # the CLI's scores equal an in-memory detector's on the same images (fit -> save -> load -> predict)
    det = Detector.load(model)
    names = sorted(scored)  # the CLI's order and batch: identical inputs give identical scores
    for name, pred in zip(names, det.predict([test / n for n in names])):
        assert scored[name]["score"] == f"{pred.score:.6g}"
    assert len(list((out / "overlays").glob("*.jpg"))) == 8
    assert all(r["overlay"] == f"overlays/{Path(r['file']).stem}.jpg" for r in scored.values())
    mask = np.asarray(Image.open(out / "masks" / "bad_5.png"))
    assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    rerun = runner.invoke(main, ["predict", str(model), str(test), "--out", str(out)])
    assert rerun.exit_code == 2 and "predictions.csv" in rerun.output and "--resume" in rerun.output


def test_fit_with_a_pinned_map(fake_backbones, folders, tmp_path):
    train, _ = folders
    (tmp_path / "map.yaml").write_text("widget: fusion_max\n")
    model = tmp_path / "m.safetensors"
    result = CliRunner().invoke(main, ["fit", "--train", str(train), "--out", str(model), "--pinned",
                                       str(tmp_path / "map.yaml"), "--category", "widget", *FAST])
    assert result.exit_code == 0, result.output
    assert Detector.load(model).strategy == "fusion_max"
    result = CliRunner().invoke(main, ["fit", "--train", str(train), "--out", str(tmp_path / "n"),
                                       "--pinned", "paper", *FAST])
    assert result.exit_code == 2 and "--category" in result.output


def test_select_and_visualize(fake_backbones, folders, tmp_path):
    train, test = folders
    runner = CliRunner()
    model = tmp_path / "auto.safetensors"
    result = runner.invoke(main, ["select", "--train", str(train), "--shots", "4", "--out", str(model), *FAST])
    assert result.exit_code == 0, result.output
    assert "<- chosen" in result.output and "synthetic anomalies" in result.output
    result = runner.invoke(main, ["visualize", str(model), str(test / "bad_5.png"), str(test / "broken.png"),
                                  "--out", str(tmp_path / "vis")])
    assert result.exit_code == 1, result.output  # the broken image is named, the other drawn
    assert "broken.png" in result.output and (tmp_path / "vis" / "bad_5.png").is_file()


def test_clear_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["fit", "--train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "nowhere" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["predict", str(tmp_path / "missing.safetensors"), str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "missing.safetensors" in result.output
    result = runner.invoke(main, ["fit", "--train", str(tmp_path), "--out", str(tmp_path / "m"), "--set", "eval_size=abc"])
    assert result.exit_code == 2


def test_benchmark_is_resumable(fake_backbones, tmp_path):
    from astfad.data.synthetic import generate_synthetic_dataset
    from astfad.report import read_results

    data = generate_synthetic_dataset(tmp_path / "data", categories=["brick", "washer"], n_train=5,
                                      n_test_good=3, n_test_per_defect=2, size=112)
    out = tmp_path / "results"
    args = ["benchmark", "--data", str(data), "--shots", "1,2", "--seeds", "0",
            "--strategies", "texture", "--strategies", "fusion_add", "--strategies", "auto",
            "--out", str(out), *FAST]
    runner = CliRunner()
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = read_results(out / "results.csv")
    assert len(rows) == 2 * 2 * 3
    auto = [r for r in rows if r["strategy"] == "auto"]
    assert all(r["applied_strategy"] != "auto" for r in auto)
    assert all(0.0 <= r["image_auroc"] <= 1.0 for r in rows)
    assert (out / "summary.md").is_file() and (out / "auroc_vs_shots.png").is_file()
    assert list((out / "panels").rglob("*.png"))
    result = runner.invoke(main, args)
    assert "12 already finished, 0 to run" in result.output
    assert len(read_results(out / "results.csv")) == 12
    other = runner.invoke(main, [*args, "--set", "blur_sigma=2"])
    assert other.exit_code == 2 and "another configuration" in other.output
