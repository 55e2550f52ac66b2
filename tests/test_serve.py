"""The inspection service through HTTP (httpx via FastAPI's TestClient, lifespan included), with a
model fitted on stand-in backbones: every endpoint, every refusal, and that the server keeps
serving after each bad request."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
import torch
from PIL import Image
from safetensors.torch import save_file

import astfad.detector
from astfad.detector import Detector
from conftest import fake_load_backbone, make_part

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # Starlette nudges TestClient users towards httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from astfad.serve.app import create_app  # noqa: E402
from astfad.serve.store import ModelStore  # noqa: E402

KEY = "s3cret-key"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 200-byte PNG whose header declares 10^10 pixels: decoding it would exhaust memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def fakes():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(astfad.detector, "load_backbone", fake_load_backbone)
        yield


def _images() -> dict:
    rng = np.random.default_rng(0)
    train = [make_part(rng)[0] for _ in range(6)]
    return {"train": train, "good": png(make_part(rng)[0]), "bad": png(make_part(rng, defect=True)[0]),
            "train_png": [png(a) for a in train]}


IMAGES = _images()


@pytest.fixture(scope="module")
def images() -> dict:
    return IMAGES


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, fakes, images) -> Path:
    folder = tmp_path_factory.mktemp("models")
    # a lenient false-alarm target: the stand-in part set is tiny and its held-out scores spread wide
    Detector("texture", target_fpr=0.05).fit(images["train"]).save(folder / "parts.safetensors")
    return folder


@pytest.fixture(scope="module")
def client(models_dir):
    app = create_app(models_dir, max_body_mb=0.5, max_pixels=300 * 300, max_files=8, fit_config={"target_fpr": 0.05})
    with TestClient(app) as c:
        yield c


def predict(client, name="parts", files=None, **params):
    files = files if files is not None else [("images", ("bad.png", IMAGES["bad"], "image/png"))]
    return client.post(f"/models/{name}/predict", files=files, params=params)


def assert_still_serving(client, images) -> None:
    r = client.post("/models/parts/predict", files=[("images", ("good.png", images["good"], "image/png")),
                                                    ("images", ("bad.png", images["bad"], "image/png"))])
    assert r.status_code == 200, r.text
    assert [x["verdict"] for x in r.json()["results"]] == ["normal", "anomalous"]


# ---------------------------------------------------------------------------- happy paths
def test_health_models_and_details(client):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["api_key_required"] is False
    listed = client.get("/models").json()["models"]
    assert [m["name"] for m in listed] == ["parts"]
    assert listed[0]["strategy"] == "texture" and listed[0]["shots"] == 6
    assert listed[0]["threshold"] > 0 and listed[0]["pixel_threshold"] > 0 and listed[0]["size_bytes"] > 0
    assert listed[0]["calibration"] is None  # the thresholds are the fit's
    details = client.get("/models/parts").json()
    assert details["experts"] == ["texture"] and details["selection"] is None
    assert len(details["shot_names"]) == 6 and details["config"]["strategy"] == "texture"


def test_predict_scores_verdicts_and_thresholds(client, images, models_dir):
    before = sorted(p.name for p in models_dir.iterdir())
    r = client.post("/models/parts/predict", files=[("images", ("good.png", images["good"], "image/png")),
                                                    ("images", ("bad.png", images["bad"], "image/png"))])
    assert r.status_code == 200
    body = r.json()
    det = Detector.load(models_dir / "parts.safetensors")
    expected = det.predict([Image.open(io.BytesIO(images["good"])), Image.open(io.BytesIO(images["bad"]))])
    assert body["threshold"] == pytest.approx(det.threshold) and body["threshold_source"] == "model"
    for result, pred in zip(body["results"], expected):
        assert result["score"] == pytest.approx(pred.score, rel=1e-5)
        assert result["verdict"] == ("anomalous" if pred.is_anomalous else "normal")
        assert result["anomalous_area"] == pytest.approx(pred.mask.mean())
        assert (result["height"], result["width"]) == pred.mask.shape
        assert "overlay_png" not in result
    assert [x["verdict"] for x in body["results"]] == ["normal", "anomalous"]
    assert sorted(p.name for p in models_dir.iterdir()) == before  # uploads are not stored


def test_overlay_and_mask_pictures(client):
    result = predict(client, overlay="true").json()["results"][0]
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["overlay_png"]))))
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["mask_png"]))))
    assert overlay.shape == (result["height"], result["width"], 3)
    assert mask.shape == (result["height"], result["width"]) and set(np.unique(mask)) <= {0, 255}
    assert (mask == 255).mean() == pytest.approx(result["anomalous_area"]) and result["anomalous_area"] > 0


def test_threshold_override(client):
    high = predict(client, threshold=1e9).json()
    low = predict(client, threshold=-1).json()
    assert high["threshold_source"] == "request" and high["results"][0]["verdict"] == "normal"
    assert low["results"][0]["verdict"] == "anomalous" and low["results"][0]["threshold"] == -1
    both = predict(client, threshold=1, target_fpr=0.1)
    assert both.status_code == 400 and "not both" in both.json()["error"]
    assert predict(client, threshold="nan").status_code == 400


def test_target_fpr(client, models_dir):
    det = Detector.load(models_dir / "parts.safetensors")
    body = predict(client, target_fpr=0.2).json()
    assert body["threshold_source"] == "target_fpr"
    assert body["threshold"] == pytest.approx(det.threshold_for(target_fpr=0.2))
    assert body["pixel_threshold"] == pytest.approx(det.pixel_threshold_for(target_fpr=0.2))
    assert predict(client, target_fpr=1.5).status_code == 422


def test_one_bad_image_does_not_sink_the_batch(client, images):
    r = client.post("/models/parts/predict", files=[("images", ("junk.png", b"not an image", "image/png")),
                                                    ("images", ("bad.png", images["bad"], "image/png"))])
    assert r.status_code == 200
    junk, bad = r.json()["results"]
    assert junk == {"file": "junk.png", "error": "cannot read image 'junk.png': not a recognised image format",
                    "status": 400}
    assert bad["verdict"] == "anomalous"


# ---------------------------------------------------------------------------- refusals
def _chunked_multipart(size: int):
    boundary = "astfadboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    body = [head] + [b"\0" * 65536] * (size // 65536) + [f"\r\n--{boundary}--\r\n".encode()]
    return iter(body), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


BAD_REQUESTS = {
    "no file": (lambda c, im: c.post("/models/parts/predict"), 400, "no image"),
    "empty file": (lambda c, im: predict(c, files=[("images", ("e.png", b"", "image/png"))]), 400, "empty file"),
    "corrupt image": (lambda c, im: predict(c, files=[("images", ("x.png", b"\x89PNG\r\n\x1a\ngarbage", "image/png"))]),
                      400, "cannot read image 'x.png'"),
    "truncated image": (lambda c, im: predict(c, files=[("images", ("t.png", im["bad"][:len(im["bad"]) // 2], "image/png"))]),
                        400, "cannot read image 't.png'"),
    "huge image": (lambda c, im: predict(c, files=[("images", ("h.png", png(np.zeros((400, 400, 3), np.uint8)), "image/png"))]),
                   413, "400x400 = 160,000 pixels"),
    "decompression bomb": (lambda c, im: predict(c, files=[("images", ("b.png", bomb_png(), "image/png"))]),
                           413, "too many pixels"),
    "oversized body": (lambda c, im: predict(c, files=[("images", ("o.png", b"\0" * 600_000, "image/png"))]),
                       413, "over the limit of 0.5 MB"),
    "oversized chunked body": (lambda c, im: c.post("/models/parts/predict", content=_chunked_multipart(700_000)[0],
                                                    headers=_chunked_multipart(0)[1]), 413, "over the limit"),
    "too many files": (lambda c, im: predict(c, files=[("images", (f"{i}.png", im["good"], "image/png")) for i in range(9)]),
                       413, "limit is 8"),
    "unknown model": (lambda c, im: predict(c, name="nope"), 404, "no model named 'nope'"),
    "bad name": (lambda c, im: predict(c, name="a.b"), 400, "invalid model name"),
    "dot-dot name": (lambda c, im: predict(c, name="%2E%2E"), 400, "invalid model name '..'"),
    "path traversal": (lambda c, im: predict(c, name="..%2F..%2Fetc%2Fpasswd"), 404, "Not Found"),
    "unknown job": (lambda c, im: c.get("/jobs/0123"), 404, "no job"),
    "unknown route": (lambda c, im: c.get("/nowhere"), 404, "Not Found"),
    "bad query": (lambda c, im: predict(c, threshold="abc"), 422, "threshold"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_one_line_json_error_and_server_keeps_serving(client, images, case):
    send, status, text = BAD_REQUESTS[case]
    r = send(client, images)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert text in error and "\n" not in error and set(r.json()) == {"error"}
    assert_still_serving(client, images)


def test_api_key(models_dir, images):
    with TestClient(create_app(models_dir, api_key=KEY)) as c:
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = c.get("/models", headers=headers)
            assert r.status_code == 401 and r.json() == {"error": "missing or wrong API key (send it as X-API-Key)"}
        r = c.post("/models/parts/predict", files=[("images", ("bad.png", images["bad"], "image/png"))])
        assert r.status_code == 401
        assert c.get("/metrics").status_code == 401
        metrics = c.get("/metrics", headers={"X-API-Key": KEY}).text
        assert 'astfad_requests_total{route="refused before routing",method="GET",status="401"}' in metrics
        assert c.get("/models", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        r = c.post("/models/parts/predict", headers={"X-API-Key": KEY},
                   files=[("images", ("bad.png", images["bad"], "image/png"))])
        assert r.status_code == 200 and r.json()["results"][0]["verdict"] == "anomalous"


def test_cors_is_off_by_default(client, models_dir):
    origin = {"Origin": "https://elsewhere.example"}
    assert "access-control-allow-origin" not in client.get("/models", headers=origin).headers
    with TestClient(create_app(models_dir, cors_origins=["https://elsewhere.example"])) as c:
        assert c.get("/models", headers=origin).headers["access-control-allow-origin"] == "https://elsewhere.example"


# ---------------------------------------------------------------------------- worker
class HeldDetector:
    """A detector wrapper whose predict waits for `release` and records its batch sizes."""

    def __init__(self, det: Detector) -> None:
        self.det, self.release, self.started, self.sizes = det, threading.Event(), threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.det, name)

    def predict(self, images, batch_size=16):
        self.sizes.append(len(images))
        self.started.set()
        assert self.release.wait(30)
        return self.det.predict(images, batch_size)


def _held_app(models_dir, **kwargs):
    app = create_app(models_dir, **kwargs)
    store = app.state.store
    held = HeldDetector(Detector.load(models_dir / "parts.safetensors"))
    store.loader = lambda path: held
    return app, held


def _post_in_thread(c, images, out, i):
    out[i] = c.post("/models/parts/predict", files=[("images", (f"{i}.png", images["bad"], "image/png"))])


def _wait(condition, seconds=10.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_requests_that_arrive_together_share_one_predict_call(models_dir, images):
    app, held = _held_app(models_dir, max_queue=8)
    out = {}
    with TestClient(app) as c:
        first = threading.Thread(target=_post_in_thread, args=(c, images, out, 0))
        first.start()
        assert held.started.wait(10)
        threads = [threading.Thread(target=_post_in_thread, args=(c, images, out, i)) for i in range(1, 5)]
        for t in threads:
            t.start()
        _wait(lambda: app.state.worker.depth() == 4)
        held.release.set()
        for t in [first, *threads]:
            t.join(30)
        assert all(out[i].status_code == 200 for i in range(5))
        assert held.sizes == [1, 4]  # the four waiting requests shared one forward pass
        metrics = c.get("/metrics").text
        assert 'astfad_batch_images_bucket{le="4"} 2' in metrics


def test_full_queue_gives_503_with_retry_after(models_dir, images):
    app, held = _held_app(models_dir, max_queue=1)
    out = {}
    with TestClient(app) as c:
        first = threading.Thread(target=_post_in_thread, args=(c, images, out, 0))
        first.start()
        assert held.started.wait(10)
        second = threading.Thread(target=_post_in_thread, args=(c, images, out, 1))
        second.start()
        _wait(lambda: app.state.worker.depth() == 1)
        r = c.post("/models/parts/predict", files=[("images", ("x.png", images["bad"], "image/png"))])
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "queue is full" in r.json()["error"]
        held.release.set()
        first.join(30)
        second.join(30)
        assert out[0].status_code == 200 and out[1].status_code == 200
        assert_still_serving(c, images)
        assert 'astfad_errors_total{kind="queue_full"} 1' in c.get("/metrics").text


def test_worker_gives_memory_back_once_idle_after_work(models_dir, images):
    calls = []
    app = create_app(models_dir)
    app.state.worker.idle_trim_s = 0.2
    app.state.worker.release_memory = lambda: calls.append(time.monotonic())
    with TestClient(app) as c:
        time.sleep(0.5)
        assert calls == []  # nothing scored yet: nothing to give back
        assert_still_serving(c, images)
        _wait(lambda: len(calls) == 1)
        time.sleep(0.5)
        assert len(calls) == 1  # once per idle spell, not every 0.2 s


def test_metrics_in_prometheus_text(client):
    predict(client)
    predict(client, name="nope")
    text = client.get("/metrics").text
    assert 'astfad_requests_total{route="/models/{name}/predict",method="POST",status="200"}' in text
    assert 'astfad_requests_total{route="/models/{name}/predict",method="POST",status="404"}' in text
    assert 'astfad_request_duration_seconds_bucket{route="/models/{name}/predict",le="+Inf"}' in text
    assert "# TYPE astfad_queue_depth gauge\nastfad_queue_depth 0" in text
    assert 'astfad_errors_total{kind="unknown_model"}' in text
    assert "astfad_predicted_images_total" in text


# ---------------------------------------------------------------------------- fit jobs and the store
def _fit(client, images, name, **data):
    files = [("images", (f"good_{i}.png", b, "image/png")) for i, b in enumerate(images["train_png"])]
    return client.post("/models", data={"name": name, "strategy": "texture", **data}, files=files)


def _finished(client, job_id):
    for _ in range(300):
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError("the fit job did not finish")


def test_fit_job_creates_a_model_then_delete(client, images, models_dir):
    r = _fit(client, images, "line-2", shots="4", seed="1")
    assert r.status_code == 202 and r.headers["Location"] == r.json()["url"]
    job = _finished(client, r.json()["job"])
    assert job["status"] == "done" and job["progress"] == 100 and job["model"]["shots"] == 4
    assert job["warnings"] == []
    assert (models_dir / "line-2.safetensors").is_file()
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert "line-2" in [m["name"] for m in client.get("/models").json()["models"]]
    assert predict(client, name="line-2").json()["results"][0]["verdict"] == "anomalous"
    assert _fit(client, images, "line-2").status_code == 409
    assert client.delete("/models/line-2").json() == {"deleted": "line-2"}
    assert client.get("/models/line-2").status_code == 404
    assert client.delete("/models/line-2").status_code == 404


def test_a_one_shot_fit_job_carries_the_threshold_warning(client, images):
    job = _finished(client, _fit(client, images, "single", shots="1").json()["job"])
    assert job["status"] == "done" and job["model"]["shots"] == 1
    assert len(job["warnings"]) == 1 and "one good image" in job["warnings"][0]


def test_fit_refusals_and_a_failed_job(client, images):
    r = _fit(client, images, "x", strategy="nonsense")
    assert r.status_code == 400 and "unknown strategy" in r.json()["error"]
    assert _fit(client, images, "../evil").status_code == 400
    assert _fit(client, images, "x", shots="99").status_code == 400
    assert client.post("/models", data={"name": "x"}).status_code == 400
    r = client.post("/models", data={"name": "junk-only"}, files=[("images", ("a.png", b"junk", "image/png"))])
    job = _finished(client, r.json()["job"])
    assert job["status"] == "failed" and "no readable image" in job["error"] and job["skipped"]
    assert not client.get("/models/junk-only").status_code == 200
    assert_still_serving(client, images)


def test_store_lists_only_complete_safe_model_files(tmp_path, models_dir):
    (tmp_path / "ok.safetensors").write_bytes((models_dir / "parts.safetensors").read_bytes())
    (tmp_path / ".new.safetensors.1a2b3c4d.tmp").write_bytes(b"partial")  # a save in progress
    (tmp_path / "bad name.safetensors").write_bytes(b"x")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "badjson.safetensors", metadata={"astfad": "[1, 2"})
    store = ModelStore(tmp_path, memory_budget=10**9)
    assert store.names() == ["badjson", "broken", "ok"]
    assert store.summary("ok")["strategy"] == "texture"
    assert "not an astfad detector file" in store.summary("broken")["error"]
    assert "not a JSON object" in store.summary("badjson")["error"]
    with TestClient(create_app(tmp_path)) as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["badjson", "broken", "ok"]
        r = c.get("/models/broken")
        assert r.status_code == 422 and "cannot be used" in r.json()["error"]


def test_store_keeps_an_lru_under_the_memory_budget(tmp_path, models_dir, fakes):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.safetensors").write_bytes((models_dir / "parts.safetensors").read_bytes())
    store = ModelStore(tmp_path, memory_budget=10**12)
    first = store.get("a")
    store.memory_budget = int(2.5 * store.memory_bytes())  # room for two
    store.get("b")
    assert store.get("a") is first  # cached
    store.get("c")  # evicts b, the least recently used
    assert store.loaded() == ["a", "c"]
    assert 0 < store.memory_bytes() <= store.memory_budget


def test_page_is_served_and_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and "<title>astfad inspection</title>" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for path in ("/static/app.js", "/static/style.css"):
        assert client.get(path).status_code == 200
    for text in (r.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert client.get("/openapi.json").json()["paths"]["/models/{name}/predict"]["post"]


def test_api_reference_at_docs_works_offline(client):
    r = client.get("/docs")
    assert r.status_code == 200 and "/openapi.json" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    script = client.get("/static/docs.js")
    assert script.status_code == 200 and "fetch(\"/openapi.json\")" in script.text
    for text in (r.text, script.text):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert client.get("/redoc").status_code == 404


def test_serve_command_builds_the_app(tmp_path, monkeypatch):
    import uvicorn

    from astfad.serve.command import serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(app=app, host=host, port=port))
    result = CliRunner().invoke(serve, ["--models", str(tmp_path / "m"), "--port", "8123", "--api-key", KEY,
                                        "--max-queue", "3", "--max-batch", "2"])
    assert result.exit_code == 0, result.output
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123 and (tmp_path / "m").is_dir()
    assert seen["app"].state.worker.max_queue == 3 and seen["app"].state.worker.max_batch == 2
