"""A fitted detector as ONE ONNX graph plus a JSON of what surrounds it, to run without astfad.

The graph is traced from the very modules `Detector.predict` runs, so the two cannot drift apart:

  inputs   one image tensor per backbone family the strategy needs, named `<family>_image`
           (`texture_image`, `semantic_image`), float32 (B, 3, H, W), RGB in [0, 1], already
           resized to that family's grid (in the JSON) by antialiased bilinear interpolation
           (torch `F.interpolate(..., antialias=True)`, equal to PIL BILINEAR on float channels);
           the backbone's own normalisation (ImageNet mean/std, or [-1, 1] for EfficientNet-Lite)
           happens inside the graph;
  graph    backbone reader (features.py) -> the expert's transform (the adapter, if any) -> kNN
           against the bank as matrix products (cosine: 1 - max similarity to the L2-normalised
           bank; l2: sqrt of the min squared distance) -> background mask (if fitted) -> with
           `test_flip`, the mean with the same distances of the mirrored input (flipped back) -> bilinear
           upsample to the evaluation grid and Gaussian blur (scoring.to_eval_grid) -> the
           strategy's map (fusions with the saved normalisers) -> image score (top 1% or max);
  outputs  `anomaly_map` (B, H_eval, W_eval) and `score` (B,); an image is anomalous when its
           score exceeds `threshold`, a pixel when its (resized) map value exceeds
           `pixel_threshold`, both in the JSON.

The kNN is exact and holds the full (queries x bank) product for a batch, so memory grows with
batch size: run one image at a time on small machines. PatchCore's `reweight` image score is not
exported (it searches the bank's own neighbourhood of one patch; use `top1` or `max`). The graph's
input grids are fixed: it reads every image on the category's grid (`test_grid` "category"), where
`Detector.predict` by default reads an image of another shape on a grid of its own aspect
(`test_grid` "own"); the JSON says so (`grid_note`), and the two agree on images of the
category's shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from astfad.config import experts_of, parse_strategy
from astfad.data.images import write_atomically
from astfad.detector import Detector, family_of
from astfad.experts.base import flatten_patches
from astfad.experts.semantic import self_discount, self_match_distances
from astfad.runtime.ort import OPSET, export_onnx
from astfad.scoring import image_scores, to_eval_grid

FORMAT = "astfad-onnx-1"
GRID_NOTE = ("every image is resized to the grids above, squashed to the category's aspect; astfad's own "
             "predict reads an image of another shape on a grid of its own aspect (test_grid 'own'), so "
             "the scores of such images differ from it")


def _nearest_distance(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None,
                      metric: str) -> torch.Tensor:
    """(Q,) distance of each query row to its nearest bank row, as memory.NearestNeighbours
    defines it: 1 - cosine similarity (bank already normalised), or the Euclidean distance."""
    if metric == "cosine":
        return (1.0 - (F.normalize(queries, dim=1) @ bank.T).max(dim=1).values).clamp_min(0.0)
    sq = (queries * queries).sum(1, keepdim=True) - 2.0 * queries @ bank.T + bank_sq
    return sq.min(dim=1).values.clamp_min(0.0).sqrt()


class DetectorGraph(nn.Module):
    """A fitted detector's predict path as a module: images of each family -> (maps, scores)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        if detector.strategy is None:
            raise ValueError("the detector is not fitted: fit or load one before exporting")
        if detector.image_score == "reweight" and detector.strategy == "texture":
            raise ValueError("image_score 'reweight' cannot be exported; refit with 'top1' or 'max'")
        self.detector = detector
        self.families = detector.families()
        self.experts = list(experts_of(detector.strategy))
        self.readers = nn.ModuleDict({f: detector.featurizer(f).module for f in self.families})
        for name in self.experts:
            expert = detector.experts[name]
            if not hasattr(expert, "bank"):  # no bank to search (subspace): its own distances trace
                continue
            bank = expert.bank.features.float().cpu()
            if expert.metric == "cosine":
                self.register_buffer(f"{name}_bank", F.normalize(bank, dim=1))
            else:
                self.register_buffer(f"{name}_bank", bank.contiguous())
                self.register_buffer(f"{name}_bank_sq", (bank * bank).sum(1))

    def expert_map(self, name: str, feats: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
        """The expert's map on the evaluation grid; with the mirror image's features (test_flip,
        flipped back into place), the mean of both patch distances, as Detector.expert_maps."""
        dist = self.distances(name, feats)
        if mirrored is not None:
            dist = (dist + self.distances(name, mirrored)) / 2
        return to_eval_grid(dist, self.detector.eval_grid(), self.detector.config.blur_sigma)

    def distances(self, name: str, feats: torch.Tensor) -> torch.Tensor:
        expert = self.detector.experts[name]
        b, _, h, w = feats.shape
        if not hasattr(expert, "bank"):
            dist = expert.distances(feats)
        else:
            queries = flatten_patches(expert.transform(feats))
            dist = _nearest_distance(queries, getattr(self, f"{name}_bank"),
                                     getattr(self, f"{name}_bank_sq", None), expert.metric).reshape(b, h, w)
            if getattr(expert, "self_match", 0):  # the whole batch in one product: no loop to trace
                dist = self_discount(dist, self_match_distances(feats, expert.self_match, chunk=None))
        if getattr(expert, "mask_background", False) and getattr(expert, "pca_direction", None) is not None:
            dist = dist * expert.foreground(feats).to(dist.dtype)
        return dist

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = {f: self.readers[f](x) for f, x in zip(self.families, images)}
        mirrored = {f: self.readers[f](x.flip(-1)).flip(-1) if self.detector.test_flip else None
                    for f, x in zip(self.families, images)}
        maps = {name: self.expert_map(name, feats[family_of(name)], mirrored[family_of(name)])
                for name in self.experts}
        applied = self.detector.combine(self.detector.strategy, maps)
        return applied, image_scores(applied, self.detector.image_score, self.detector.score_border)


def _normalisation(backbone: nn.Module) -> dict[str, Any]:
    """How the backbone scales its [0, 1] input (applied inside the graph; informative here)."""
    if hasattr(backbone, "_mean"):
        return {"kind": "mean_std", "mean": backbone._mean.flatten().tolist(),
                "std": backbone._std.flatten().tolist()}
    if hasattr(backbone, "_in_scale"):
        return {"kind": "affine", "scale": float(backbone._in_scale), "shift": float(backbone._in_shift),
                "note": "x * scale + shift: RGB in about [-1, 1]"}
    return {"kind": "none"}


def describe(detector: Detector, graph_name: str) -> dict[str, Any]:
    """The JSON written beside the graph: inputs, pre-processing, outputs, thresholds."""
    inputs = []
    for family in detector.families():
        featurizer = detector.featurizer(family)
        height, width = featurizer.grid(detector.aspect)
        inputs.append({
            "name": f"{family}_image", "shape": ["batch", 3, height, width], "dtype": "float32",
            "layout": "NCHW, RGB in [0, 1] (uint8 / 255)",
            "resize": "bilinear with antialiasing to (height, width) from the decoded RGB image "
                      "(PIL: Image.resize((width, height), Image.BILINEAR) on each float32 channel)",
            "backbone": featurizer.backbone.backbone_id,
            "normalisation_in_graph": _normalisation(featurizer.backbone)})
    eval_h, eval_w = detector.eval_grid()
    rule, _ = parse_strategy(detector.strategy)
    return {"format": FORMAT, "graph": graph_name, "opset": OPSET, "strategy": detector.strategy,
            "fusion": rule.startswith("fusion"), "inputs": inputs,
            "outputs": {"anomaly_map": ["batch", eval_h, eval_w], "score": ["batch"]},
            "eval_grid": [eval_h, eval_w], "blur_sigma": detector.config.blur_sigma,
            "image_score": detector.image_score, "test_grid": "category",
            **({"grid_note": GRID_NOTE} if detector.config.test_grid != "category" else {}),
            "threshold": detector.threshold, "pixel_threshold": detector.pixel_threshold,
            "postprocess": "resize anomaly_map bilinearly (align_corners=False) to the image's own "
                           "size; mask = map > pixel_threshold; anomalous = score > threshold"}


def export_detector(detector_or_path: Detector | str | os.PathLike, out_dir: str | os.PathLike, *,
                    name: str = "detector", overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<name>.onnx` and `<name>.json` for a fitted detector (or a saved detector file) into
    `out_dir`; refuses to replace existing files unless `overwrite`. Returns both paths."""
    detector = detector_or_path
    if isinstance(detector, (str, os.PathLike)):
        detector = Detector.load(detector, device="cpu")
    out = Path(out_dir)
    graph_path, json_path = out / f"{name}.onnx", out / f"{name}.json"
    existing = [str(p) for p in (graph_path, json_path) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; choose another --out or pass overwrite")
    module = DetectorGraph(detector).eval()
    examples = []
    for family in module.families:
        grid = detector.featurizer(family).grid(detector.aspect)
        examples.append(torch.rand(1, 3, *grid, generator=torch.Generator().manual_seed(0)))
    input_names = [f"{f}_image" for f in module.families]
    axes = {n: {0: "batch"} for n in (*input_names, "anomaly_map", "score")}
    with torch.inference_mode(False), torch.no_grad():
        export_onnx(module, examples, graph_path, input_names, ["anomaly_map", "score"], axes)
    write_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(describe(detector, graph_path.name), indent=2)))
    return graph_path, json_path
