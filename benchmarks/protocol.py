"""The tuning protocol's leave-one-category-out (benchmarks/README.md), shared by the probes beside
it: a category's figure is the one obtained with the choice made on the OTHER categories alone; and
the test sets the probes that fit detectors measure on."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np
import torch

from astfad.benchmark import TestSet, category_aspect, load_test_set
from astfad.config import DetectorConfig
from astfad.data.datasets import Category

PIXEL_STRIDE = 2  # the probes' pixel measures use every second row and column: 4x cheaper

T = TypeVar("T", bound=Hashable)


def held_out_best(categories: Sequence[str], options: Sequence[T], score: Callable[[str, T], float]) -> dict[str, T]:
    """For each category, the option with the highest mean `score(other category, option)` over
    the other categories (the first such option on a tie, as `max` keeps it)."""
    return {c: max(options, key=lambda o: np.mean([score(other, o) for other in categories if other != c]))
            for c in categories}


def lowest_rate_best(options: Sequence[T], mean: Callable[[T], Sequence[float]], bound: float) -> T:
    """Among `options` whose mean (rate, gain) has a rate (a false-positive rate) at most `bound`,
    the one with the highest gain; where none holds, the one with the lowest rate."""
    holding = [o for o in options if mean(o)[0] <= bound]
    if holding:
        return max(holding, key=lambda o: mean(o)[1])
    return min(options, key=lambda o: mean(o)[0])


def probe_test_set(category: Category) -> tuple[float, TestSet, TestSet]:
    """The category's aspect (as the benchmark fixes it), its test set on today's evaluation grid,
    and the same with masks on every PIXEL_STRIDE-th row and column (for `strided_metrics`)."""
    aspect = category_aspect(category)
    tests = load_test_set(category, DetectorConfig().eval_grid(aspect), print)
    return aspect, tests, replace(tests, masks=tests.masks[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE])


def strided_metrics(strided: TestSet, scores: np.ndarray, maps: torch.Tensor) -> dict[str, float]:
    """The test set's measures with the maps' pixels subsampled as `strided`'s masks are."""
    return strided.metrics(scores, maps[:, ::PIXEL_STRIDE, ::PIXEL_STRIDE].numpy())
