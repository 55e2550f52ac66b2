import numpy as np
import pytest
import torch

from astfad.config import (DEFAULT_PAIR, DetectorConfig, candidate_strategies, experts_of, grid_for, is_fixed_strategy,
                           parse_strategy)
from astfad.fusion import Normaliser, fuse
from astfad.metrics import image_auroc
from astfad.scoring import gaussian_blur, image_scores, to_eval_grid


def test_parse_strategy():
    assert parse_strategy("fusion_weighted_sum:0.7") == ("fusion_weighted_sum", 0.7)
    assert parse_strategy("texture") == ("texture", None)
    for bad in ("fusion_weighted_sum:1.5", "nope", "texture:1", "fusion_weighted_sum:x",
                "fusion_max:texture+texture", "fusion_add:texture+nope", "fusion_add:0.3", "fusion_add:a+b+c"):
        with pytest.raises(ValueError):
            parse_strategy(bad)
    assert experts_of("auto") == ("texture", "semantic", "semantic_adapter", "subspace")
    assert experts_of("fusion_max") == ("texture", "semantic")
    assert experts_of("fusion_max:texture+subspace") == ("texture", "subspace")
    assert parse_strategy("fusion_weighted_sum:0.3:subspace+semantic") == ("fusion_weighted_sum", 0.3)
    assert experts_of("fusion_weighted_sum:0.3:subspace+semantic") == ("subspace", "semantic")
    assert all(map(is_fixed_strategy, ("semantic", "fusion_mul:semantic+subspace", "fusion_weighted_sum:0.7")))
    assert not any(map(is_fixed_strategy, ("auto", "preset", "preset:paper", "zero_shot", "oracle")))


def test_candidates_are_each_expert_and_every_fusion_of_each_pair():
    names = candidate_strategies(("subspace", "semantic"))  # registry order, whatever the order given
    assert names[:2] == ("semantic", "subspace") and len(names) == 2 + 5
    assert "fusion_mul:semantic+subspace" in names and "fusion_weighted_sum:0.3:semantic+subspace" in names
    assert all(experts_of(n) == ("semantic", "subspace") for n in names[2:])
    with_texture = candidate_strategies(("texture", "semantic", "subspace"))
    assert len(with_texture) == 3 + 3 * 5 and len(set(with_texture)) == len(with_texture)
    # the default pair keeps its short names, which saved models and presets use
    assert {"fusion_add", "fusion_weighted_sum:0.7"} <= set(with_texture) and experts_of("fusion_add") == DEFAULT_PAIR
    assert candidate_strategies(("semantic",)) == ("semantic",)
    assert DetectorConfig().auto_candidates() == ("semantic", "subspace")  # fusions only when asked
    assert len(DetectorConfig(auto_fusions=True).auto_candidates()) == 7
    with pytest.raises(ValueError, match="auto_fusions"):
        DetectorConfig(auto_fusions="yes")


def test_grid_keeps_aspect_and_area():
    h, w = grid_for(448, 1130 / 460, 14)
    assert h % 14 == 0 and w % 14 == 0
    assert abs(w / h - 1130 / 460) < 0.15
    assert abs(h * w / 448 ** 2 - 1) < 0.1
    assert grid_for(256, 1.0, 16) == (256, 256)


def test_config_round_trip_and_validation():
    cfg = DetectorConfig(strategy="fusion_add", semantic_layers=[5, 8])
    assert DetectorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        DetectorConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        DetectorConfig(image_score="median")
    with pytest.raises(ValueError, match="blur_sigma"):
        DetectorConfig(blur_sigma=-1.0)
    for bad in (-0.01, 0.25):
        with pytest.raises(ValueError, match="score_border"):
            DetectorConfig(score_border=bad)


def test_blur_preserves_mass_and_smooths():
    x = torch.zeros(1, 64, 64)
    x[0, 32, 32] = 1.0
    y = gaussian_blur(x, 4.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert y.max() < 0.02 and y[0, 32, 32] == y.max()
    assert torch.equal(gaussian_blur(x, 0.0), x)  # the default: no smoothing


def test_image_score_rules():
    maps = torch.zeros(2, 10, 10)
    maps[1, 0, 0] = 5.0
    assert image_scores(maps, "max").tolist() == [0.0, 5.0]
    assert image_scores(maps, "top1").tolist() == [0.0, 5.0]  # 1% of 100 pixels = 1 pixel
    assert to_eval_grid(torch.ones(1, 4, 4), (32, 32), 4.0).shape == (1, 32, 32)


def test_image_score_leaves_the_border_out():
    """A hot spot on the map's edge counts only without a border; one inside always counts; a
    border wider than a third of a side is cut to a third, so the middle third is always scored."""
    maps = torch.zeros(2, 12, 30)
    maps[0, 0, 15] = 5.0  # on the top edge
    maps[1, 6, 15] = 5.0  # in the middle
    for rule in ("max", "top1"):
        edge, middle = image_scores(maps, rule).tolist()
        assert edge == middle > 0
        edge, middle = image_scores(maps, rule, border=1).tolist()
        assert edge == 0.0 and middle > 0
    wide = torch.zeros(1, 12, 30)
    wide[0, 5, 12] = 1.0  # row 5 lies in rows 4-7, column 12 in columns 4-25: inside a third's cut
    assert image_scores(wide, "max", border=100).item() == 1.0
    assert DetectorConfig(score_border=0.03).score_border_pixels() == 8  # one 448 px ViT patch on 256 px
    assert DetectorConfig().score_border_pixels() == 0  # off by default


def test_normaliser_fits_normal_statistics():
    normal = torch.randn(10, 8, 8) * 2 + 5
    z = Normaliser.fit(normal, "zscore")
    assert z.standardise(normal).mean().abs() < 1e-5
    assert z.standardise(normal).std() == pytest.approx(1.0, abs=1e-3)
    r = Normaliser.fit(normal, "robust")
    assert abs(r.center - normal.median().item()) < 1e-6
    assert Normaliser.from_list(z.to_list()) == z


def test_fusion_rules():
    norms = {"texture": Normaliser(1.0, 1.0, 1.0), "semantic": Normaliser(0.0, 2.0, 0.5)}
    t, s = torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 4.0)
    assert fuse("fusion_add", {"texture": t, "semantic": s}, norms)[0, 0, 0] == pytest.approx(2 + 2)
    assert fuse("fusion_max", {"texture": t, "semantic": s}, norms)[0, 0, 0] == pytest.approx(2)
    assert fuse("fusion_mul", {"texture": t, "semantic": s}, norms)[0, 0, 0] == pytest.approx(3 * 8)
    assert fuse("fusion_weighted_sum:0.7", {"texture": t, "semantic": s}, norms)[0, 0, 0] == pytest.approx(0.7 * 2 + 0.3 * 2)
    with pytest.raises(ValueError, match="one grid"):
        fuse("fusion_add", {"texture": t, "semantic": torch.zeros(1, 3, 3)}, norms)


def test_normal_fitted_fusion_does_not_cancel_signal():
    """Two experts on different scales that both carry signal: fused with normal-fitted z-scores
    the image AUROC is at least the better expert's; per-image min-max fusion loses it."""
    rng = np.random.default_rng(0)
    n = 200
    labels = np.r_[np.zeros(n), np.ones(n)]

    def expert(scale, offset, strength):
        maps = rng.normal(offset, scale, (2 * n, 16, 16))
        maps[n:, 4:8, 4:8] += strength * scale * rng.uniform(0.5, 1.5, (n, 1, 1))
        return torch.tensor(maps, dtype=torch.float32)

    tex, sem = expert(0.1, 1.0, 2.5), expert(5.0, 40.0, 2.0)
    normal_fit = {"texture": Normaliser.fit(expert(0.1, 1.0, 0)[:n]),
                  "semantic": Normaliser.fit(expert(5.0, 40.0, 0)[:n])}
    single = [image_auroc(labels, image_scores(m, "top1").numpy()) for m in (tex, sem)]
    fused = image_auroc(labels, image_scores(fuse("fusion_add", {"texture": tex, "semantic": sem}, normal_fit), "top1").numpy())
    assert fused >= max(single) - 1e-9

    def per_image_minmax(m):
        flat = m.flatten(1)
        lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
        return (m - lo) / (hi - lo)

    naive = image_auroc(labels, image_scores(per_image_minmax(tex) + per_image_minmax(sem), "top1").numpy())
    assert naive < fused
