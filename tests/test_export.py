"""One ONNX graph per fitted detector: its maps and scores equal Detector.predict's (fp32)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from astfad.backbones import available_offline
from astfad.data.images import load_image, to_batch
from astfad.detector import Detector
from astfad.export import export_detector
from conftest import SHARED_DATA
from test_runtime import tiny_backbones  # noqa: F401  (fixture: exportable stand-in backbones)

@pytest.fixture(autouse=True)
def float32_knn(monkeypatch):
    """The graph's kNN is exact float32, as faiss is; the bfloat16 shortlist that CPUs with native
    bf16 use may return a neighbour up to 1e-3 farther (memory.py), so compare with faiss."""
    import astfad.memory

    monkeypatch.setattr(astfad.memory, "native_bf16", lambda: False)


FAST = dict(semantic_size=112, texture_size=112, eval_size=112, adapter_steps=20)


def run_graph(graph, spec, arrays):
    """What a user does with the JSON: resize each image to each input's grid, run the graph."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = {i["name"]: to_batch(arrays, tuple(i["shape"][2:])).numpy() for i in spec["inputs"]}
    maps, scores = session.run(["anomaly_map", "score"], feeds)
    return torch.from_numpy(maps), torch.from_numpy(scores)


def assert_equivalent(det, arrays, tmp_path, real=False):
    graph, meta = export_detector(det, tmp_path / "export")
    spec = json.loads(meta.read_text())
    maps, scores = run_graph(graph, spec, arrays)
    ref_maps, ref_scores = det.score_arrays(arrays)
    assert maps.shape == ref_maps.shape and tuple(spec["eval_grid"]) == tuple(maps.shape[1:])
    # a fusion divides each expert's distances by their normal spread, and with it their float32
    # rounding (~1e-7): the stand-in ViT's cosine spread is 0.007, so it is held to 1e-4 in
    # distance units; real backbones are held to 1e-4 in the fused units themselves, relative to
    # the map's magnitude (a texture distance of 17 carries float32 rounding of about 1e-4)
    spread = min([1.0] + [n.scale for k, n in det.normalisers.items() if k in ("texture", "semantic")]) \
        if spec["fusion"] and not real else 1.0
    tolerance = 1e-4 / spread * (max(1.0, float(ref_maps.abs().max())) if real else 1.0)
    assert (maps - ref_maps).abs().max() < tolerance
    assert (scores - ref_scores).abs().max() < tolerance
    predicted = det.predict(arrays)
    assert np.allclose([p.score for p in predicted], scores.numpy(), atol=tolerance)
    assert spec["threshold"] == det.threshold and spec["pixel_threshold"] == det.pixel_threshold
    return spec


@pytest.mark.parametrize("strategy, extra", [
    ("texture", {}), ("semantic", {}), ("semantic", {"mask_background": True}),
    ("semantic_adapter", {}), ("fusion_add", {}), ("fusion_mul", {}), ("fusion_weighted_sum:0.3", {}),
    ("subspace", {}), ("fusion_max:texture+subspace", {}),
    ("texture", {"image_score": "max"}), ("fusion_add", {"blur_sigma": 4.0}),
    ("semantic", {"test_flip": True}), ("fusion_max:texture+subspace", {"test_flip": True}),
    ("semantic", {"score_border": 0.1})])
def test_graph_matches_predict_with_stand_in_backbones(tiny_backbones, parts, tmp_path, strategy, extra):
    det = Detector(strategy, **FAST, **extra).fit(parts["train"][:4])
    spec = assert_equivalent(det, parts["test"][3:6], tmp_path)
    assert [i["name"] for i in spec["inputs"]] == [f"{f}_image" for f in det.families()]


def test_export_refuses_to_overwrite_and_reweight(tiny_backbones, parts, tmp_path):
    det = Detector("texture", **FAST).fit(parts["train"][:2])
    export_detector(det, tmp_path)
    with pytest.raises(FileExistsError, match="exist"):
        export_detector(det, tmp_path)
    export_detector(det, tmp_path, overwrite=True)
    reweight = Detector("texture", image_score="reweight", **FAST).fit(parts["train"][:2])
    with pytest.raises(ValueError, match="reweight"):
        export_detector(reweight, tmp_path / "other")


def test_export_says_its_graph_reads_the_category_grid(tiny_backbones, parts, tmp_path):
    """The graph's inputs are fixed grids: a detector reading each test shape on its own grid
    (the default) exports the category-grid reading, and its JSON says so."""
    import json

    for grid in ("own", "category"):
        det = Detector("semantic", test_grid=grid, **FAST).fit(parts["train"][:2])
        _, meta = export_detector(det, tmp_path / grid)
        described = json.loads(meta.read_text())
        assert described["test_grid"] == "category"
        assert ("grid_note" in described) == (grid == "own")


def test_export_from_a_saved_file(tiny_backbones, parts, tmp_path):
    det = Detector("semantic", **FAST).fit(parts["train"][:2])
    saved = det.save(tmp_path / "model.safetensors")
    graph, meta = export_detector(saved, tmp_path / "out")
    maps, scores = run_graph(graph, json.loads(meta.read_text()), parts["test"][:2])
    assert (scores - det.score_arrays(parts["test"][:2])[1]).abs().max() < 1e-4


REAL = SHARED_DATA / "hazelnut_toy" / "hazelnut"


@pytest.mark.skipif(not REAL.is_dir() or not available_offline("dinov2_vits14")
                    or not available_offline("efficientnet_lite0"), reason="real data or weights absent")
@pytest.mark.parametrize("strategy", ["texture", "semantic", "fusion_add"])
def test_graph_matches_predict_on_real_images(strategy, tmp_path):
    shots = [load_image(p) for p in sorted((REAL / "train" / "good").iterdir())[:2]]
    test = sorted(p for p in (REAL / "test").rglob("*") if p.is_file())
    arrays = [load_image(p) for p in (test[0], test[-1])]
    det = Detector(strategy, rotate_references=False).fit(shots)
    assert_equivalent(det, arrays, tmp_path, real=True)


# The README's "run an exported detector with ONNX Runtime alone" snippet, run as written.
SNIPPET = '''
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

folder, image_path = sys.argv[1], sys.argv[2]
spec = json.load(open(f"{folder}/detector.json"))
session = ort.InferenceSession(f"{folder}/detector.onnx", providers=["CPUExecutionProvider"])


def resized(rgb, height, width):
    """(3, height, width) float32 in [0, 1]: bilinear with antialiasing on each float channel."""
    return np.stack([np.asarray(Image.fromarray(rgb[..., c].astype(np.float32) / 255, mode="F")
                                .resize((width, height), Image.BILINEAR)) for c in range(3)])


rgb = np.asarray(ImageOps.exif_transpose(Image.open(image_path)).convert("RGB"))
feeds = {i["name"]: resized(rgb, *i["shape"][2:])[None] for i in spec["inputs"]}
anomaly_map, score = session.run(["anomaly_map", "score"], feeds)
heat = np.asarray(Image.fromarray(anomaly_map[0], mode="F").resize(rgb.shape[1::-1], Image.BILINEAR))
mask = heat > spec["pixel_threshold"]
print(float(score[0]), bool(score[0] > spec["threshold"]), int(mask.sum()))
'''


def test_readme_snippet_runs_without_astfad(tiny_backbones, parts, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    det = Detector("fusion_add", **FAST).fit(parts["train"][:4])
    export_detector(det, tmp_path / "export")
    image = tmp_path / "part.png"
    Image.fromarray(parts["test"][5]).save(image)
    script = tmp_path / "snippet.py"
    script.write_text("import sys\nsys.modules['astfad'] = None  # the snippet must not need astfad\n" + SNIPPET)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "export"), str(image)],
                          capture_output=True, text=True, check=True)
    score, anomalous, pixels = done.stdout.split()
    pred = det.predict([parts["test"][5]])[0]
    assert abs(float(score) - pred.score) < 1e-3  # PIL's float resize equals torch's to ~1e-5
    assert (anomalous == "True") == pred.is_anomalous


def test_export_command_writes_the_graph_and_refuses_to_overwrite(tiny_backbones, parts, tmp_path):
    from click.testing import CliRunner

    from astfad.cli import main

    model = Detector("texture", **FAST).fit(parts["train"][:3]).save(tmp_path / "model.safetensors")
    args = ["export", str(model), "--out", str(tmp_path / "onnx")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "onnx" / "detector.onnx").is_file() and (tmp_path / "onnx" / "detector.json").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "detector" in again.output
    assert CliRunner().invoke(main, [*args, "--force"]).exit_code == 0
