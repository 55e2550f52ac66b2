"""Nothing lost, nothing crashes (issue 11): crash-safe predict outputs and resume, bounded memory,
validated model files that never reach the network, one-line errors, every bad input a row; plus
lean model files (issue 10). Stand-in backbones throughout, so the whole file runs in seconds."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import astfad.detector
import astfad.pipeline
from astfad.cli import main
from astfad.data.images import ImageLoadError, load_image, scan_images, write_atomically
from astfad.detector import Detector, ModelFileError
from astfad.modelfile import payload_checksum
from astfad.pipeline import iter_predictions, plan_batches
from astfad.visualize import overlay, save_mask
from conftest import REPO, fake_load_backbone, make_part, read_raw, write_raw

FAST = dict(semantic_size=112, texture_size=112, eval_size=112, adapter_steps=10)
FAST_ARGS = [arg for key, value in FAST.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def fakes():
    """The stand-in backbones for every test of this module (module scope: models are fitted once)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(astfad.detector, "load_backbone", fake_load_backbone)
        yield


def train_parts() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [make_part(rng)[0] for _ in range(4)]


@pytest.fixture(scope="module")
def fitted(fakes):
    """A fusion_add detector that also fitted the adapter, with PCA background masks: every kind
    of tensor a model file can hold."""
    return Detector("fusion_add", mask_background=True, **FAST).fit(train_parts(), also=("semantic_adapter",))


@pytest.fixture(scope="module")
def model(fitted, tmp_path_factory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture(scope="module")
def full_model(fitted, tmp_path_factory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("model") / "full.safetensors", keep_candidates=True)


def write_images(folder: Path, count: int, seed: int = 1, size: int = 112) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        paths.append(folder / f"img_{i:03d}.png")
        Image.fromarray(make_part(rng, size, defect=i % 3 == 0)[0]).save(paths[-1])
    return paths


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def predict(*args: str):
    return CliRunner().invoke(main, ["predict", *map(str, args)])


# ---------------------------------------------------------------------------- 1. crash-safe outputs

SLOW_CLI = """
import sys, time
sys.path.insert(0, {tests!r})
import astfad.detector, astfad.pipeline
from conftest import fake_load_backbone
astfad.detector.load_backbone = fake_load_backbone
decode = astfad.pipeline.decode
def slow_decode(*args, **kwargs):
    time.sleep(0.05)  # slow enough for the test to kill it half way
    return decode(*args, **kwargs)
astfad.pipeline.decode = slow_decode
from astfad.cli import main
main()
"""


def test_predict_killed_by_sigkill_resumes_to_the_rows_of_an_uninterrupted_run(model, tmp_path):
    images = tmp_path / "images"
    write_images(images, 24)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    command = [sys.executable, "-c", SLOW_CLI.format(tests=str(REPO / "tests")), "predict", str(model),
               str(images), "--batch-size", "4", "--out"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, str(cut)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (cut / "predictions.csv").is_file() and (cut / "predictions.csv").read_text().count("\n") >= 6:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = rows_of(cut)
    assert 5 <= len(written) < 25, "the run was not cut off half way"
    assert all((cut / r["overlay"]).is_file() for r in written if r["overlay"])  # a row comes after its files

    resumed = subprocess.run([*command, str(cut), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 1, resumed.stderr  # finished; broken.png is a failed input
    assert f"{len(written)} image(s) already in" in resumed.stdout
    uninterrupted = subprocess.run([*command, str(whole)], env=env, capture_output=True, text=True)
    assert uninterrupted.returncode == 1, uninterrupted.stderr
    assert len(rows_of(whole)) == 25 and rows_of(cut) == rows_of(whole)
    for folder in ("overlays", "masks"):
        names = sorted(p.name for p in (whole / folder).iterdir())
        assert sorted(p.name for p in (cut / folder).iterdir()) == names  # no temporary file left
        assert all((cut / folder / n).read_bytes() == (whole / folder / n).read_bytes() for n in names)


def test_resume_repairs_a_cut_off_last_row(model, tmp_path):
    images = tmp_path / "images"
    write_images(images, 5)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert predict(model, images, "--out", whole).exit_code == 0
    text = (whole / "predictions.csv").read_text()
    cut.mkdir()
    (cut / "predictions.csv").write_text(text[: text.index("img_002") + 20])  # mid-row, no newline
    result = predict(model, images, "--out", cut, "--resume")
    assert result.exit_code == 0, result.output
    assert "repaired a cut-off last row" in result.output and "2 image(s) already in" in result.output
    assert rows_of(cut) == rows_of(whole)


def test_files_are_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "x.png"

    def half_then_disk_full(tmp: Path) -> None:
        tmp.write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, half_then_disk_full)
    assert list(tmp_path.iterdir()) == []  # neither a truncated file nor a temporary one
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        write_atomically(target, half_then_disk_full)
    assert target.read_bytes() == b"old"


# ---------------------------------------------------------------------------- 2. one-pixel images

def test_one_pixel_high_or_wide_images_are_scored_not_a_batch_stop(model, tmp_path):
    images = tmp_path / "images"
    write_images(images, 2)
    rng = np.random.default_rng(0)
    for name, shape in {"a_1x1.png": (1, 1), "b_1x9.png": (1, 9), "c_9x1.png": (9, 1)}.items():
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "out"
    result = predict(model, images, "--out", out)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 5 and all(r["verdict"] in ("normal", "anomalous") for r in rows)
    assert np.asarray(Image.open(out / "masks" / "b_1x9.png")).shape == (1, 9)
    assert np.asarray(Image.open(out / "overlays" / "c_9x1.jpg")).shape == (9, 1, 3)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1)])
def test_overlay_and_mask_keep_a_one_pixel_side(tmp_path, shape):
    image = np.zeros((*shape, 3), np.uint8)
    assert overlay(image, np.ones(shape, np.float32), 0.0, 1.0).shape == (*shape, 3)
    assert overlay(image, np.ones((1, *shape), np.float32), 0.0, 1.0).shape == (*shape, 3)
    save_mask(np.ones(shape, bool), tmp_path / "m.png")
    assert np.asarray(Image.open(tmp_path / "m.png")).shape == shape


# ---------------------------------------------------------------------------- 3. bounded memory

def test_max_pixels_refuses_with_one_row_and_downscale_scores(model, tmp_path):
    images = tmp_path / "images"
    write_images(images, 1)
    Image.fromarray(np.full((200, 300, 3), 120, np.uint8)).save(images / "big.png")
    refused, shrunk = tmp_path / "refused", tmp_path / "shrunk"
    result = predict(model, images, "--out", refused, "--max-pixels", "20000")
    assert result.exit_code == 1
    big = [r for r in rows_of(refused) if r["file"].endswith("big.png")][0]
    assert big["verdict"] == "error" and "300x200" in big["error"] and "limit of 0.0 MP" not in big["error"]
    assert sum("big.png" in line for line in result.output.splitlines()) == 1
    result = predict(model, images, "--out", shrunk, "--max-pixels", "20000", "--downscale")
    assert result.exit_code == 0 and "1 image(s) over" in result.output
    h, w = np.asarray(Image.open(shrunk / "masks" / "big.png")).shape
    assert h * w <= 20000 and abs(w / h - 1.5) < 0.02


def test_pixel_budget_is_checked_on_the_header_before_decoding(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, "PNG")
    path = tmp_path / "bomb.png"
    path.write_bytes(buffer.getvalue()[:200])  # a header with no pixel data behind it
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*5000x5000.*over the limit"):
        load_image(path, max_pixels=1_000_000)
    jpeg = tmp_path / "large.jpg"
    Image.fromarray(np.full((600, 800, 3), 90, np.uint8)).save(jpeg)
    h, w, _ = load_image(jpeg, max_pixels=50_000, downscale=True).shape
    assert h * w <= 50_000 and (h, w) == (193, 258)


def test_overlay_of_a_camera_image_needs_no_full_size_float64(tmp_path):
    image = np.zeros((3000, 4000, 3), np.uint8)
    anomaly = np.linspace(0, 1, 3000 * 4000, dtype=np.float32).reshape(3000, 4000)
    tracemalloc.start()
    out = overlay(image, anomaly, 0.0, 1.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.dtype == np.uint8 and out.shape == (3000, 4000, 3)
    assert peak < 110e6  # the map's RGBA float64 alone was 384 MB


def test_pipeline_decodes_one_batch_ahead_on_a_thread_and_keeps_order(fitted, tmp_path, monkeypatch):
    paths = write_images(tmp_path, 10)
    paths.insert(3, tmp_path / "missing.png")
    decoded, threads = [], set()
    real = astfad.pipeline.load_image

    def counting(*args, **kwargs):
        decoded.append(args[0])
        threads.add(__import__("threading").current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(astfad.pipeline, "load_image", counting)
    cached = len(fitted.cache)
    items = iter_predictions(fitted, paths, batch_size=3)
    first = next(items)
    time.sleep(0.2)
    assert len(decoded) <= 6  # the batch being handed out and the next one, no more
    rest = list(items)
    assert [i.path for i in [first, *rest]] == paths
    assert rest[2].error is not None and "no such file" in rest[2].error and rest[2].prediction is None
    assert all(t.startswith("astfad-decode") for t in threads)
    pred = first.prediction
    assert pred.anomaly_map.dtype == np.float32 and pred.anomaly_map.shape == first.image.shape[:2]
    assert len(fitted.cache) == cached  # test images are not cached


def test_batches_are_bounded_by_pixels_as_well_as_by_count(tmp_path, monkeypatch):
    paths = write_images(tmp_path, 5)  # 112 x 112 = 12544 pixels each
    monkeypatch.setattr(astfad.pipeline, "BATCH_PIXELS", 30_000)
    assert plan_batches(paths, batch_size=16) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert plan_batches(paths, batch_size=1) == [slice(i, i + 1) for i in range(5)]
    assert plan_batches([tmp_path / "missing.png", *paths[:2]], 16) == [slice(0, 3)]  # unreadable: 0


# ---------------------------------------------------------------------------- 4. no overwrite

def test_predict_never_overwrites_without_force_and_force_removes_only_stale_outputs(model, tmp_path):
    images = tmp_path / "images"
    write_images(images, 2)
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "img_000.jpg").write_bytes(b"the user's own picture")
    result = predict(model, images, "--out", out)
    assert result.exit_code == 2 and "img_000.jpg" in result.output and "--force" in result.output
    assert (out / "overlays" / "img_000.jpg").read_bytes() == b"the user's own picture"
    (out / "overlays" / "img_000.jpg").unlink()
    assert predict(model, images, "--out", out).exit_code == 0
    (out / "overlays" / "stale.png").write_bytes(b"from an older run")
    (out / "overlays" / "notes.txt").write_text("not astfad's")
    assert predict(model, images / "img_001.png", "--out", out, "--force").exit_code == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["img_001.jpg", "notes.txt"]
    assert [r["file"] for r in rows_of(out)] == [str(images / "img_001.png")]
    assert predict(model, images, "--out", out, "--force", "--resume").exit_code == 2


# ---------------------------------------------------------------------------- 5. validated model files

def drop(key):
    """A metadata field removed."""
    return lambda meta, tensors: ({k: v for k, v in meta.items() if k != key}, tensors)


def put(key, value, inside=None):
    """A metadata field (of the `inside` object) set to `value`."""
    def mutate(meta, tensors):
        if inside is None:
            return {**meta, key: value}, tensors
        return {**meta, inside: {**meta[inside], key: value}}, tensors
    return mutate


def tensor(key, change):
    """One tensor changed (None: removed), with a checksum that matches the change: the defect
    must be found by the structure checks, not by the checksum."""
    def mutate(meta, tensors):
        tensors = dict(tensors)
        old = tensors.pop(key)
        value = change(old) if change else None
        if value is not None:
            tensors[key] = value.contiguous()
        return {**meta, "checksum": payload_checksum(tensors)}, tensors
    return mutate


def as_is(meta, tensors):
    return meta, tensors


MALFORMED = {  # name: (mutation, raw metadata text or None, expected in the message)
    "broken JSON": (as_is, "{not json", "not valid JSON"),
    "not an object": (as_is, "[1, 2]", "JSON object"),
    "missing config": (drop("config"), None, "'config' is missing"),
    "missing normalisers": (drop("normalisers"), None, "'normalisers'"),
    "missing threshold": (drop("threshold"), None, "'threshold' is missing"),
    "missing experts": (drop("experts"), None, "'experts' is missing"),
    "missing strategy": (drop("strategy"), None, "'strategy' is missing"),
    "missing checksum": (drop("checksum"), None, "'checksum' is missing"),
    "threshold as a string": (put("threshold", "0.5"), None, "'threshold' must be"),
    "NaN threshold": (put("threshold", float("nan")), None, "'threshold' must be a finite"),
    "unknown config key": (put("colour", 1, inside="config"), None, "colour"),
    "mistyped config value": (put("texture_size", "abc", inside="config"), None,
                              "'texture_size' must be a whole number"),
    "foreign device": (put("device", "toaster", inside="config"), None, "config.device"),
    "unknown strategy": (put("strategy", "bogus"), None, "'strategy' unknown strategy"),
    "unknown expert": (put("experts", ["texture", "semantic", "dreams"]), None, "'experts'"),
    "strategy without its expert": (put("experts", ["semantic"]), None, "lacks texture"),
    "short normaliser": (put("applied", [1.0], inside="normalisers"), None, "'normalisers.applied'"),
    "negative normaliser scale": (put("texture", [0, -1, 1], inside="normalisers"), None, "normalisers.texture.scale"),
    "bad threshold model": (put("threshold_models", {"texture": {"image": {}}}), None, "threshold_models.texture"),
    "bank of the wrong rank": (tensor("texture.bank", lambda t: t[:, 0]), None, "texture.bank"),
    "owners of another length": (tensor("semantic.owners", lambda t: t[:-1]), None, "semantic.owners"),
    "bank full of NaN": (tensor("semantic.bank", lambda t: torch.full_like(t, float("nan"))), None, "NaN"),
    "missing bank": (tensor("texture.bank", None), None, "texture.bank"),
    "PCA of the wrong length": (tensor("semantic.pca_mean", lambda t: torch.zeros(3)), None, "semantic.pca_mean"),
    "stray tensor": (lambda m, t: tensor("texture.bank", lambda b: b)(m, {**t, "extra": torch.zeros(2)}), None,
                     "belongs to no saved expert"),
    "flipped tensor byte": (lambda m, t: (m, {**t, "texture.bank": t["texture.bank"] * 1.0001}), None, "checksum"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_every_malformed_model_file_is_one_model_file_error_naming_file_and_field(model, tmp_path, case):
    mutate, header, expected = MALFORMED[case]
    meta, tensors = mutate(*read_raw(model))
    path = write_raw(tmp_path / "bad.safetensors", meta, tensors, header)
    with pytest.raises(ModelFileError) as info:
        Detector.load(path)
    message = str(info.value)
    assert "bad.safetensors" in message and expected in message and "\n" not in message


def test_a_flipped_bit_in_the_tensor_data_is_caught_by_the_checksum(model, tmp_path):
    data = bytearray(model.read_bytes())
    data[-5] ^= 0x10  # in the last tensor's data, far from the header
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        Detector.load(tmp_path / "flipped.safetensors")


# ---------------------------------------------------------------------------- 6. no network on load

def test_loading_never_fetches_or_reads_weights_named_in_the_file(model, tmp_path, monkeypatch):
    import astfad.backbones.weights as weights

    def no_network(*args, **kwargs):
        raise AssertionError("a model load tried to download")

    monkeypatch.setattr(weights, "_download", no_network)
    meta, tensors = read_raw(model)
    meta["config"]["texture_weights"] = "http://example.invalid/evil.pth"
    path = write_raw(tmp_path / "url.safetensors", meta, tensors)
    with pytest.raises(ModelFileError, match=r"url\.safetensors.*texture_weights=.*pass the weights again"):
        Detector.load(path)
    loaded = Detector.load(path, texture_weights="/my/own/copy.pth")  # the caller names them: used
    assert loaded.config.texture_weights == "/my/own/copy.pth"
    meta["config"].update(texture_weights=None, semantic_backbone="dinov2_vitb14")  # default source is a URL
    uncached = write_raw(tmp_path / "vitb.safetensors", meta, tensors)
    monkeypatch.setenv("ASTFAD_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelFileError, match="never downloads"):
        Detector.load(uncached)


# ---------------------------------------------------------------------------- 8. filesystem errors

def one_line_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert all(word in lines[0] for word in words), lines[0]


def test_filesystem_errors_are_one_line_naming_the_path(fakes, model, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    runner = CliRunner()
    one_line_error(runner.invoke(main, ["scan", str(a_file)]), "file.txt", "Not a directory")
    images = tmp_path / "images"
    write_images(images, 2)
    one_line_error(predict(model, images, "--out", a_file), "file.txt")
    one_line_error(predict(model, images, "--out", a_file / "below"), "file.txt")
    folder = tmp_path / "models"
    folder.mkdir()
    result = runner.invoke(main, ["fit", "--train", str(images), "--out", str(folder), "--force", *FAST_ARGS])
    one_line_error(result, "models", "directory")  # refused before fitting: no "fitting" line
    one_line_error(predict(folder, images, "--out", tmp_path / "o"), "models", "directory")


def test_a_full_disk_is_one_line_and_keeps_the_rows_written(model, tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_images(images, 3)
    real, calls = astfad.visualize.save_image, []

    def disk_full_on_the_second(array, path):
        calls.append(path)
        if len(calls) == 3:  # overlay of the second image
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(array, path)

    monkeypatch.setattr(astfad.visualize, "save_image", disk_full_on_the_second)
    out = tmp_path / "out"
    one_line_error(predict(model, images, "--out", out), "No space left on device", "img_001.jpg")
    assert [Path(r["file"]).name for r in rows_of(out)] == ["img_000.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_permission_denied_is_one_line(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    write_images(tmp_path / "images", 1)
    one_line_error(predict(model, tmp_path / "images", "--out", locked / "out"), "Permission denied", "locked")


# ---------------------------------------------------------------------------- 9. paths and options

def test_every_bad_input_named_or_in_a_folder_is_a_row(model, tmp_path):
    named, folder = tmp_path / "named", tmp_path / "folder"
    for where in (named, folder):
        write_images(where, 1)
        Image.new("RGB", (8, 8)).save(where / "anim.gif")
        (where / "dangling.png").symlink_to(where / "nowhere.png")
        (where / "looks_like.jpg").mkdir()
    out = tmp_path / "out"
    result = predict(model, named / "img_000.png", named / "anim.gif", named / "dangling.png",
                     named / "looks_like.jpg", named / "missing.png", folder, "--out", out)
    assert result.exit_code == 1, result.output
    rows = {Path(r["file"]).relative_to(tmp_path).as_posix(): r for r in rows_of(out)}
    errors = {name: r["error"] for name, r in rows.items() if r["verdict"] == "error"}
    assert rows["named/img_000.png"]["verdict"] != "error" and rows["folder/img_000.png"]["verdict"] != "error"
    for where in ("named", "folder"):
        assert "GIF is not supported" in errors[f"{where}/anim.gif"]
        assert "dangling symbolic link" in errors[f"{where}/dangling.png"]
    assert "is a directory" in errors["folder/looks_like.jpg"]
    assert "no images found" in errors["named/looks_like.jpg"]  # a named folder is listed: it is empty
    assert "no such file" in errors["named/missing.png"]
    assert len(errors) == 7 and all(f"'{tmp_path}" in e for e in errors.values())
    assert [p.name for p, _ in scan_images(folder)] == ["anim.gif", "dangling.png", "img_000.png", "looks_like.jpg"]


def test_shots_must_be_positive_and_set_names_the_key_and_type(fakes, tmp_path):
    write_images(tmp_path / "train", 2)
    runner = CliRunner()
    fit = ["fit", "--train", str(tmp_path / "train"), "--out", str(tmp_path / "m.safetensors")]
    result = runner.invoke(main, [*fit, "--shots", "0"])
    assert result.exit_code == 2 and "--shots" in result.output
    result = runner.invoke(main, [*fit, "--set", "texture_size=abc"])
    assert result.exit_code == 2 and "'texture_size' must be a whole number, got 'abc'" in result.output
    result = runner.invoke(main, [*fit, "--set", "rotate_references=maybe"])
    assert result.exit_code == 2 and "'rotate_references' must be true or false or null" in result.output
    result = runner.invoke(main, [*fit, "--set", "colour=red"])
    assert result.exit_code == 2 and "colour" in result.output
    result = runner.invoke(main, [*fit, "--set", "adapter_lr=1e-3", "--strategy", "texture", *FAST_ARGS])
    assert result.exit_code == 0, result.output
    assert Detector.load(tmp_path / "m.safetensors").config.adapter_lr == 1e-3


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_model_permissions_follow_the_umask(fitted, tmp_path, umask):
    old = os.umask(umask)
    try:
        path = fitted.save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_exit_codes_are_documented():
    text = CliRunner().invoke(main, ["--help"]).output
    assert "Exit codes" in text and "0  done" in text and "1  done, but" in text and "2  stopped" in text


# ---------------------------------------------------------------------------- lean model files

def test_a_model_file_holds_and_loads_only_what_its_strategy_needs(fitted, model, full_model, tmp_path, monkeypatch):
    assert read_raw(model)[0]["experts"] == ["semantic", "texture"]
    assert read_raw(full_model)[0]["experts"] == ["semantic", "semantic_adapter", "texture"]
    alone = Detector("fusion_add", mask_background=True, **FAST).fit(train_parts()).save(tmp_path / "alone.safetensors")
    assert model.stat().st_size <= 1.2 * alone.stat().st_size < full_model.stat().st_size

    rng = np.random.default_rng(5)
    test = [make_part(rng)[0] for _ in range(3)]
    loaded = Detector.load(model)
    assert set(loaded.experts) == {"texture", "semantic"}
    assert [p.score for p in loaded.predict(test)] == [p.score for p in fitted.predict(test)]
    semantic_only = Detector("semantic", **FAST).fit(test)
    families = []
    monkeypatch.setattr(astfad.detector, "load_backbone",
                        lambda name, *a, **k: families.append(name) or fake_load_backbone(name, *a, **k))
    Detector.load(semantic_only.save(tmp_path / "semantic.safetensors"))
    assert families == ["dinov2_vits14"]  # the CNN is never loaded for a semantic model


def test_fit_keep_candidates_on_the_command_line(fakes, tmp_path):
    from astfad.config import experts_of

    write_images(tmp_path / "train", 3)
    saved = {}
    for flag in ([], ["--keep-candidates"]):
        out = tmp_path / f"m{len(flag)}.safetensors"
        result = CliRunner().invoke(main, ["fit", "--train", str(tmp_path / "train"), "--strategy", "auto",
                                           "--out", str(out), *flag, *FAST_ARGS])
        assert result.exit_code == 0, result.output
        saved[bool(flag)] = read_raw(out)[0]
    assert saved[False]["experts"] == sorted(experts_of(saved[False]["strategy"]))
    assert {"semantic", "subspace"} <= set(saved[True]["experts"])  # the default auto_experts


# ---------------------------------------------------------------------------- calibrate

def test_calibrate_writes_a_new_model_and_never_overwrites_the_old_one(fakes, model, tmp_path):
    normal = tmp_path / "normal"
    write_images(normal, 4, seed=7)
    before = model.read_bytes()
    runner = CliRunner()
    out = tmp_path / "calibrated.safetensors"
    result = runner.invoke(main, ["calibrate", str(model), "--normal", str(normal), "--fpr", "0.2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Detector.load(out).config.target_fpr == 0.2 and model.read_bytes() == before
    result = runner.invoke(main, ["calibrate", str(model), "--normal", str(normal), "--out", str(model)])
    assert result.exit_code == 2 and "--force" in result.output and model.read_bytes() == before
    result = runner.invoke(main, ["calibrate", str(out), "--normal", str(normal), "--threshold", "1.5",
                                  "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert Detector.load(out).threshold == 1.5


def test_calibrate_on_unlabelled_images_refits_only_the_thresholds(fakes, model, tmp_path):
    images = tmp_path / "line"
    write_images(images, 9, seed=8)  # every third part defective: 3 of 9
    runner = CliRunner()
    out = tmp_path / "unlabelled.safetensors"
    result = runner.invoke(main, ["calibrate", str(model), "--unlabelled", str(images), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "9 unlabelled (mostly good) image(s)" in result.output
    before, after = Detector.load(model), Detector.load(out)
    assert after.threshold != before.threshold and before.calibration is None
    assert after.calibration["images"] == 9 and after.calibration["unlabelled"] is True
    assert f"{after.calibration['above_threshold']} of them above the calibrated image threshold" in result.output
    assert {k: v.to_list() for k, v in after.normalisers.items()} == \
        {k: v.to_list() for k, v in before.normalisers.items()}
    for args in ([], ["--normal", str(images), "--unlabelled", str(images)]):
        result = runner.invoke(main, ["calibrate", str(model), *args, "--out", str(tmp_path / "x.safetensors")])
        assert result.exit_code == 2 and "either --normal or --unlabelled" in result.output
    few = tmp_path / "few"
    write_images(few, 5, seed=9)
    result = runner.invoke(main, ["calibrate", str(model), "--unlabelled", str(few), "--out", str(tmp_path / "y.safetensors")])
    assert result.exit_code != 0 and "at least 8 unlabelled images, got 5" in result.output


# ---------------------------------------------------------------------------- fuzz

def encoded_images() -> list[bytes]:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    out = []
    for fmt, mode in (("PNG", "RGB"), ("PNG", "I;16"), ("JPEG", "RGB"), ("TIFF", "RGB"), ("BMP", "P")):
        picture = Image.fromarray(image)
        picture = picture.convert("P") if mode == "P" else (
            Image.fromarray(image[..., 0].astype(np.uint16) * 257) if mode == "I;16" else picture)
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


VALID_IMAGES = encoded_images()


def damaged(valid: list[bytes]):
    """Random bytes, or a valid file truncated, or with bits flipped or bytes overwritten."""
    pick = st.sampled_from(valid)
    truncated = st.tuples(pick, st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    flipped = st.tuples(pick, st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                       min_size=1, max_size=8)).map(_flip)
    overwritten = st.tuples(pick, st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=16)).map(
        lambda t: t[0][: int(len(t[0]) * t[1])] + t[2] + t[0][int(len(t[0]) * t[1]) + len(t[2]):])
    return st.one_of(st.binary(max_size=512), truncated, flipped, overwritten)


def _flip(args) -> bytes:
    data, flips = bytearray(args[0]), args[1]
    for where, bit in flips:
        data[int(len(data) * where)] ^= 1 << bit
    return bytes(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged TIFF tags
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=damaged(VALID_IMAGES), suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp"]))
def test_fuzz_load_image_raises_only_image_load_error(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        image = load_image(path, max_pixels=1_000_000)
    except ImageLoadError as exc:
        assert "fuzz" in str(exc) and "\n" not in str(exc)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6)


def json_paths(value, prefix: tuple = ()):
    """Every place in a JSON document, as a path of keys and indices."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        yield from json_paths(item, (*prefix, key))


@st.composite
def mutated_metadata(draw, meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The model file with one place of its metadata deleted or replaced by any JSON value."""
    from safetensors.torch import save

    new = json.loads(json.dumps(meta))
    path = draw(st.sampled_from(list(json_paths(new))[1:]))
    parent = new
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return save(tensors, metadata={"astfad": json.dumps(new)})


@pytest.fixture(scope="module")
def model_parts(full_model) -> tuple[bytes, dict, dict[str, torch.Tensor]]:
    return (full_model.read_bytes(), *read_raw(full_model))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.data())
def test_fuzz_detector_load_raises_only_model_file_error(model_parts, tmp_path, choice):
    data, meta, tensors = model_parts
    data = choice.draw(st.one_of(damaged([data]), mutated_metadata(meta, tensors)))
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        detector = Detector.load(path)
    except ModelFileError as exc:
        assert "fuzz.safetensors" in str(exc) and "\n" not in str(exc)
        event(str(exc).split("fuzz.safetensors")[-1][:24])
    else:
        assert detector.strategy is not None and detector.experts
        event("loaded")


def test_each_expert_checks_the_layout_of_its_saved_tensors():
    from astfad.experts.adapter import AdaptedSemanticExpert
    from astfad.experts.base import TensorLayoutError
    from astfad.experts.semantic import SemanticExpert
    from astfad.experts.subspace import SubspaceExpert

    bank = {"bank": torch.zeros(5, 4), "owners": torch.zeros(5, dtype=torch.long)}
    assert SemanticExpert.check_tensors(bank) == {"bank", "owners"}
    layers = {"adapter.down.weight": torch.zeros(2, 4), "adapter.down.bias": torch.zeros(2),
              "adapter.up.weight": torch.zeros(4, 2), "adapter.up.bias": torch.zeros(4)}
    assert AdaptedSemanticExpert.check_tensors({**bank, **layers}) == {"bank", "owners", *layers}
    with pytest.raises(TensorLayoutError, match="adapter.up.bias is missing"):
        AdaptedSemanticExpert.check_tensors({**bank, **{k: v for k, v in layers.items() if k != "adapter.up.bias"}})
    with pytest.raises(TensorLayoutError, match=r"projector must be float \(4, 4\)"):
        SubspaceExpert.check_tensors({"mean": torch.zeros(4), "projector": torch.zeros(4, 3)})
    with pytest.raises(TensorLayoutError, match="pca_mean comes without its PCA partner"):
        SemanticExpert.check_tensors({**bank, "pca_mean": torch.zeros(4)})


def test_a_key_with_a_newline_still_gives_a_one_line_error(model, tmp_path):
    meta, tensors = read_raw(model)
    meta["threshold_models"]["semantic"]["\n"] = None
    path = write_raw(tmp_path / "bad.safetensors", meta, tensors)
    with pytest.raises(ModelFileError) as info:
        Detector.load(path)
    assert "bad.safetensors" in str(info.value) and "\n" not in str(info.value) and "\\n" in str(info.value)
