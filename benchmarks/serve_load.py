"""Loopback load test of `astfad serve`: throughput, latency percentiles, errors by status and the
server's memory at concurrency 1, 4 and 16, against in-process `Detector.predict` on this machine.

    python benchmarks/serve_load.py                      # a texture model fitted on generated images
    python benchmarks/serve_load.py --models DIR --model NAME --images 'dir/*.png'

Starts the server as a subprocess on 127.0.0.1 (a free port), sends at most --requests requests of
one image each per concurrency level (and at most --time-limit seconds per level), then stops it.
Traffic goes to 127.0.0.1 only. The server's queue is small (--max-queue 8) so that concurrency 16
overloads it on purpose: the 503s it answers there are deliberate (clients then back off for the
Retry-After, at most 1 s), any other 5xx is a failure.

In-process `Detector.predict` is timed before and after the load (the faster is the reference).
Per level: throughput and its ratio to in-process at the same batch size, latency percentiles of
the answered requests, the mean micro-batch, how busy the inference worker was, its milliseconds
per image, the server's CPU milliseconds per request (HTTP, decoding and predict together) and its
RSS. Targets (issue 13): p95 at c=4 <= 1.5 x the in-process time of one batch of 4; throughput at
c=4 >= 0.8 x in-process; RSS at the end within 10% of RSS after warm-up (warm-up runs every level
briefly, so every batch shape has been allocated once). Client and server share this machine's
CPUs, and so does anyone else working on it: wall-clock figures are noisy, CPU time much less so.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from astfad.serve.worker import IDLE_TRIM_S  # the server gives memory back after this idle time

WARMUP_SECONDS = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (a measure that others' load disturbs far less than wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def default_model(folder: Path) -> tuple[str, list[Path]]:
    """A texture model fitted on 4 generated washer images, and 8 generated test images."""
    from astfad.data.synthetic import generate_synthetic_dataset
    from astfad.detector import Detector

    data = generate_synthetic_dataset(folder / "data", categories=["washer"], n_train=4, n_test_good=4,
                                      n_test_per_defect=2, size=256)
    train = sorted((data / "washer" / "train" / "good").glob("*.png"))
    Detector("texture").fit(train).save(folder / "models" / "washer.safetensors")
    return "washer", sorted((data / "washer" / "test").glob("*/*.png"))


def in_process(model: Path, images: list[Path], sizes: list[int], seconds: float) -> dict[int, dict[str, float]]:
    """Per batch size: median and p95 seconds of one `Detector.predict` call, and images/s."""
    from astfad.data.images import load_image
    from astfad.detector import Detector

    det = Detector.load(model)
    arrays = [load_image(p) for p in images]
    det.predict(arrays[:1])  # warm-up
    out = {}
    for size in sizes:
        batch = [arrays[i % len(arrays)] for i in range(size)]
        times: list[float] = []
        cpu = time.process_time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(times) < 3:
            start = time.perf_counter()
            det.predict(batch, batch_size=size)
            times.append(time.perf_counter() - start)
        out[size] = {"median": float(np.median(times)), "p95": percentile(times, 95),
                     "throughput": size / float(np.median(times)), "calls": len(times),
                     "cpu_ms_per_image": 1000 * (time.process_time() - cpu) / (size * len(times))}
    return out


async def load_level(url: str, payloads: list[tuple[str, bytes]], concurrency: int, requests: int,
                     time_limit: float, api_key: str | None) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter[int | str] = Counter()
    sent = 0
    headers = {"X-API-Key": api_key} if api_key else {}
    deadline = time.perf_counter() + time_limit

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            name, data = payloads[sent % len(payloads)]
            sent += 1
            start = time.perf_counter()
            try:
                r = await client.post(url, files={"images": (name, data, "image/png")}, headers=headers)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                elif r.status_code == 503:  # a polite client backs off (here at most 1 s)
                    await asyncio.sleep(min(1.0, float(r.headers.get("Retry-After", 1))))
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "sent": sent, "ok": statuses.get(200, 0), "seconds": elapsed,
            "throughput": statuses.get(200, 0) / elapsed, "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95), "p99": percentile(latencies, 99), "statuses": dict(statuses)}


class RssSampler(threading.Thread):
    """The server's resident memory every 0.2 s; `peak` also reads the kernel's high-water mark."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            self.samples.append(rss_kib(self.pid))

    def peak(self) -> int:
        return max([rss_kib(self.pid, "VmHWM"), *self.samples])


def worker_totals(base: str, api_key: str) -> tuple[float, float, float, float]:
    """(images, Detector.predict calls, seconds in them, wall clock) so far, from /metrics."""
    import httpx

    text = httpx.get(base + "/metrics", headers={"X-API-Key": api_key}, timeout=10).text
    names = ("astfad_batch_images_sum", "astfad_batch_images_count", "astfad_inference_seconds_total")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(names))
    return (*(float(values[n]) for n in names), time.perf_counter())


def wait_healthy(base: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    import httpx

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not answer /health in time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=None, help="Models folder (default: fit one on generated data).")
    parser.add_argument("--model", default=None, help="Model name in --models.")
    parser.add_argument("--images", default=None, help="Glob of test images (default: the generated ones).")
    parser.add_argument("--requests", type=int, default=500, help="Requests per concurrency level.")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--time-limit", type=float, default=60.0, help="Seconds per level at most.")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16, help="The server's micro-batch limit.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads, in-process and in the server.")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    os.environ.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="astfad-serve-load-")
    if args.models is None:
        name, images = default_model(Path(scratch.name))
        models = Path(scratch.name) / "models"
    else:
        if args.model is None or args.images is None:
            parser.error("--models needs --model and --images")
        models, name, images = args.models, args.model, sorted(Path(p) for p in glob.glob(args.images))
    payloads = [(p.name, p.read_bytes()) for p in images]

    sizes = sorted({min(c, 16) for c in levels})
    print(f"model '{name}', {len(images)} distinct test images, server --max-batch {args.max_batch} "
          f"--max-queue {args.max_queue}, torch threads {args.threads}, "
          f"{os.cpu_count()} CPUs (shared: timings are noisy)")
    before = in_process(models / f"{name}.safetensors", images, sizes, seconds=5.0)

    port = free_port()
    api_key = "load-test"
    command = [sys.executable, "-c", "import sys; from astfad.serve.command import serve; serve(sys.argv[1:])",
               "--models", str(models), "--host", "127.0.0.1", "--port", str(port),
               "--max-queue", str(args.max_queue), "--max-batch", str(args.max_batch)]
    log = open(Path(scratch.name) / "server.log", "w+")
    server = subprocess.Popen(command, env={**os.environ, "ASTFAD_API_KEY": api_key},
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/models/{name}/predict"
    try:
        wait_healthy(base, server)
        for c in levels:  # every level for a while, so that later growth would be a leak
            asyncio.run(load_level(url, payloads, c, 10**6, WARMUP_SECONDS, api_key))
        time.sleep(IDLE_TRIM_S + 0.5)  # RSS after warm-up and at the end are both taken idle
        sampler = RssSampler(server.pid)
        sampler.start()
        rss_warm = rss_kib(server.pid)
        results = []
        for c in levels:
            start, cpu = worker_totals(base, api_key), cpu_seconds(server.pid)
            results.append(asyncio.run(load_level(url, payloads, c, args.requests, args.time_limit, api_key)))
            cpu = cpu_seconds(server.pid) - cpu
            scored, calls, busy, wall = (b - a for a, b in zip(start, worker_totals(base, api_key)))
            results[-1].update(rss=rss_kib(server.pid), batch=scored / max(calls, 1), busy=busy / wall,
                               ms_per_image=1000 * busy / max(scored, 1),
                               cpu_ms_per_request=1000 * cpu / max(results[-1]["sent"], 1))
        time.sleep(IDLE_TRIM_S + 0.5)
        rss_end = rss_kib(server.pid)
        sampler.stop.set()
        peak = sampler.peak()
        after = in_process(models / f"{name}.safetensors", images, sizes, seconds=5.0)  # server idle
    except BaseException:
        log.seek(0)
        print(log.read()[-3000:], file=sys.stderr)
        raise
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        scratch.cleanup()

    # the faster of the two measurements is the reference: the targets are judged conservatively
    base_line = {size: min(before[size], after[size], key=lambda row: row["median"]) for size in sizes}
    for when, table in (("before", before), ("after", after)):
        for size, row in table.items():
            print(f"in-process Detector.predict {when:<6} the load, batch {size:>2}: {row['median'] * 1000:7.1f} ms "
                  f"per batch (p95 {row['p95'] * 1000:.1f}), {row['throughput']:6.1f} images/s, "
                  f"CPU {row['cpu_ms_per_image']:.1f} ms per image, {row['calls']} calls")

    print(f"\n{'c':>3} {'sent':>5} {'ok':>5} {'img/s':>7} {'x in-proc':>9} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'batch':>5} {'busy':>5} {'ms/img':>6} {'CPU ms':>6} {'RSS MiB':>7}  statuses")
    for r in results:
        ref = base_line[min(r["concurrency"], 16)]
        print(f"{r['concurrency']:>3} {r['sent']:>5} {r['ok']:>5} {r['throughput']:7.1f} "
              f"{r['throughput'] / ref['throughput']:9.2f} {r['p50'] * 1000:7.1f} {r['p95'] * 1000:7.1f} "
              f"{r['p99'] * 1000:7.1f} {r['batch']:5.1f} {r['busy']:5.0%} {r['ms_per_image']:6.1f} "
              f"{r['cpu_ms_per_request']:6.1f} {r['rss'] / 1024:7.1f}  {r['statuses']}")
    print(f"\nserver RSS: after warm-up {rss_warm / 1024:.1f} MiB, at the end {rss_end / 1024:.1f} MiB "
          f"({100 * (rss_end - rss_warm) / rss_warm:+.1f}%), peak {peak / 1024:.1f} MiB")

    other_5xx = sum(n for r in results for s, n in r["statuses"].items()
                    if not isinstance(s, int) or (s >= 500 and s != 503))
    at4 = next((r for r in results if r["concurrency"] == 4), None)
    checks = [("no 5xx other than deliberate 503s, no connection errors", other_5xx == 0),
              ("RSS at the end within 10% of after warm-up", abs(rss_end - rss_warm) <= 0.1 * rss_warm)]
    if at4 is not None:
        ref = base_line[4]
        checks += [(f"p95 at c=4 {at4['p95'] * 1000:.0f} ms <= 1.5 x in-process batch of 4 "
                    f"({1.5 * ref['median'] * 1000:.0f} ms)", at4["p95"] <= 1.5 * ref["median"]),
                   (f"throughput at c=4 {at4['throughput'] / ref['throughput']:.2f} x in-process >= 0.8",
                    at4["throughput"] >= 0.8 * ref["throughput"])]
    if at4 is not None:
        ref = base_line[4]
        print(f"CPU per request at c=4: server {at4['cpu_ms_per_request']:.1f} ms (HTTP, decoding and predict) "
              f"vs in-process {ref['cpu_ms_per_image']:.1f} ms per image at batch 4: "
              f"{at4['cpu_ms_per_request'] / ref['cpu_ms_per_image']:.2f} x (less disturbed by others' load)")
    print()
    for text, ok in checks:
        print(f"[{'ok' if ok else 'MISSED'}] {text}")


if __name__ == "__main__":
    main()
