"""Speed, memory and accuracy drift of the backbone runtimes and FLOP savings on this CPU, in one run.

    python benchmarks/speed.py --data ../shared/data                 # speed table (~10 CPU-minutes)
    python benchmarks/speed.py --data ../shared/data --drift         # + drift vs torch fp32 (long)
    python benchmarks/speed.py --drift --only-drift --drift-images 8 --seeds 0 --categories hazelnut
    python benchmarks/speed.py --drift --only-drift --drift-results drift/ --variants "torch fp32" "onnxruntime int8"

Every measurement runs in a fresh child process (peak RSS is per process, and a cold start is what
a user pays). Printed: the ViT forward alone (ms/image, batch 4, the category's default grid) per
runtime and grid; per runtime x strategy the fit time (4 shots; 16 for semantic), predict ms/image
and its ratio to that runtime's ViT forward, peak RSS of fit and of predict, model file size; the
cold `astfad predict` of one image split into backbone forward, kNN and the rest; with --drift the
change of the mean image AUROC, pixel AUROC and AUPRO (points) of each variant against torch fp32
over categories x shots x seeds, and whether it passes the rule (every mean moves < 0.5 point).
Timings on a shared machine are noisy: run it on a quiet one for figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> Detector settings; the first is the reference of the drift rule
VARIANTS = {
    "torch fp32": {"runtime": "torch"},
    "onnxruntime fp32": {"runtime": "onnxruntime"},
    "onnxruntime int8": {"runtime": "onnxruntime_int8"},
    "onnxruntime fp32, semantic_size 392": {"runtime": "onnxruntime", "semantic_size": 392},
    "onnxruntime fp32, semantic_size 336": {"runtime": "onnxruntime", "semantic_size": 336},
}
DRIFT_RULE = 0.5  # points, every mean


def auto_variant() -> str:
    """The variant `runtime="auto"` resolves to for the ViT on this CPU."""
    import torch

    from astfad.runtime import backbone_runtime

    vit = type("ViT", (), {"kind": "vit"})()  # backbone_runtime reads only `kind` (and exportability)
    picked = backbone_runtime("auto", torch.device("cpu"), vit)
    return {"torch": "torch fp32", "onnxruntime": "onnxruntime fp32", "onnxruntime_int8": "onnxruntime int8"}[picked]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def category(data: Path, name: str):
    from astfad.data.datasets import scan_dataset

    found = [c for c in scan_dataset(data) if c.name == name]
    if not found:
        raise SystemExit(f"category '{name}' not found under {data}")
    return found[0]


# ------------------------------------------------------------------------------------ children
def child_forward(args: argparse.Namespace) -> dict:
    """ms/image of the ViT reader alone (batch 4, after one warm-up batch)."""
    import torch

    from astfad.benchmark import category_aspect
    from astfad.data.images import load_image
    from astfad.detector import Detector

    cat = category(args.data, args.category)
    det = Detector("semantic", **VARIANTS[args.variant])
    det.aspect = category_aspect(cat)
    featurizer = det.featurizer("semantic")
    images = [load_image(s.path) for s in cat.test[:4]]
    featurizer(images, det.aspect)
    start = time.perf_counter()
    for _ in range(args.repeat):
        featurizer(images, det.aspect)
    ms = (time.perf_counter() - start) / (args.repeat * len(images)) * 1000
    return {"forward_ms": ms, "grid": list(featurizer.grid(det.aspect)), "threads": torch.get_num_threads()}


def child_fit(args: argparse.Namespace) -> dict:
    from astfad.benchmark import category_aspect
    from astfad.data.datasets import sample_shots
    from astfad.detector import Detector

    cat = category(args.data, args.category)
    shots = [s.path for s in sample_shots(cat.train, args.shots, 0)]
    start = time.perf_counter()
    det = Detector(args.strategy, aspect_ratio=category_aspect(cat), **VARIANTS[args.variant]).fit(shots)
    fit_s = time.perf_counter() - start
    det.save(args.model)
    return {"fit_s": fit_s, "fit_rss_mb": peak_rss_mb(), "file_mb": args.model.stat().st_size / 2**20,
            "chosen": det.strategy}


def child_predict(args: argparse.Namespace) -> dict:
    """Cold load, then the first image alone and the others as a batch, with backbone forward
    and kNN + maps timed apart."""
    start = time.perf_counter()
    from astfad.config import experts_of
    from astfad.data.images import load_image
    from astfad.detector import Detector

    imported = time.perf_counter()
    det = Detector.load(args.model)
    loaded = time.perf_counter()
    cat = category(args.data, args.category)
    paths = [s.path for s in cat.test[: args.images]]
    experts = experts_of(det.strategy)

    def timed(arrays: list) -> tuple[float, float]:
        t0 = time.perf_counter()
        feats = det.extract(arrays)
        mirrors = det.mirrors(arrays, None, list(feats))
        t1 = time.perf_counter()
        maps = det.combine(det.strategy, det.expert_maps(feats, experts=experts, mirrors=mirrors))
        det.scores(det.strategy, maps, feats.get("texture"))
        return t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    first = [load_image(paths[0])]
    decode = time.perf_counter() - t0
    forward, knn = timed(first)  # the cold first image, as `astfad predict` of one image
    rest = [load_image(p) for p in paths[1:]]
    rest_forward, rest_knn = timed(rest)  # the others as one batch, as predict runs them
    n = len(rest)
    return {"import_s": imported - start, "load_s": loaded - imported,
            "first": {"decode": decode, "forward": forward, "knn": knn},
            "predict_ms": (rest_forward + rest_knn) / n * 1000, "forward_ms": rest_forward / n * 1000,
            "knn_ms": rest_knn / n * 1000, "predict_rss_mb": peak_rss_mb()}


def child_drift(args: argparse.Namespace) -> dict:
    """Image AUROC, pixel AUROC and AUPRO of the semantic strategy for one variant, per
    (category, shots, seed); test features are computed once per variant."""
    import numpy as np

    from astfad.benchmark import category_aspect
    from astfad.data.datasets import sample_shots, scan_dataset
    from astfad.data.images import load_image, load_mask
    from astfad.detector import Detector
    from astfad.metrics import aupro, image_auroc, pixel_auroc
    from astfad.scoring import mask_to_grid

    cache: dict = {}
    rows = []
    for cat in scan_dataset(args.data):
        if args.categories and cat.name not in args.categories:
            continue
        rng = np.random.default_rng(0)
        normal = [s for s in cat.test if s.label == 0]
        anomalous = [s for s in cat.test if s.label == 1]
        half = args.drift_images // 2
        test = [normal[i] for i in sorted(rng.choice(len(normal), min(half, len(normal)), replace=False))] + \
            [anomalous[i] for i in sorted(rng.choice(len(anomalous), min(half, len(anomalous)), replace=False))]
        arrays = [load_image(s.path) for s in test]
        keys = [str(s.path) for s in test]
        aspect = category_aspect(cat)
        for shots in args.shots_list:
            for seed in args.seeds:
                chosen = [s.path for s in sample_shots(cat.train, shots, seed)]
                det = Detector("semantic", seed=seed, aspect_ratio=aspect, cache=cache,
                               **VARIANTS[args.variant]).fit(chosen)
                maps, scores = det.score_arrays(arrays, keys)
                grid = tuple(maps.shape[1:])
                masks = [mask_to_grid(load_mask(s.mask_path, a.shape[:2]) if s.mask_path else
                                      np.zeros(a.shape[:2], bool), grid) for s, a in zip(test, arrays)]
                labels = [s.label for s in test]
                rows.append({"category": cat.name, "shots": shots, "seed": seed,
                             "image_auroc": image_auroc(labels, scores.numpy()),
                             "pixel_auroc": pixel_auroc(masks, maps.numpy()),
                             "aupro": aupro(masks, maps.numpy())})
    return {"rows": rows}


CHILDREN = {"forward": child_forward, "fit": child_fit, "predict": child_predict, "drift": child_drift}


# -------------------------------------------------------------------------------------- parent
def run_child(args: argparse.Namespace, kind: str, timeout: float = 3600, **extra) -> tuple[dict, float]:
    cmd = [sys.executable, __file__, "--child", kind, "--data", str(args.data)]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        cmd += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def cold_cli_predict(args: argparse.Namespace, model: Path, image: Path, work: Path) -> float:
    """Wall seconds of `astfad predict MODEL IMAGE --out DIR` in a fresh process."""
    out = work / f"cli-{time.time_ns()}"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from astfad.cli import main; main()", "predict",
                           str(model), str(image), "--out", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"astfad predict failed:\n{done.stderr[-2000:]}")
    return wall


def drift_table(args: argparse.Namespace, variants: list[str]) -> dict[str, dict]:
    import numpy as np

    results = {}
    settings = {"drift_images": args.drift_images, "shots_list": args.shots_list, "seeds": args.seeds,
                "categories": args.categories or []}
    for name in variants:
        saved = args.drift_results / f"{name.replace(' ', '_').replace(',', '')}.json" if args.drift_results else None
        if saved is not None and saved.is_file() and json.loads(saved.read_text())["settings"] == settings:
            out = json.loads(saved.read_text())
            print(f"  drift: {name}: from {saved}", flush=True)
        else:
            print(f"  drift: {name} ...", flush=True)
            out, wall = run_child(args, "drift", variant=name, **settings)
            out.update(settings=settings, wall_s=wall)
            if saved is not None:
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(out))
        results[name] = {m: float(np.nanmean([r[m] for r in out["rows"]])) for m in ("image_auroc", "pixel_auroc", "aupro")}
        results[name]["cells"] = len(out["rows"])
    reference = results[variants[0]]
    for name, res in results.items():
        res["drift"] = {m: 100 * (res[m] - reference[m]) for m in ("image_auroc", "pixel_auroc", "aupro")}
        res["passes"] = all(abs(d) < DRIFT_RULE for d in res["drift"].values())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--category", default="ball_screw_drive")
    parser.add_argument("--images", type=int, default=9, help="test images per predict measurement")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--drift", action="store_true", help="also measure accuracy drift (long)")
    parser.add_argument("--only-drift", action="store_true")
    parser.add_argument("--drift-images", type=int, default=10_000, help="test images per category (half anomalous)")
    parser.add_argument("--shots-list", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--categories", nargs="*", default=None)
    parser.add_argument("--drift-results", type=Path, default=None,
                        help="folder keeping each variant's drift rows: rerun only what is missing")
    # child-process arguments
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--shots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"# astfad speed on this CPU ({os.cpu_count()} cores, OMP_NUM_THREADS={threads}), "
          f"category {args.category}\n")
    from astfad.runtime.cpu import native_bf16

    variants = list(args.variants)
    print(f"runtime='auto' runs the ViT here as: {auto_variant()}; bfloat16 kNN shortlist: {native_bf16()}\n")
    drift = drift_table(args, variants) if args.drift else {}
    if args.only_drift:
        print_drift(drift, args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="astfad-speed-") as tmp:
        work = Path(tmp)
        forward = {}
        for name in variants:
            forward[name], _ = run_child(args, "forward", variant=name, category=args.category, repeat=args.repeat)
            print(f"ViT forward alone, {name}: {forward[name]['forward_ms']:.0f} ms/image at grid "
                  f"{forward[name]['grid']}", flush=True)
        plan = [(name, "semantic", 4) for name in variants]
        for name in dict.fromkeys([variants[0], auto_variant()]):  # today's and what `auto` picks here
            if name in variants:
                plan += [(name, "semantic", 16), (name, "auto", 4)]
        for name, strategy, shots in plan:
            model = work / f"{len(rows)}.safetensors"
            fit, _ = run_child(args, "fit", variant=name, strategy=strategy, shots=shots,
                               category=args.category, model=model)
            pred, _ = run_child(args, "predict", variant=name, model=model, category=args.category,
                                images=args.images)
            row = {"variant": name, "strategy": strategy, "shots": shots, **fit, **pred,
                   "ratio": pred["predict_ms"] / forward[name]["forward_ms"]}
            if strategy == "semantic" and shots == 4:
                image = category(args.data, args.category).test[0].path
                row["cli_s"] = cold_cli_predict(args, model, image, work)
                row["outside_s"] = row["cli_s"] - row["first"]["forward"] - row["first"]["knn"]
            rows.append(row)
            print(f"  {name} / {strategy} / {shots} shots: fit {fit['fit_s']:.1f} s, predict "
                  f"{pred['predict_ms']:.0f} ms/image", flush=True)
    print_table(rows, forward, drift)
    if drift:
        print_drift(drift, args)


def print_table(rows: list[dict], forward: dict, drift: dict) -> None:
    print("\n| runtime | strategy | shots | fit s | predict ms/image | ratio to ViT forward | "
          "peak RSS fit / predict MB | model MB | drift (img/pix/PRO points) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        d = drift.get(r["variant"]) if r["strategy"] == "semantic" else None
        shown = "not run" if d is None else \
            "/".join(f"{v:+.2f}" for v in d["drift"].values()) + (" pass" if d["passes"] else " FAIL")
        strategy = r["strategy"] if r["strategy"] != "auto" else f"auto -> {r['chosen']}"
        print(f"| {r['variant']} | {strategy} | {r['shots']} | {r['fit_s']:.1f} | {r['predict_ms']:.0f} | "
              f"{r['ratio']:.2f} | {r['fit_rss_mb']:.0f} / {r['predict_rss_mb']:.0f} | {r['file_mb']:.1f} | {shown} |")
    by = {(r["variant"], r["strategy"], r["shots"]): r for r in rows}
    print()
    for name in forward:
        sem4, sem16, auto4 = by.get((name, "semantic", 4)), by.get((name, "semantic", 16)), by.get((name, "auto", 4))
        if sem4 and "cli_s" in sem4:
            print(f"- {name}: cold `astfad predict` of one image {sem4['cli_s']:.2f} s, of which backbone "
                  f"forward {sem4['first']['forward']:.2f} s and kNN {sem4['first']['knn']:.2f} s: "
                  f"{sem4['outside_s']:.2f} s outside them (import {sem4['import_s']:.2f} s, load {sem4['load_s']:.2f} s)")
        if sem16 and sem4 and auto4:
            print(f"- {name}: semantic fit 16 shots {sem16['fit_s']:.1f} s; auto fit 4 shots {auto4['fit_s']:.1f} s "
                  f"= {auto4['fit_s'] / sem4['fit_s']:.2f} x semantic fit; auto file {auto4['file_mb']:.1f} MB")
    base = by.get(("torch fp32", "semantic", 4))
    if base:
        for (name, strategy, shots), r in by.items():
            if strategy == "semantic" and shots == 4:
                print(f"- semantic predict speed-up of {name} over torch fp32: {base['predict_ms'] / r['predict_ms']:.2f}x")


def print_drift(drift: dict, args: argparse.Namespace) -> None:
    print(f"\nDrift vs torch fp32 (semantic; shots {args.shots_list}, seeds {args.seeds}, "
          f"categories {args.categories or 'all'}, <= {args.drift_images} test images each; points)")
    print("| variant | image AUROC | pixel AUROC | AUPRO | d image | d pixel | d AUPRO | rule (< 0.5) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, r in drift.items():
        d = r["drift"]
        print(f"| {name} | {100 * r['image_auroc']:.2f} | {100 * r['pixel_auroc']:.2f} | {100 * r['aupro']:.2f} | "
              f"{d['image_auroc']:+.2f} | {d['pixel_auroc']:+.2f} | {d['aupro']:+.2f} | "
              f"{'pass' if r['passes'] else 'FAIL'} |")


if __name__ == "__main__":
    main()
