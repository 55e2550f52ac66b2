"""Fit seconds and predict seconds per image of each strategy on this machine, from a cold start
(no feature cache), on one category of a dataset: what a user waits for.

    python benchmarks/detector_speed.py --data ../shared/data --category ball_screw_drive --shots 4

A strategy may carry detector settings after '@' (`semantic@test_flip=true`, comma-separated).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from astfad.benchmark import category_aspect
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default=None)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--images", type=int, default=16, help="test images to predict")
    parser.add_argument("--strategies", nargs="+", default=["texture", "semantic", "semantic_adapter",
                                                            "fusion_add", "auto"])
    args = parser.parse_args()
    category = scan_dataset(args.data, categories=[args.category] if args.category else None)[0]
    shots = [s.path for s in sample_shots(category.train, args.shots, 0)]
    tests = [s.path for s in category.test[: args.images]]
    aspect = category_aspect(category)
    Detector("texture", aspect_ratio=aspect).fit(shots[:1])  # loads and converts weights once
    print(f"{category.name}, {args.shots} shots, {len(tests)} test images, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'strategy':<28} {'fit s':>7} {'predict s/image':>16}")
    for variant in args.strategies:
        strategy, _, extra = variant.partition("@")
        settings = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in extra.split(",") if item)}
        start = time.perf_counter()
        det = Detector(strategy, aspect_ratio=aspect, **settings).fit(shots)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        det.predict(tests)
        per_image = (time.perf_counter() - start) / len(tests)
        shown = variant if strategy != "auto" else f"{variant} -> {det.strategy}"
        print(f"{shown:<28} {fit:>7.1f} {per_image:>16.3f}")


if __name__ == "__main__":
    main()
