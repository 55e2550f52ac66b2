import torch

from astfad.experts.subspace import SubspaceExpert


def _normal(n: int, seed: int) -> torch.Tensor:
    """Tokens on a 3-d subspace of 16 dims, plus small noise: (n, 16, 4, 4)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(99)))[0]
    coeffs = torch.randn(n, 4, 4, 3, generator=g)
    return (coeffs @ basis.T + 0.01 * torch.randn(n, 4, 4, 16, generator=g)).permute(0, 3, 1, 2)


def test_off_subspace_patches_score_high():
    expert = SubspaceExpert(variance=0.95, min_components=1)
    expert.fit(_normal(6, 0), torch.arange(6))
    test = _normal(2, 1)
    test[1, :, 2, 2] += 3 * torch.nn.functional.normalize(torch.randn(16), dim=0)
    dist = expert.distances(test)
    assert dist.shape == (2, 4, 4)
    assert dist[1, 2, 2] > 10 * dist[0].max()


def test_leave_one_out_equals_a_refit_without_the_owner():
    feats = _normal(5, 2)
    full = SubspaceExpert(variance=0.9, min_components=2)
    full.fit(feats, torch.arange(5))
    refit = SubspaceExpert(variance=0.9, min_components=2)
    refit.fit(feats[1:], torch.arange(4))
    held_out = full.distances(feats[:1], [0])
    assert torch.allclose(held_out, refit.distances(feats[:1]), atol=1e-5)
    per_patch = full.distances(feats[:1], [torch.zeros(4, 4, dtype=torch.long)])
    assert torch.allclose(per_patch, held_out)


def test_save_and_load_score_the_same():
    feats = _normal(4, 3)
    expert = SubspaceExpert(blocks=2)
    expert.fit(feats, torch.arange(4))
    loaded = SubspaceExpert(blocks=2)
    loaded.load_tensors(expert.tensors())
    assert torch.allclose(expert.distances(feats), loaded.distances(feats), atol=1e-5)
