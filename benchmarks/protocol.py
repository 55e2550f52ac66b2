"""The tuning protocol's leave-one-category-out (benchmarks/README.md), shared by the probes beside
it: a category's figure is the one obtained with the choice made on the OTHER categories alone."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T", bound=Hashable)


def held_out_best(categories: Sequence[str], options: Sequence[T], score: Callable[[str, T], float]) -> dict[str, T]:
    """For each category, the option with the highest mean `score(other category, option)` over
    the other categories (the first such option on a tie, as `max` keeps it)."""
    return {c: max(options, key=lambda o: np.mean([score(other, o) for other in categories if other != c]))
            for c in categories}
