import numpy as np
import torch

from astfad.experts.adapter import Adapter, align_view, flip_views, train_adapter


def test_untrained_adapter_is_identity():
    x = torch.randn(5, 16)
    assert torch.equal(Adapter(16, 4)(x), x)


def test_training_is_seeded_and_does_not_collapse():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=g)
    anchors = torch.nn.functional.normalize(centres[torch.randint(0, 6, (3000,), generator=g)]
                                            + 0.3 * torch.randn(3000, 32, generator=g), dim=1)
    positives = torch.nn.functional.normalize(anchors + 0.05 * torch.randn(3000, 32, generator=g), dim=1)
    adapter, stats = train_adapter(anchors, positives, hidden=16, steps=80, seed=0)
    again, _ = train_adapter(anchors, positives, hidden=16, steps=80, seed=0)
    assert torch.equal(adapter.down.weight, again.down.weight)
    assert stats["adapted_spread"] >= 0.5 * stats["input_spread"]  # no collapse
    with torch.no_grad():
        out = adapter(anchors)
    # adapted features still distinguish the clusters: different points do not become one
    assert torch.pdist(out[:200]).mean() > 0.5 * torch.pdist(anchors[:200]).mean()
    assert stats["consistency"] < 0.05


def test_flip_views_align_back():
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    views = flip_views(image, np.random.default_rng(0), 3, jitter=0.0)
    assert {dims for _, dims in views} == {(0,), (1,), (0, 1)}
    original = torch.from_numpy(image).permute(2, 0, 1)
    for view, dims in views:
        assert not np.array_equal(view, image)
        assert torch.equal(align_view(torch.from_numpy(view).permute(2, 0, 1), dims), original)
