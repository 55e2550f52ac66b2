"""Which image-score rule turns the semantic expert's maps into the best image AUROC?

The top-1% mean of the map (today's rule) sees one or two hot regions; a part with several small
defects, or a busy normal part that lights up a little everywhere, may be ranked better by other
rules. For every category, shot count and seed this fits the `semantic` detector, maps the whole
test set once (test features are extracted once per category and shared by the cells), and scores
the maps with every rule in RULES. A rule is then chosen by leave-one-category-out (best mean
image AUROC on the other categories) and reported on the held-out one: nothing is tuned on the
category a figure is reported for.

    OMP_NUM_THREADS=1 python benchmarks/image_score_rules.py --data ../shared/data --shots 1 4 \
        --seeds 0 1 2 --out runs/image_rules.json
    python benchmarks/image_score_rules.py --rows runs/image_rules.json runs/image_rules_gen.json

Rows are cached in --out (JSON): a rerun only re-evaluates; `--rows` reports recorded runs together
(the real and the generated development categories: the protocol's ten).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from astfad.benchmark import category_aspect, load_test_set
from astfad.config import DetectorConfig
from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.metrics import evaluate
from astfad.scoring import image_scores
from cached_rows import cached_rows, recorded_rows
from protocol import held_out_best

PEAK_WINDOW = 9  # eval-grid pixels: peaks closer than this are one region


def top_fraction(fraction: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def rule(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        return flat.topk(max(1, round(flat.shape[1] * fraction)), dim=1).values.mean(dim=1)
    return rule


def peaks(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Mean of the k highest local maxima: several separate defects add up."""
    def rule(maps: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(maps[:, None], PEAK_WINDOW, stride=1, padding=PEAK_WINDOW // 2)[:, 0]
        values = torch.where(maps == pooled, maps, torch.full_like(maps, -torch.inf)).flatten(1)
        top = values.topk(k, dim=1).values
        return torch.where(torch.isfinite(top), top, top[:, :1]).mean(dim=1)
    return rule


def above_median(inner: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A rule's score minus the map's own median: an image that lights up everywhere is not a defect."""
    return lambda maps: inner(maps) - maps.flatten(1).median(dim=1).values


RULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "top1": lambda maps: image_scores(maps, "top1"),
    "max": lambda maps: image_scores(maps, "max"),
    "top0.1": top_fraction(0.001),
    "top0.3": top_fraction(0.003),
    "top3": top_fraction(0.03),
    "top5": top_fraction(0.05),
    "peaks3": peaks(3),
    "peaks5": peaks(5),
    "peaks10": peaks(10),
    "top1-median": above_median(lambda maps: image_scores(maps, "top1")),
    "peaks5-median": above_median(peaks(5)),
}


def collect(data: Path, shots: list[int], seeds: list[int], strategy: str) -> list[dict]:
    rows = []
    for category in scan_dataset(data):
        aspect = category_aspect(category)
        cache: dict = {}
        tests = load_test_set(category, DetectorConfig().eval_grid(aspect), print)
        for k in shots:
            for seed in seeds:
                train = [s.path for s in sample_shots(category.train, k, seed, "random")]
                det = Detector(strategy, cache=cache, aspect_ratio=aspect, seed=seed).fit(train)
                maps = []
                for i in range(0, len(tests.images), 16):
                    batch, _ = det.score_arrays(tests.images[i:i + 16], tests.keys[i:i + 16])
                    maps.append(batch)
                maps = torch.cat(maps)
                scores = {name: rule(maps).tolist() for name, rule in RULES.items()}
                rows.append({"category": category.name, "shots": k, "seed": seed, "labels": tests.labels.tolist(),
                             "scores": scores})
                print(category.name, k, seed, flush=True)
    return rows


def report(rows: list[dict]) -> None:
    """Every rule the rows all hold (rows recorded before a rule was added lack it)."""
    categories = sorted({r["category"] for r in rows})
    rules = [name for name in RULES if all(name in r["scores"] for r in rows)]
    for k in sorted({r["shots"] for r in rows}):
        auroc: dict[tuple[str, str], float] = {}
        for c in categories:
            cells = [r for r in rows if r["category"] == c and r["shots"] == k]
            for name in rules:
                auroc[(c, name)] = float(np.mean([evaluate(np.asarray(r["labels"]), np.asarray(r["scores"][name]))
                                                  ["image_auroc"] for r in cells]))
        print(f"\n{k} shot(s): image AUROC (%, mean over seeds)")
        print("| rule | " + " | ".join(categories) + " | mean |")
        print("|---|" + "---|" * (len(categories) + 1))
        for name in rules:
            values = [auroc[(c, name)] for c in categories]
            print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {100 * np.mean(values):.1f} |")
        print("leave-one-category-out (rule with the best mean on the other categories):")
        held = []
        for c, best in held_out_best(categories, rules, lambda o, n: auroc[(o, n)]).items():
            held.append(auroc[(c, best)])
            print(f"- {c}: {best} -> {100 * held[-1]:.1f} (top1: {100 * auroc[(c, 'top1')]:.1f})")
        print(f"mean held-out {100 * np.mean(held):.1f} vs top1 {100 * np.mean([auroc[(c, 'top1')] for c in categories]):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategy", default="semantic")
    parser.add_argument("--out", type=Path, default=Path("runs/image_rules.json"))
    parser.add_argument("--rows", type=Path, nargs="+", help="report on these recorded runs together")
    args = parser.parse_args()
    rows = recorded_rows(args.rows) if args.rows else cached_rows(
        args.out, lambda: collect(args.data, args.shots, args.seeds, args.strategy))
    report(rows)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
