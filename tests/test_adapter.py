import numpy as np
import torch

from astfad.experts.adapter import Adapter, train_adapter


def test_untrained_adapter_is_identity():
    x = torch.randn(5, 16)
    assert torch.equal(Adapter(16, 4)(x), x)


def _clustered_pairs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six normal modes: their centres, 3000 noisy normal features and a slightly moved view of each."""
    centres = torch.randn(6, 32, generator=g)
    anchors = torch.nn.functional.normalize(centres[torch.randint(0, 6, (3000,), generator=g)]
                                            + 0.3 * torch.randn(3000, 32, generator=g), dim=1)
    positives = torch.nn.functional.normalize(anchors + 0.05 * torch.randn(3000, 32, generator=g), dim=1)
    return centres, anchors, positives


def test_training_is_seeded_and_does_not_collapse():
    g = torch.Generator().manual_seed(0)
    centres, anchors, positives = _clustered_pairs(g)
    adapter, stats = train_adapter(anchors, positives, hidden=16, steps=80, seed=0)
    again, _ = train_adapter(anchors, positives, hidden=16, steps=80, seed=0)
    assert torch.equal(adapter.down.weight, again.down.weight)
    assert stats["adapted_spread"] >= 0.5 * stats["input_spread"]  # no collapse
    with torch.no_grad():
        out = adapter(anchors)
    # adapted features still distinguish the clusters: different points do not become one
    assert torch.pdist(out[:200]).mean() > 0.5 * torch.pdist(anchors[:200]).mean()
    assert stats["consistency"] < 0.05


def test_view_to_source_samples_the_content_a_view_shows():
    from astfad.data.views import normal_view, view_to_source

    # a feature map equal to its own coordinates: sampling it at a view's patch centres must give
    # the source coordinates of those centres
    h, w = 8, 12
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    coords = torch.stack([ys, xs])
    image = np.zeros((80, 120, 3), np.uint8)
    _, box = normal_view(image, np.random.default_rng(0))
    sampled = view_to_source(coords, box, (h, w))
    y0, x0, y1, x1 = box
    assert box != (0.0, 0.0, 1.0, 1.0)
    assert torch.allclose(sampled[0, 1:-1, 0], y0 + ys[1:-1, 0] * (y1 - y0), atol=1e-5)
    assert torch.allclose(sampled[1, 0, 1:-1], x0 + xs[0, 1:-1] * (x1 - x0), atol=1e-5)


def _nearest_distance(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    q, b = torch.nn.functional.normalize(queries, dim=1), torch.nn.functional.normalize(bank, dim=1)
    return 1 - (q @ b.T).max(dim=1).values


def test_separation_keeps_pasted_anomalies_apart_without_collapse():
    g = torch.Generator().manual_seed(1)
    centres, anchors, positives = _clustered_pairs(g)
    # anomalous patches: halfway between two normal modes, close to normal at the input
    pairs = torch.randint(0, 6, (400, 2), generator=g)
    negatives = torch.nn.functional.normalize(centres[pairs[:, 0]] + centres[pairs[:, 1]]
                                              + 0.3 * torch.randn(400, 32, generator=g), dim=1)
    plain, _ = train_adapter(anchors, positives, hidden=16, steps=120, seed=0)
    separated, stats = train_adapter(anchors, positives, hidden=16, steps=120, seed=0, negatives=negatives)
    test_normal = torch.nn.functional.normalize(anchors[:300] + 0.05 * torch.randn(300, 32, generator=g), dim=1)

    def margin(adapter) -> float:  # how much further anomalies lie from the normal bank than normal patches
        with torch.no_grad():
            bank = adapter(anchors[300:])
            return float(_nearest_distance(adapter(negatives), bank).mean()
                         - _nearest_distance(adapter(test_normal), bank).mean())

    assert margin(separated) > margin(plain)
    assert stats["separation"] < 0.1 and stats["adapted_spread"] >= 0.5 * stats["input_spread"]


def test_negatives_must_match_the_anchors_width():
    import pytest

    with pytest.raises(ValueError, match="negatives"):
        train_adapter(torch.randn(10, 8), torch.randn(10, 8), hidden=4, steps=1, negatives=torch.randn(5, 6))
