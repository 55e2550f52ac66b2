import pytest
import torch

from astfad.config import DetectorConfig
from astfad.experts.semantic import SELF_RADIUS, SELF_WEIGHT, SemanticExpert, self_discount, self_match_distances

D, H, W = 8, 12, 12


def _unit(seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(D, generator=torch.Generator().manual_seed(seed)), dim=0)


def _plain_part() -> torch.Tensor:
    """(1, D, H, W): every patch the same 'normal' token."""
    return _unit(0)[None, :, None, None].expand(1, D, H, W).clone()


def _with(part: torch.Tensor, token: torch.Tensor, places: list[tuple[int, int]]) -> torch.Tensor:
    part = part.clone()
    for y, x in places:
        part[0, :, y, x] = token
    return part


def test_a_structure_the_part_repeats_matches_itself_a_unique_one_does_not():
    pad = _unit(1)
    far = [(0, 0), (0, 11), (11, 0), (11, 11), (5, 0)]  # five copies, each > SELF_RADIUS from the others
    part = _with(_with(_plain_part(), pad, far), _unit(2), [(6, 6)])
    dist = self_match_distances(part, k=4)
    assert dist.shape == (1, H, W)
    assert dist[0, 0, 0] < 1e-5  # four look-alikes elsewhere on the part
    assert dist[0, 6, 6] > 0.2  # the unique patch
    assert self_match_distances(part, k=5)[0, 0, 0] > 0.2  # only four others: the fifth is not one


def test_a_patch_never_matches_itself_or_its_surroundings():
    part = _with(_plain_part(), _unit(3), [(6, 6), (6, 6 + SELF_RADIUS)])  # a neighbour within the radius
    assert self_match_distances(part, k=1)[0, 6, 6] > 0.2
    spread = _with(_plain_part(), _unit(3), [(6, 6), (6, 6 + SELF_RADIUS + 1)])
    assert self_match_distances(spread, k=1)[0, 6, 6] < 1e-5


def test_a_grid_smaller_than_the_surroundings_gives_no_discount():
    tiny = torch.randn(2, D, 3, 3)
    assert torch.allclose(self_match_distances(tiny, k=4), torch.full((2, 3, 3), 2.0))


def test_the_expert_gives_up_half_the_excess_over_the_self_match_and_never_adds():
    references = _plain_part()
    pad, flaw = _unit(1), _unit(2)
    part = _with(_with(_plain_part(), pad, [(0, 0), (0, 11), (11, 0), (11, 11), (5, 0)]), flaw, [(6, 6)])
    plain, matched = SemanticExpert(), SemanticExpert(self_match=4)
    for expert in (plain, matched):
        expert.fit(references, torch.zeros(1))
    before, after = plain.distances(part), matched.distances(part)
    own = self_match_distances(part, 4)
    assert torch.allclose(after, before - SELF_WEIGHT * (before - own).clamp_min(0), atol=1e-6)
    assert torch.allclose(after, self_discount(before, own), atol=1e-6)
    assert after[0, 0, 0] == pytest.approx(SELF_WEIGHT * before[0, 0, 0].item(), abs=1e-5)  # repeated pad
    assert after[0, 6, 6] == pytest.approx(before[0, 6, 6].item(), abs=1e-5)  # the unique flaw keeps its distance
    assert bool((after <= before + 1e-6).all())


def test_self_match_is_validated():
    assert DetectorConfig().self_match == 4
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="self_match"):
            DetectorConfig(self_match=bad)


def test_chunks_of_images_give_the_one_product_result():
    feats = torch.randn(5, D, 9, 9, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(self_match_distances(feats, 4, chunk=2), self_match_distances(feats, 4, chunk=None))
