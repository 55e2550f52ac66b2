"""Speed and memory of the backbones available offline.

    python benchmarks/backbones.py            # every offline backbone, default settings
    python benchmarks/backbones.py --nchw     # also the CNNs without channels_last, for comparison
    python benchmarks/backbones.py --reps 10

Each configuration runs in a fresh subprocess so that memory figures do not mix. Forward time is per
image (median and best of ``--reps`` timed batches after one warm-up batch, under
``torch.inference_mode``). Memory: peak resident set size during the timed forwards minus the resident
size just before them (the peak counter is reset through ``/proc/self/clear_refs`` where Linux allows,
otherwise ``resource.getrusage`` max RSS is used and load-time peaks may hide the figure), measured
from before the warm-up batch, so it is the working memory of one forward of that batch. With CUDA,
the same is timed on the GPU and ``torch.cuda.max_memory_allocated`` is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = [
    # name, input size, batch, extra
    ("efficientnet_lite0", 256, 8, {}),
    ("efficientnet_lite2", 256, 8, {}),
    ("wide_resnet50_2", 256, 8, {}),
    ("dinov2_vits14", 224, 4, {"layers": [11]}),
    ("dinov2_vits14", 448, 4, {"layers": [11]}),
    ("dinov2_vits14", 448, 4, {"layers": [7]}),
]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_one(cfg: dict) -> dict:
    import torch

    from astfad.backbones import load_backbone

    name, size, batch, reps = cfg["name"], cfg["size"], cfg["batch"], cfg["reps"]
    rss0 = _rss_mb()
    t = time.perf_counter()
    m = load_backbone(name)
    load_s = time.perf_counter() - t
    if m.kind == "cnn" and cfg.get("nchw"):
        m.channels_last = False
        m.to(memory_format=torch.contiguous_format)
    x = torch.rand(batch, 3, size, size)
    layers = cfg.get("layers")

    def fwd(model, inp):
        return model(inp) if model.kind == "cnn" else model.forward_tokens(inp, layers)

    res = {**cfg, "load_s": load_s, "model_rss_mb": _rss_mb() - rss0, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        before = _rss_mb()  # model and input resident; the forward's working memory comes on top
        reset_ok = _reset_peak()
        base_peak = _peak_mb(reset_ok)
        fwd(m, x)  # warm-up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fwd(m, x)
            times.append((time.perf_counter() - t) / batch)
        peak = _peak_mb(reset_ok)
    res.update(
        cpu_ms_med=1000 * statistics.median(times),
        cpu_ms_min=1000 * min(times),
        peak_delta_mb=peak - (before if reset_ok else base_peak),
        peak_method="VmHWM" if reset_ok else "ru_maxrss",
    )
    if torch.cuda.is_available():
        mc = m.to("cuda")
        xc = x.to("cuda")
        with torch.inference_mode():
            fwd(mc, xc)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(max(reps, 10)):
                t = time.perf_counter()
                fwd(mc, xc)
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) / batch)
        res.update(
            cuda_ms_med=1000 * statistics.median(times),
            cuda_peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20,
            cuda_model_mb=base / 2**20,
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nchw", action="store_true", help="also time the CNNs in NCHW (no channels_last)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return

    from astfad.backbones import available_offline

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda={torch.cuda.is_available()}")
    jobs = []
    for name, size, batch, extra in CONFIGS:
        if not available_offline(name):
            print(f"(skipped {name}: weights not available offline)")
            continue
        jobs.append({"name": name, "size": size, "batch": batch, "reps": args.reps, **extra})
        if args.nchw and name.startswith(("efficientnet", "wide_resnet")):
            jobs.append({"name": name, "size": size, "batch": batch, "reps": args.reps, "nchw": True, **extra})
    cuda = torch.cuda.is_available()
    head = f"{'backbone':<20} {'input':>9} {'batch':>5} {'layout/layers':>14} {'load s':>7} {'ms/img med':>10} {'ms/img min':>10} {'model MB':>8} {'fwd peak MB':>11}"
    if cuda:
        head += f" {'cuda ms/img':>11} {'cuda peak MB':>12}"
    print(head)
    print("-" * len(head))
    for job in jobs:
        out = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(job)], capture_output=True, text=True, check=False
        )
        if out.returncode:
            print(f"{job['name']:<20} FAILED: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if "layers" in r:
            what = "blocks 0-" + str(max(r["layers"]))
        else:
            what = "nchw" if r.get("nchw") else "channels_last"
        line = (
            f"{r['name']:<20} {str(r['size']) + 'px':>9} {r['batch']:>5} {what:>14} {r['load_s']:>7.2f} "
            f"{r['cpu_ms_med']:>10.1f} {r['cpu_ms_min']:>10.1f} {r['model_rss_mb']:>8.0f} {r['peak_delta_mb']:>11.0f}"
        )
        if cuda:
            line += f" {r['cuda_ms_med']:>11.2f} {r['cuda_peak_mb']:>12.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
