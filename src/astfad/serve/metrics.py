"""Prometheus text exposition without a client library: request counts by route and status, a
latency histogram per route, errors by kind, predicted images, batch sizes and the gauges the app
passes in when it renders (queue depth, loaded models)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{{{inner}}}" if inner else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = [f"{name}_bucket{_labels(**labels, le=_num(b))} {c}" for b, c in zip(self.buckets, self.counts)]
        out.append(f"{name}_bucket{_labels(**labels, le='+Inf')} {self.n}")
        out.append(f"{name}_sum{_labels(**labels)} {self.total:.6f}")
        out.append(f"{name}_count{_labels(**labels)} {self.n}")
        return out


def _num(value: float) -> str:
    return f"{value:g}"


class Metrics:
    """Thread-safe counters and histograms; `render` gives the text /metrics serves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self._latency: dict[str, _Histogram] = {}
        self._errors: dict[str, int] = defaultdict(int)
        self._batches = _Histogram(BATCH_BUCKETS)
        self._images = 0
        self._inference_seconds = 0.0

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, method, str(status))] += 1
            self._latency.setdefault(route, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1

    def batch(self, images: int, seconds: float) -> None:
        with self._lock:
            self._batches.observe(images)
            self._images += images
            self._inference_seconds += seconds

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """`gauges`: name -> (help, value)."""
        with self._lock:
            lines = ["# HELP astfad_requests_total HTTP requests by route template, method and status.",
                     "# TYPE astfad_requests_total counter"]
            lines += [f"astfad_requests_total{_labels(route=r, method=m, status=s)} {n}"
                      for (r, m, s), n in sorted(self._requests.items())]
            lines += ["# HELP astfad_request_duration_seconds Request latency by route template.",
                      "# TYPE astfad_request_duration_seconds histogram"]
            for route, hist in sorted(self._latency.items()):
                lines += hist.lines("astfad_request_duration_seconds", {"route": route})
            lines += ["# HELP astfad_errors_total Error responses by kind.",
                      "# TYPE astfad_errors_total counter"]
            lines += [f"astfad_errors_total{_labels(kind=k)} {n}" for k, n in sorted(self._errors.items())]
            lines += ["# HELP astfad_predicted_images_total Images scored by the inference worker.",
                      "# TYPE astfad_predicted_images_total counter",
                      f"astfad_predicted_images_total {self._images}",
                      "# HELP astfad_inference_seconds_total Seconds the worker spent in Detector.predict.",
                     "# TYPE astfad_inference_seconds_total counter",
                     f"astfad_inference_seconds_total {self._inference_seconds:.6f}",
                     "# HELP astfad_batch_images Images per shared Detector.predict call (micro-batches).",
                      "# TYPE astfad_batch_images histogram"]
            lines += self._batches.lines("astfad_batch_images", {})
        for name, (help_text, value) in gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        return "\n".join(lines) + "\n"
