"""EfficientNet-Lite: strict loading of the packaged weights, stage shapes/strides, ImageNet sanity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from astfad.backbones import BACKBONES, available_offline, default_weights_file, load_backbone
from astfad.backbones.efficientnet_lite import EfficientNetLite
from astfad.backbones.registry import load_state_dict_checked
from astfad.backbones.weights import read_state_dict_file

skimage_data = pytest.importorskip("skimage.data")

LITE = {"efficientnet_lite0": ("lite0", 40, 112, 11), "efficientnet_lite2": ("lite2", 48, 120, 15)}

# ImageNet classes: tabby 281, tiger cat 282, Egyptian cat 285; coffee mug 504, espresso 967, cup 968.
CAT = {281, 282, 285}
COFFEE = {504, 967, 968}


def _need(name: str) -> None:
    if not available_offline(name):
        pytest.skip(f"{name} weights package not installed")


def _square(img: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    h, w = t.shape[-2:]
    m = min(h, w)
    t = t[..., (h - m) // 2 : (h - m) // 2 + m, (w - m) // 2 : (w - m) // 2 + m]
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.cat([_square(skimage_data.chelsea(), 224), _square(skimage_data.coffee(), 224)])


@pytest.mark.parametrize("name", list(LITE))
@pytest.mark.parametrize("size", [224, 256])
def test_stage_shapes_and_strides(name: str, size: int) -> None:
    _need(name)
    m = load_backbone(name)
    _, c8, c16, n_blocks = LITE[name]
    assert m.kind == "cnn" and name in BACKBONES
    assert m.stages == {"s8": 8, "s16": 16}
    assert m.stage_channels == {"s8": c8, "s16": c16}
    assert len(m._blocks) == n_blocks  # truncated after the stride-16 stage
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert m.backbone_id.startswith(name + "@sha256:")
    out = m(torch.rand(2, 3, size, size))
    assert list(out) == ["s8", "s16"]
    for s, stride in m.stages.items():
        assert out[s].shape == (2, m.stage_channels[s], size // stride, size // stride)
        assert out[s].is_contiguous() and torch.isfinite(out[s]).all()


@pytest.mark.parametrize("name", list(LITE))
def test_full_state_dict_loads_strictly(name: str) -> None:
    _need(name)
    variant = LITE[name][0]
    sd = read_state_dict_file(default_weights_file(name))
    full = EfficientNetLite(variant, with_head=True)
    load_state_dict_checked(full, sd, name)  # every key used, none ignored
    assert set(full.state_dict()) == set(sd)
    # The truncated extractor ignores exactly the head and the blocks after s16.
    trunc = EfficientNetLite(variant)
    ignored = {k for k in sd if trunc.ignored_checkpoint_key(k)}
    assert ignored == set(sd) - set(trunc.state_dict())
    assert any(k.startswith("_fc.") for k in ignored)
    bad = dict(sd)
    bad["_blocks.2._bn1.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_state_dict_checked(EfficientNetLite(variant), bad, name)
    del bad["_blocks.2._bn1.weight"]
    with pytest.raises(ValueError, match="missing keys"):
        load_state_dict_checked(EfficientNetLite(variant), bad, name)


def test_imagenet_classification_and_normalisation(images: torch.Tensor) -> None:
    """Proof that the weights load right: a cat and a coffee cup are recognised. The TF-Lite [-1, 1]
    input scaling (255x-127)/128 gives more confident right answers than ImageNet mean/std."""
    name = "efficientnet_lite0"
    _need(name)
    net = EfficientNetLite("lite0", with_head=True).eval()
    load_state_dict_checked(net, read_state_dict_file(default_weights_file(name)), name)

    p_tf = net.classify(images).softmax(-1)
    assert int(p_tf[0].argmax()) in CAT
    assert int(p_tf[1].argmax()) in COFFEE
    group_tf = p_tf[0, list(CAT)].sum() + p_tf[1, list(COFFEE)].sum()

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.normalize = lambda x: (x - mean) / std
    p_in = net.classify(images).softmax(-1)
    group_in = p_in[0, list(CAT)].sum() + p_in[1, list(COFFEE)].sum()
    assert group_tf > group_in


def test_lite2_classifies(images: torch.Tensor) -> None:
    name = "efficientnet_lite2"
    _need(name)
    net = EfficientNetLite("lite2", with_head=True).eval()
    load_state_dict_checked(net, read_state_dict_file(default_weights_file(name)), name)
    x = F.interpolate(images, size=(260, 260), mode="bilinear", align_corners=False)
    top = net.classify(x).argmax(-1).tolist()
    assert top[0] in CAT and top[1] in COFFEE


def test_channels_last_matches_nchw_and_features_are_plain_tensors() -> None:
    name = "efficientnet_lite0"
    _need(name)
    a = load_backbone(name)
    b = EfficientNetLite("lite0", channels_last=False)
    load_state_dict_checked(b, read_state_dict_file(default_weights_file(name)), name)
    b.eval()
    x = torch.rand(2, 3, 96, 128)
    oa, ob = a(x), b(x)
    for s in oa:
        assert oa[s].shape == (2, a.stage_channels[s], 96 // a.stages[s], 128 // a.stages[s])
        torch.testing.assert_close(oa[s], ob[s], atol=1e-4, rtol=1e-4)
    # Outputs are ordinary tensors: a trainable head can learn on them (no inference-tensor error).
    head = torch.nn.Conv2d(40, 1, 1)
    head(oa["s8"]).mean().backward()
    assert head.weight.grad is not None


def test_stage_selection_and_bad_input() -> None:
    m = EfficientNetLite("lite0", stages=("s4", "s8"), channels_last=False).eval()
    assert len(m._blocks) == 5 and m.stage_channels == {"s4": 24, "s8": 40}
    out = m(torch.rand(1, 3, 64, 64))
    assert out["s4"].shape == (1, 24, 16, 16)
    with pytest.raises(ValueError):
        EfficientNetLite("lite0", stages=("s7",))
    with pytest.raises(ValueError):
        m(torch.rand(1, 1, 64, 64))
