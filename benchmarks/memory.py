"""Peak memory (RSS) of `astfad predict` over many camera-sized images: bounded, whatever their number.

Generates `--images` JPEGs of 4000x3000 (a few distinct synthetic parts, copied), fits a model on
two of them with the real offline backbones (fusion_add: both the CNN and the ViT), then runs
`astfad predict` on all of them in a child process and prints that process's peak RSS, taken from
the kernel's accounting of the child (wait4), plus its images/s.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --images 100

Measured on a shared 2-core machine (load about 7): peak RSS 1.55 GiB for 100 images, 1.48 GiB
for 20 (so it does not grow with the number of images), 0.44 images/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from astfad.detector import Detector

DISTINCT = 5


def make_images(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` JPEGs of a striped part with a few blobs; DISTINCT different ones, copied."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    paths = []
    for i in range(count):
        path = folder / f"part_{i:03d}.jpg"
        if i < DISTINCT:
            base = 120 + 50 * np.sin(xx / 37.0 + i) * np.cos(yy / 53.0)
            image = np.repeat(base[..., None], 3, axis=2) + rng.normal(0, 6, (height, width, 3))
            if i % 2:
                y, x = rng.integers(0, height - 200), rng.integers(0, width - 200)
                image[y:y + 200, x:x + 200] = (230, 40, 40)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)
        else:
            shutil.copyfile(paths[i % DISTINCT], path)
        paths.append(path)
    return paths


def peak_rss_of(command: list[str]) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS in bytes) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--strategy", default="fusion_add")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shots", type=int, default=2,
                        help="good images to fit on (above 4 the model flips each image: two passes)")
    parser.add_argument("--work", type=Path, default=None, help="Folder for images and outputs (default: a temp folder).")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="astfad-memory-"))
    try:
        start = time.perf_counter()
        images = make_images(work / "images", args.images, args.width, args.height)
        print(f"{len(images)} images of {args.width}x{args.height} in {time.perf_counter() - start:.0f} s")
        model = work / "model.safetensors"
        detector = Detector(args.strategy).fit(images[:args.shots])
        detector.save(model, overwrite=True)
        command = [sys.executable, "-c", "from astfad.cli import main; main()", "predict", str(model), str(work / "images"),
                   "--out", str(work / "out"), "--force", "--batch-size", str(args.batch_size)]
        code, seconds, peak = peak_rss_of(command)
        per_image = args.width * args.height * 3 / 1e6
        print(f"astfad predict, {args.strategy} ({args.shots} shots, test_flip {detector.test_flip}), {len(images)} images of {args.width}x{args.height} "
              f"({per_image:.0f} MB each decoded), batch size {args.batch_size}: exit {code}, "
              f"{seconds:.0f} s, {len(images) / seconds:.2f} images/s, peak RSS {peak / 2**30:.2f} GiB")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
