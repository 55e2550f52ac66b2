"""Throughput of batch prediction through Ray (1, 2, ... workers) against the local streaming path,
on this machine or an existing cluster, and the workers a daily image volume needs.

    python benchmarks/scale.py --data ../shared/data --category pcb --images 48
    python benchmarks/scale.py --ray-address ray://head:10001 --workers 1 2 4 8   # a cluster

The model (fitted here on --shots good images, strategy --strategy) is saved to a temporary file
that every worker loads once. Local: `pipeline.iter_predictions` with torch's default threads (all
cores). Ray: `distributed.ray_predictions`, one CPU (one torch thread) per worker. `wall s`
includes loading the model (and, for Ray, starting the workers); `images/s` is the steady rate
after the first batch arrived, the figure that decides how many workers a volume needs. Outputs
(overlays, masks, predictions.csv) are not written: that is the caller's cost on the driver.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from itertools import cycle, islice
from pathlib import Path

import torch

from astfad.benchmark import category_aspect
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.distributed import ray_predictions, ray_runtime
from astfad.pipeline import PredictionItem, iter_predictions


def timed(run: Callable[[], Iterable[PredictionItem]], batch_size: int, workers: int
          ) -> tuple[dict[str, float], float, float, float]:
    """Scores by path (for the comparison), wall seconds from the call (model loading and worker
    start-up included), seconds to the first item, and the steady images/s from the first item
    on. Items come a batch at a time, and by the first arrival each worker has about one batch
    done, so the steady rate counts the items after the first `workers` batches."""
    start = time.perf_counter()
    scores, arrivals = {}, []
    for item in run():
        if item.error is not None:
            raise SystemExit(f"cannot benchmark on an unusable image: {item.error}")
        scores.setdefault(str(item.path), item.prediction.score)
        arrivals.append(time.perf_counter() - start)
    head = min(len(arrivals) - 1, workers * batch_size)
    steady = (len(arrivals) - head) / (arrivals[-1] - arrivals[0]) if arrivals[-1] > arrivals[0] else math.nan
    return scores, arrivals[-1], arrivals[0], steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default=None, help="default: the dataset's first category")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--strategy", default="fusion_add", help="fusion_add runs both backbones")
    parser.add_argument("--images", type=int, default=48, help="test images (cycled when fewer)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ray-address", default=None, help="an existing cluster (else a local runtime)")
    parser.add_argument("--daily", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="daily image volumes to size the cluster for")
    args = parser.parse_args()

    category = scan_dataset(args.data, categories=[args.category] if args.category else None)[0]
    shots = [s.path for s in sample_shots(category.train, args.shots, 0)]
    paths = list(islice(cycle(s.path for s in category.test), args.images))
    with tempfile.TemporaryDirectory() as folder:
        model = Detector(args.strategy, aspect_ratio=category_aspect(category)).fit(shots).save(
            Path(folder) / "model.safetensors")
        print(f"{category.name}: {len(paths)} images, strategy {args.strategy}, batch {args.batch_size}; "
              f"this machine: {os.cpu_count()} CPUs")
        local_scores, *local = timed(
            lambda: iter_predictions(Detector.load(model), paths, args.batch_size), args.batch_size, 1)
        threads = torch.get_num_threads()
        rows = [("local", f"{threads} thread{'s' if threads > 1 else ''}", *local, local[-1])]
        differences = []
        with ray_runtime(args.ray_address) as ray:
            cluster_cpus = int(ray.cluster_resources().get("CPU", 0))
            for workers in args.workers:
                scores, *measured = timed(lambda: ray_predictions(model, paths, args.batch_size, workers),
                                          args.batch_size, workers)
                rows.append(("ray", f"{workers} worker{'s' if workers > 1 else ''}", *measured,
                             measured[-1] / workers))
                differences.append(max(abs(scores[p] - local_scores[p]) for p in scores))
    print("\n| path | runs on | wall s | first image s | images/s (steady) | images/s per worker |\n"
          "|---|---|---:|---:|---:|---:|")
    for path, where, wall, first, steady, per_worker in rows:
        print(f"| {path} | {where} | {wall:.1f} | {first:.1f} | {steady:.2f} | {per_worker:.2f} |")
    print(f"\nRay cluster: {cluster_cpus} CPUs; largest score difference Ray vs local: {max(differences):.3g} "
          "(0 with the same thread count; other thread counts may move the last digits)")
    per_worker = rows[-1][-1]  # with the most workers: the rate when a node's CPUs are all busy
    for volume in args.daily:
        print(f"{volume:>10,} images/day at {per_worker:.2f} images/s per worker: "
              f"{math.ceil(volume / (per_worker * 86_400))} worker(s) busy around the clock, "
              f"{math.ceil(volume / (per_worker * 8 * 3600))} to finish within an 8-hour shift")


if __name__ == "__main__":
    main()
