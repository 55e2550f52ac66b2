"""`calibrate --unlabelled` end to end on real categories: image and pixel verdicts.

Per category: `semantic` fitted on one shot (seed 0), calibrated on unsorted parts (the first
`--good` good test images and the first `--defective` defective ones, sorted by path), then every
other good test image and the last `--eval` defective ones are predicted. Prints, for the fitted and
the calibrated model, the false-positive rate on the good parts, the recall on the defective ones
and the share of good parts' pixels in the masks (pixel FPR, on the evaluation grid), and the pixel
FPR the calibration would give with the more normal half's tail (the zero-shot batch's rule)
instead of the unflagged images'. `unlabelled_calibration.py` replays many draws on recorded
scores; this runs the library's whole path once per category.

    OMP_NUM_THREADS=2 python benchmarks/unlabelled_calibration_e2e.py --data ../shared/data \
        --categories magnetic_tile pcb ball_screw_drive
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from astfad.data.datasets import sample_shots, scan_dataset
from astfad.detector import Detector
from astfad.thresholds import ThresholdModel


def verdicts(det: Detector, good: torch.Tensor, good_scores: torch.Tensor, bad_scores: torch.Tensor,
             pixel_threshold: float) -> str:
    return (f"{float((good_scores > det.threshold).float().mean()):.1%} / "
            f"{float((bad_scores > det.threshold).float().mean()):.1%} / "
            f"{float((good > pixel_threshold).float().mean()):.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--categories", nargs="+", default=["magnetic_tile", "pcb", "ball_screw_drive"])
    parser.add_argument("--good", type=int, default=30)
    parser.add_argument("--defective", type=int, default=3)
    parser.add_argument("--eval", type=int, default=40)
    args = parser.parse_args()
    print("| category | fitted on the shot: FPR / recall / pixel FPR | --unlabelled: FPR / recall / pixel FPR "
          "| pixel FPR with the more normal half's tail |")
    print("|---|---|---|---|")
    for category in scan_dataset(args.data):
        if category.name not in args.categories:
            continue
        good = sorted((s for s in category.test if not s.label), key=lambda s: str(s.path))
        bad = sorted((s for s in category.test if s.label), key=lambda s: str(s.path))
        line = [s.path for s in good[:args.good] + bad[:args.defective]]
        held_good = [s.path for s in good[args.good:args.good + args.eval]]
        held_bad = [s.path for s in bad[args.defective:][-args.eval:]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-shot warning is what this measures
            # a feature cache: `calibrate` reads the unsorted parts' features scored just before
            det = Detector("semantic", seed=0, cache={}).fit([s.path for s in sample_shots(category.train, 1, 0)])
        good_maps, good_scores = det.score_arrays(det.load_images(held_good)[0])
        _, bad_scores = det.score_arrays(det.load_images(held_bad)[0])
        fitted = verdicts(det, good_maps, good_scores, bad_scores, det.pixel_threshold)
        line_maps, line_scores = det.score_arrays(*det.load_images(line))
        det.calibrate(line, unlabelled=True)
        calibrated = verdicts(det, good_maps, good_scores, bad_scores, det.pixel_threshold)
        half = ThresholdModel.fit_robust(line_scores, line_maps, det.config.seed).pixel.threshold(
            det.config.pixel_target_fpr)
        print(f"| {category.name} | {fitted} | {calibrated} | {float((good_maps > half).float().mean()):.2%} |",
              flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
