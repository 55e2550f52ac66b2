"""Backbone runtimes (torch, ONNX Runtime fp32 / int8) and the one thread setting."""

import faiss
import numpy as np
import pytest
import torch

from astfad.backbones import DinoV2ViT, EfficientNetLite, available_offline, load_backbone
from astfad.backbones.dinov2 import DinoV2Config
from astfad.detector import Detector
from astfad.features import Featurizer, semantic_reader, texture_reader
from astfad.runtime import backbone_runtime
from astfad.runtime.ort import graph_file
from conftest import FakeCNN

CPU = torch.device("cpu")


def tiny_vit(offset: float = 0.0, registers: int = 0) -> DinoV2ViT:
    """A small DinoV2ViT (our real module) with seeded random weights: exportable stand-in."""
    vit = DinoV2ViT(DinoV2Config(32, 8, 2, num_register_tokens=registers, interpolate_offset=offset,
                                 interpolate_antialias=False))
    g = torch.Generator().manual_seed(2)
    for name, p in vit.named_parameters():
        if "norm" not in name:  # LayerNorms keep weight 1, bias 0: a random bias shared by every
            p.data = torch.randn(p.shape, generator=g) * 0.2  # token would make all tokens alike
        p.requires_grad_(False)
    vit.backbone_id = f"tiny_vit{offset},{registers}@test"
    return vit.eval()


def tiny_load_backbone(name, weights=None, device="cpu"):
    return (tiny_vit() if "dino" in name else FakeCNN()).to(device)


@pytest.fixture
def tiny_backbones(monkeypatch, tmp_path):
    """Exportable stand-in backbones for the detector, and a private astfad cache."""
    import astfad.detector

    monkeypatch.setenv("ASTFAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(astfad.detector, "load_backbone", tiny_load_backbone)


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    faiss.omp_set_num_threads(before)


def images(n=3, seed=0, shape=(90, 150)):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- runtime choice and threads


def test_runtime_choice(monkeypatch):
    import astfad.runtime

    vit, cnn, official = tiny_vit(), FakeCNN(), tiny_vit(0.1)
    assert backbone_runtime("torch", CPU, vit) == "torch"
    monkeypatch.setattr(astfad.runtime, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert backbone_runtime("auto", CPU, vit) == "onnxruntime"
    monkeypatch.setattr(astfad.runtime, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert backbone_runtime("auto", CPU, vit) == "onnxruntime_int8"
    assert backbone_runtime("auto", CPU, cnn) == "onnxruntime"
    assert backbone_runtime("auto", torch.device("cuda"), vit) == "torch"
    assert backbone_runtime("auto", CPU, official) == "torch"  # no dynamic-grid graph for it
    assert backbone_runtime("onnxruntime_int8", CPU, cnn) == "onnxruntime"
    assert backbone_runtime("onnxruntime_int8", CPU, vit) == "onnxruntime_int8"
    with pytest.raises(ValueError, match="runs the backbones on the CPU"):
        backbone_runtime("onnxruntime", torch.device("cuda"), vit)
    with pytest.raises(ValueError, match="position embeddings"):
        backbone_runtime("onnxruntime", CPU, official)
    with pytest.raises(ValueError, match="runtime must be one of"):
        backbone_runtime("tensorrt", CPU, vit)


@pytest.mark.parametrize("bad", [dict(runtime="tensorrt"), dict(threads=0), dict(threads=1.5)])
def test_config_refuses_bad_runtime_settings(bad):
    with pytest.raises(ValueError, match="runtime|threads"):
        Detector("semantic", **bad)


def test_one_thread_setting_for_torch_faiss_and_onnxruntime(tiny_backbones):
    det = Detector("semantic", runtime="onnxruntime", threads=1, semantic_size=56)
    det.aspect = 1.0
    featurizer = det.featurizer("semantic")
    assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert featurizer.threads == 1
    assert featurizer.read.session.get_session_options().intra_op_num_threads == 1


# ---------------------------------------------------------------- ONNX Runtime matches torch


@pytest.mark.parametrize("make", [lambda: tiny_vit(), lambda: tiny_vit(0.0, 4)], ids=["hf", "registers"])
def test_vit_graph_matches_torch_on_other_grids(monkeypatch, tmp_path, make):
    """Exported at a 4x4 grid, the graph runs any grid (position embeddings interpolated inside)."""
    monkeypatch.setenv("ASTFAD_CACHE", str(tmp_path))
    vit = make()
    args = (vit, 112, 14, semantic_reader(vit, (1, 2)), vit.backbone_id, CPU, 2)
    ref = Featurizer(*args)(images(), 1.6)
    out = Featurizer(*args, runtime="onnxruntime")(images(), 1.6)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4


def test_cnn_graph_matches_torch_and_is_exported_once(monkeypatch, tmp_path):
    monkeypatch.setenv("ASTFAD_CACHE", str(tmp_path))
    cnn = EfficientNetLite("lite0")  # our module with its real padding rules (random weights)
    args = (cnn, 128, 16, texture_reader(cnn, 3, 384), "lite0-random", CPU, 4)
    ref = Featurizer(*args)(images(), 0.6)
    first = Featurizer(*args, runtime="onnxruntime")
    graph = first.read.path
    stamp = graph.stat().st_mtime_ns
    out = Featurizer(*args, runtime="onnxruntime")(images(), 0.6)
    assert graph.stat().st_mtime_ns == stamp and list(graph.parent.glob("*.tmp")) == []
    assert graph == graph_file(first.module, "lite0-random")
    assert (out - ref).abs().max() < 1e-4


def test_detector_maps_agree_across_runtimes(tiny_backbones, parts):
    fast = dict(semantic_size=112, texture_size=112, eval_size=112)
    ref = Detector("fusion_add", **fast).fit(parts["train"][:4])
    ort = Detector("fusion_add", runtime="onnxruntime", **fast).fit(parts["train"][:4])
    a, b = ref.predict(parts["test"][:3]), ort.predict(parts["test"][:3])
    for x, y in zip(a, b):
        assert abs(x.score - y.score) < 1e-4
        assert np.abs(x.anomaly_map - y.anomaly_map).max() < 1e-4
    assert ort.featurizer("semantic").identity.endswith("|onnxruntime")


@pytest.mark.skipif(not available_offline("dinov2_vits14"), reason="offline ViT weights not installed")
def test_real_vit_fp32_and_int8_graphs(monkeypatch, tmp_path):
    monkeypatch.setenv("ASTFAD_CACHE", str(tmp_path))
    vit = load_backbone("dinov2_vits14")
    args = (vit, 224, 14, semantic_reader(vit, (7,)), vit.backbone_id, CPU, 2)
    from conftest import make_part

    rng = np.random.default_rng(0)
    pics = [make_part(rng, 160)[0] for _ in range(2)]
    ref = Featurizer(*args)(pics, 1.3)
    fp32 = Featurizer(*args, runtime="onnxruntime")(pics, 1.3)
    assert (fp32 - ref).abs().max() < 1e-4
    int8 = Featurizer(*args, runtime="onnxruntime_int8")(pics, 1.3)
    cosine = torch.nn.functional.cosine_similarity(int8, ref, dim=1)
    assert cosine.mean() > 0.995 and cosine.min() > 0.95
