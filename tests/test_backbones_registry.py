"""Registry and weights sources: names, frozen modules, local files, URL cache, the one clear failure."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import astfad.backbones.weights as W
from astfad.backbones import BACKBONES, WeightsUnavailableError, default_weights_url, load_backbone
from astfad.backbones.dinov2 import DinoV2ViT
from astfad.backbones.resnet import WideResNet50_2

WRN_URL = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("ASTFAD_CACHE", str(d))
    monkeypatch.delenv("ASTFAD_OFFLINE", raising=False)
    return d


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list = []

    def fail(url: str, dest: Path, **kw: object) -> None:
        calls.append(url)
        calls.append(kw.get("sha256_prefix"))
        raise OSError("network is unreachable")

    monkeypatch.setattr(W, "_download", fail)
    return calls


def test_names() -> None:
    assert set(BACKBONES) == {
        "efficientnet_lite0", "efficientnet_lite2", "dinov2_vits14", "dinov2_vits14_official",
        "dinov2_vits14_reg", "dinov2_vitb14", "dinov2_vitb14_reg", "wide_resnet50_2",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("resnet18")
    assert default_weights_url("wide_resnet50_2") == WRN_URL
    assert default_weights_url("dinov2_vitb14_reg").endswith("/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth")
    assert default_weights_url("efficientnet_lite0") is None


def test_cache_dir_follows_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert W.cache_dir() == cache and W.weights_dir() == cache / "weights"
    monkeypatch.delenv("ASTFAD_CACHE")
    assert W.cache_dir() == Path.home() / ".cache" / "astfad"


def test_default_without_file_or_network_fails_with_one_clear_message(cache: Path, no_network: list[str]) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("wide_resnet50_2")
    msg = str(info.value)
    assert no_network == [WRN_URL, "95faca4d"]  # tried once, with the torchvision hash check
    assert WRN_URL in msg and "weights=" in msg
    assert str(cache / "weights" / "wide_resnet50_2-95faca4d.pth") in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one message, no chained trace


def test_offline_env_forbids_download(cache: Path, no_network: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTFAD_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="ASTFAD_OFFLINE"):
        load_backbone("dinov2_vitb14")
    assert no_network == []


def test_missing_local_file(cache: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_backbone("dinov2_vits14_official", weights=cache / "nope.pth")


def test_canonical_url_downloads_once_into_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "official.pth"
    sd = {k: v + 0.01 for k, v in DinoV2ViT("vits14").state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 384)
    torch.save(sd, src)
    calls: list[str] = []

    def fake_download(url: str, dest: Path, **kw: object) -> None:
        calls.append(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)

    monkeypatch.setattr(W, "_download", fake_download)
    a = load_backbone("dinov2_vits14_official")
    b = load_backbone("dinov2_vits14_official")
    assert calls == [default_weights_url("dinov2_vits14_official")]  # second load hits the cache
    assert (cache / "weights" / "dinov2_vits14_pretrain.pth").is_file()
    assert a.backbone_id == b.backbone_id == "dinov2_vits14_official@" + W.file_identity(src)
    # An explicit non-canonical URL gets its own cache name.
    c = load_backbone("dinov2_vits14_official", weights="https://example.org/x/ckpt.pth")
    assert c.backbone_id == a.backbone_id and len(calls) == 2
    assert len(list((cache / "weights").glob("*-ckpt.pth"))) == 1


def test_safetensors_file_and_wrong_weights(tmp_path: Path, cache: Path) -> None:
    from safetensors.torch import save_file

    sd = {k: v.clone() for k, v in DinoV2ViT("vits14").state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    m = load_backbone("dinov2_vits14_official", weights=tmp_path / "w.safetensors")
    assert m.backbone_id.startswith("dinov2_vits14_official@sha256:")
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone("dinov2_vitb14", weights=tmp_path / "w.safetensors")


def test_sha_check_in_download_name() -> None:
    assert W._hash_prefix_in_name("wide_resnet50_2-95faca4d.pth") == "95faca4d"
    assert W._hash_prefix_in_name("dinov2_vits14_pretrain.pth") is None


def test_downloader_is_atomic_and_checks_hash(tmp_path: Path) -> None:
    import hashlib

    src = tmp_path / "src.bin"
    src.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "w.pth"
    with pytest.raises(OSError, match="SHA-256 mismatch"):
        W._download(src.as_uri(), dest, sha256_prefix="00000000")
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file left
    W._download(src.as_uri(), dest, sha256_prefix=digest[:8])
    assert dest.read_bytes() == src.read_bytes()


def test_wide_resnet50_2_torchvision_layout(tmp_path: Path, cache: Path) -> None:
    """A random state dict in torchvision's full layout (layer4 and fc included) loads by path and gives
    the same features as the directly built module; layer4/fc are ignored explicitly."""
    torch.manual_seed(0)
    full = WideResNet50_2(stages=("s4", "s8", "s16", "s32"), channels_last=False)
    sd = full.state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if k.endswith("running_var"):
            sd[k] = v.uniform_(0.5, 1.5, generator=g)
        elif v.is_floating_point():
            sd[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g) * 0.01
    sd["fc.bias"] = torch.zeros(1000)
    # torchvision key layout and shapes of the wide variant
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.conv1.weight"].shape == (128, 64, 1, 1)
    assert sd["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    assert sd["layer3.5.conv3.weight"].shape == (1024, 512, 1, 1)
    assert sd["layer4.2.bn3.running_mean"].shape == (2048,)
    assert len([k for k in sd if k.endswith("num_batches_tracked")]) == 53
    path = tmp_path / "wide_resnet50_2-random.pth"
    torch.save(sd, path)
    del full

    m = load_backbone("wide_resnet50_2", weights=path)
    assert m.kind == "cnn" and m.stages == {"s8": 8, "s16": 16} and m.stage_channels == {"s8": 512, "s16": 1024}
    assert not hasattr(m, "layer4") and not any(p.requires_grad for p in m.parameters())
    assert m.backbone_id == "wide_resnet50_2@" + W.file_identity(path)
    ref = WideResNet50_2(channels_last=False)
    ref.load_state_dict({k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))})
    ref.eval()
    x = torch.rand(2, 3, 64, 96)
    out, want = m(x), ref(x)
    for s in ("s8", "s16"):
        assert out[s].shape == (2, m.stage_channels[s], 64 // m.stages[s], 96 // m.stages[s])
        torch.testing.assert_close(out[s], want[s], atol=1e-4, rtol=1e-4)
