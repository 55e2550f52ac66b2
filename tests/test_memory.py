import time

import faiss
import pytest
import torch

import astfad.memory
import astfad.runtime.cpu as cpu
from astfad.memory import MemoryBank, NearestNeighbours, greedy_coreset


def brute(queries, bank, metric):
    if metric == "cosine":
        q = torch.nn.functional.normalize(queries, dim=1)
        b = torch.nn.functional.normalize(bank, dim=1)
        return (1 - q @ b.T).min(1).values
    return torch.cdist(queries, bank).min(1).values


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_matches_brute_force(metric):
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(500, 16, generator=g), torch.randn(300, 16, generator=g)
    dist, idx = NearestNeighbours(bank, metric).search(queries, k=3)
    assert dist.shape == (300, 3) and idx.shape == (300, 3)
    assert torch.allclose(dist[:, 0], brute(queries, bank, metric), atol=1e-4)
    assert (dist[:, 1:] >= dist[:, :-1] - 1e-6).all()


def test_distances_are_not_squared():
    bank = torch.zeros(1, 2)
    dist, _ = NearestNeighbours(bank, "l2").search(torch.tensor([[3.0, 4.0]]))
    assert dist.item() == pytest.approx(5.0)


def test_torch_search_path_agrees_with_faiss():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(200, 8, generator=g), torch.randn(50, 8, generator=g)
    nn_faiss = NearestNeighbours(bank, "l2")
    nn_torch = NearestNeighbours(bank, "l2")
    nn_torch._index = None  # the CUDA code path, run on the CPU
    assert torch.allclose(nn_faiss.search(queries, 2)[0], nn_torch.search(queries, 2)[0], atol=1e-4)


def test_greedy_coreset_covers_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 20
    points = torch.cat([c + torch.randn(200, 32, generator=g) for c in centres])
    chosen = greedy_coreset(points, 10, projection_dim=16, seed=3)
    assert len(set(chosen.tolist())) == 10
    assert set((chosen // 200).tolist()) == set(range(5))  # every cluster represented
    assert torch.equal(chosen, greedy_coreset(points, 10, projection_dim=16, seed=3))
    assert torch.equal(greedy_coreset(points, 5000), torch.arange(1000))


def test_coreset_bank_bounds_error_against_full_bank():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 8, generator=g)
    full = MemoryBank(feats, torch.zeros(2000, dtype=torch.long))
    small = MemoryBank(feats, torch.zeros(2000, dtype=torch.long), budget=200, projection_dim=0)
    assert len(small) == 200
    q = torch.randn(100, 8, generator=g)
    assert (small.nearest(q) >= full.nearest(q) - 1e-5).all()


def test_nearest_per_owner_gives_leave_one_out():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(30, 4, generator=g)
    owners = torch.arange(3).repeat_interleave(10)
    bank = MemoryBank(feats, owners)
    per = bank.nearest_per_owner(feats[:10])
    assert per.shape == (10, 3)
    assert torch.allclose(per[:, 0], torch.zeros(10), atol=1e-3)
    loo = per[:, 1:].min(1).values
    assert torch.allclose(loo, torch.cdist(feats[:10], feats[10:]).min(1).values, atol=1e-4)


def test_empty_bank_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbours(torch.empty(0, 4))


def test_bf16_shortlist_matches_exact_cosine_search():
    """The bfloat16 shortlist + float32 re-rank returns the exact float32 distance for nearly every
    query, and never one more than 1e-3 off, on clustered features with many near-ties."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 64, generator=g)
    bank = centres[torch.randint(0, 20, (3000,), generator=g)] + 0.3 * torch.randn(3000, 64, generator=g)
    queries = centres[torch.randint(0, 20, (500,), generator=g)] + 0.3 * torch.randn(500, 64, generator=g)
    search = NearestNeighbours(bank, "cosine")
    search._bank_bf16 = search.bank.to(torch.bfloat16)  # force the shortlist path on any CPU
    search._index = None
    dist, idx = search.search(queries, k=2)
    error = (dist[:, 0] - brute(queries, bank, "cosine")).abs()
    assert error.max() < 1e-3 and (error > 1e-5).float().mean() < 0.005
    exact = NearestNeighbours(bank, "cosine")
    exact._bank_bf16, exact._index = None, None
    ref_dist, ref_idx = exact.search(queries, k=2)
    assert (idx[:, 0] == ref_idx[:, 0]).float().mean() > 0.99
    assert torch.allclose(dist, ref_dist, atol=1e-3)


def test_kernel_decision_is_cheap_and_cached():
    cpu.cpu_flags.cache_clear()
    cpu.native_bf16.cache_clear()
    start = time.perf_counter()
    first = cpu.native_bf16()
    assert time.perf_counter() - start < 0.05
    start = time.perf_counter()
    assert cpu.native_bf16() == first
    assert time.perf_counter() - start < 0.001


def test_avx2_cpu_gets_faiss_float32_and_bf16_cpu_the_shortlist(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx", "avx2", "fma", "f16c"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cpu.native_bf16.cache_clear()
    try:
        assert not cpu.native_bf16()
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
        cpu.native_bf16.cache_clear()
        assert not cpu.native_bf16()  # torch dispatching AVX2 kernels only: no bf16 shortlist
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        cpu.native_bf16.cache_clear()
        assert cpu.native_bf16()
    finally:
        cpu.native_bf16.cache_clear()
    bank = torch.randn(100, 8)
    monkeypatch.setattr(astfad.memory, "native_bf16", lambda: False)
    search = astfad.memory.NearestNeighbours(bank, "cosine")
    assert isinstance(search._index, faiss.IndexFlatIP) and search._bank_bf16 is None
    monkeypatch.setattr(astfad.memory, "native_bf16", lambda: True)
    search = astfad.memory.NearestNeighbours(bank, "cosine")
    assert search._index is None and search._bank_bf16 is not None
