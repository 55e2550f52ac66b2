"""The FastAPI app: REST endpoints over the model store, the inference worker and the fit jobs,
the web page at `/`, and one gate every HTTP request passes (API key, body limit, metrics).

    app = create_app("models/", api_key="secret")      # then: uvicorn.run(app)

Every refusal is `{"error": "<one line>"}` with its 4xx status (503 with Retry-After when the
queue is full), and no bad request stops the server: the worker and the fit thread report their
failures per request."""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from astfad import __version__
from astfad.data.images import ImageLoadError
from astfad.detector import Detector, ModelFileError, Prediction
from astfad.pipeline import overlay_scale
from astfad.serve.errors import ServeError, TooLarge, Unauthorized
from astfad.serve.imaging import decode_upload, display_name, pictures
from astfad.serve.jobs import FitJobs
from astfad.serve.metrics import Metrics
from astfad.serve.store import ModelStore, check_name
from astfad.serve.worker import InferenceWorker

STATIC = Path(__file__).resolve().parent / "static"
PUBLIC_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico")
PREDICT_PATH = re.compile(r"/models/[^/]+/predict")
# The page loads nothing from elsewhere: this policy makes the browser enforce it.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-ancestors 'none'")
MB = 1024 * 1024


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class Gate:
    """Pure ASGI middleware in front of every route: refuses a missing or wrong API key (compared
    in constant time) and bodies over `max_body` bytes before anything is parsed, marks arriving
    predict requests for the worker's batching, and records each request in the metrics."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body: int, metrics: Metrics,
                 worker: InferenceWorker) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body
        self.metrics, self.worker = metrics, worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        arrival, route = None, None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                route = "refused before routing"
                self.metrics.error(refusal.kind)
                await error_response(refusal)(scope, receive, send_status)
                return
            if scope["method"] == "POST" and PREDICT_PATH.fullmatch(scope["path"]):
                arrival = self.worker.arrival()
                scope.setdefault("state", {})["arrival"] = arrival
            await self.app(scope, self._limited(receive), send_status)
        finally:
            if arrival is not None:
                arrival.settle()
            route = route or getattr(scope.get("route"), "path", None)
            if route is None:
                route = "/static" if scope["path"].startswith("/static/") else "unmatched"
            self.metrics.request(route, scope["method"], status, time.perf_counter() - start)

    def _refusal(self, scope: Scope) -> ServeError | None:
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = headers.get("x-api-key", "")
            if not given and headers.get("authorization", "").lower().startswith("bearer "):
                given = headers["authorization"][7:].strip()
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return Unauthorized()
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large()
        return None

    def _too_large(self) -> TooLarge:
        return TooLarge(f"request body over the limit of {self.max_body / MB:g} MB")

    def _limited(self, receive: Receive) -> Receive:
        """`receive` that counts the body (chunked uploads carry no Content-Length)."""
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    # FastAPI re-raises an HTTPException met while parsing a body
                    raise HTTPException(413, str(self._too_large()))
            return message

        return limited


def error_response(exc: ServeError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


def check_overrides(threshold: float | None, target_fpr: float | None) -> None:
    if threshold is not None and target_fpr is not None:
        raise ServeError("give either threshold or target_fpr, not both")
    if threshold is not None and not math.isfinite(threshold):
        raise ServeError(f"threshold must be a finite number, got {threshold}")


def thresholds(det: Detector, threshold: float | None, target_fpr: float | None) -> tuple[float, float, str]:
    """(image threshold, pixel threshold, where they come from) for one request."""
    if threshold is not None:
        return threshold, det.pixel_threshold, "request"
    if target_fpr is not None:
        try:
            return (det.threshold_for(target_fpr=target_fpr), det.pixel_threshold_for(target_fpr=target_fpr),
                    "target_fpr")
        except ValueError as exc:
            raise ServeError(one_line(str(exc))) from None
    return det.threshold, det.pixel_threshold, "model"


def describe(name: str, image: np.ndarray, pred: Prediction, det: Detector, image_threshold: float,
             pixel_threshold: float, with_pictures: bool) -> dict[str, Any]:
    """One image's JSON result: score, verdict, thresholds, anomalous area, optional pictures."""
    mask = pred.mask if pixel_threshold == det.pixel_threshold else pred.anomaly_map > pixel_threshold
    out: dict[str, Any] = {"file": name, "score": pred.score,
                           "verdict": "anomalous" if pred.score > image_threshold else "normal",
                           "threshold": image_threshold, "pixel_threshold": pixel_threshold,
                           "anomalous_area": float(mask.mean()), "height": int(image.shape[0]),
                           "width": int(image.shape[1])}
    if with_pictures:
        out.update(pictures(image, pred.anomaly_map, mask, *overlay_scale(det, pixel_threshold)))
    return out


def create_app(models_dir: str | Path, api_key: str | None = None, *, max_queue: int = 32,
               max_batch: int = 16, gather_ms: float = 50.0, memory_budget_mb: float = 2048,
               max_body_mb: float = 64, max_pixels: int = 25_000_000, max_files: int = 64,
               cors_origins: Sequence[str] = (), fit_config: dict[str, Any] | None = None) -> FastAPI:
    """The service over the `*.safetensors` detectors in `models_dir` (created if missing).

    `api_key`: when set, every API route needs it (header X-API-Key or `Authorization: Bearer`);
    the page, /health and the docs stay open. `max_queue` predict requests may wait (more: 503);
    `max_batch` images share one forward pass; `gather_ms` is the longest the worker waits for
    requests still arriving. `fit_config`: DetectorConfig settings for models fitted here.
    CORS is off unless `cors_origins` lists origins."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics()
    store = ModelStore(models_dir, int(memory_budget_mb * MB))
    worker = InferenceWorker(store, metrics, max_queue, max_batch, gather_ms / 1000)
    jobs = FitJobs(store, max_pixels, fit_config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()
            jobs.close()

    # /docs is our own page over /openapi.json: FastAPI's Swagger page loads its scripts from a CDN
    app = FastAPI(title="astfad inspection service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Few-shot visual anomaly detection over saved detectors. Errors are "
                              '`{"error": "..."}`. With an API key set, send it as `X-API-Key`.')
    app.state.store, app.state.worker, app.state.jobs, app.state.metrics = store, worker, jobs, metrics
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(Gate, api_key=api_key, max_body=int(max_body_mb * MB), metrics=metrics, worker=worker)

    def refuse(exc: ServeError) -> JSONResponse:
        metrics.error(exc.kind)
        return error_response(exc)

    @app.exception_handler(ServeError)
    async def _serve_error(_: Request, exc: ServeError) -> JSONResponse:
        return refuse(exc)

    @app.exception_handler(ImageLoadError)
    async def _image_error(_: Request, exc: ImageLoadError) -> JSONResponse:
        return refuse(ServeError(str(exc)))

    @app.exception_handler(ModelFileError)
    async def _model_error(_: Request, exc: ModelFileError) -> JSONResponse:
        return refuse(ServeError(f"the model file cannot be used: {exc}", status=422, kind="bad_model_file"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = " ".join(str(p) for p in first.get("loc", ()))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
        return refuse(ServeError(message, status=422, kind="validation"))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return refuse(ServeError(one_line(exc.detail) if exc.detail else "error", dict(exc.headers or {}),
                                 status=exc.status_code, kind=f"http_{exc.status_code}"))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        metrics.error("internal")
        return JSONResponse({"error": f"internal error: {one_line(str(exc)) or type(exc).__name__}"},
                            status_code=500)

    # ------------------------------------------------------------------ page and health
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health", summary="Liveness and a short status")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "queue_depth": worker.depth(),
                "loaded_models": store.loaded(), "api_key_required": api_key is not None}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        gauges = {"astfad_queue_depth": ("Predict requests waiting for the inference worker.", worker.depth()),
                  "astfad_models_loaded": ("Detectors held in memory.", len(store.loaded())),
                  "astfad_models_memory_bytes": ("Estimated memory of the loaded detectors.", store.memory_bytes())}
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ models
    @app.get("/models", summary="Every model: name, strategy, shots, thresholds and their calibration, size")
    async def list_models() -> dict[str, Any]:
        names = store.names()
        return {"models": await run_in_threadpool(lambda: [store.summary(n) for n in names])}

    @app.get("/models/{name}", summary="A model's metadata and its SelectionReport (auto)")
    async def model_details(name: str) -> dict[str, Any]:
        return await run_in_threadpool(store.details, check_name(name))

    @app.delete("/models/{name}", summary="Delete a model file")
    async def delete_model(name: str) -> dict[str, str]:
        store.delete(check_name(name))
        return {"deleted": name}

    @app.post("/models/{name}/predict", summary="Score one or more images")
    async def predict(request: Request, name: str,
                      images: Annotated[list[UploadFile] | None, File(description="One or more images")] = None,
                      threshold: Annotated[float | None, Query(description="Image threshold for this request")] = None,
                      target_fpr: Annotated[float | None, Query(gt=0, lt=1, description="Thresholds for this false-positive rate on normal data")] = None,
                      overlay: Annotated[bool, Query(description="Add the heat-map overlay and the mask as base64 PNGs")] = False,
                      ) -> dict[str, Any]:
        """Per image: score, verdict, thresholds, anomalous area fraction (and pictures on
        request). An unreadable image among several gets its own `error`; the rest are scored."""
        store.require(check_name(name))
        check_overrides(threshold, target_fpr)
        if worker.full():
            raise worker.busy_error()
        if not images:
            raise ServeError("no image in the request: send one or more files in the field 'images'")
        if len(images) > max_files:
            raise TooLarge(f"{len(images)} files in one request; the limit is {max_files}")
        uploads = [(display_name(up.filename, i), await up.read()) for i, up in enumerate(images)]
        decoded = await run_in_threadpool(_decode_all, uploads, max_pixels)
        good = [(n, img) for n, img in decoded if isinstance(img, np.ndarray)]
        if not good:
            raise decoded[0][1]
        future = worker.submit(name, [img for _, img in good], request.state.arrival)
        det, preds = await asyncio.wrap_future(future)
        image_threshold, pixel_threshold, source = thresholds(det, threshold, target_fpr)
        described = await run_in_threadpool(
            lambda: [describe(n, img, p, det, image_threshold, pixel_threshold, overlay)
                     for (n, img), p in zip(good, preds)])
        by_name = iter(described)
        results = [next(by_name) if isinstance(img, np.ndarray) else _failure(n, img) for n, img in decoded]
        return {"model": name, "strategy": det.strategy, "threshold": image_threshold,
                "pixel_threshold": pixel_threshold, "threshold_source": source, "results": results}

    @app.post("/models", status_code=202, summary="Fit a new model from good images (a background job)")
    async def create_model(name: Annotated[str, Form(description="Model name: letters, digits, '-', '_'")],
                           images: Annotated[list[UploadFile] | None, File(description="Good images")] = None,
                           strategy: Annotated[str, Form()] = "auto",
                           shots: Annotated[int | None, Form(description="Use k of the images (seeded sample)")] = None,
                           seed: Annotated[int, Form()] = 0) -> JSONResponse:
        if images and len(images) > max_files:
            raise TooLarge(f"{len(images)} files in one request; the limit is {max_files}")
        uploads = [(display_name(up.filename, i), await up.read()) for i, up in enumerate(images or [])]
        job = jobs.submit(name, uploads, strategy, shots, seed)
        return JSONResponse({"job": job.id, "status": job.status, "url": f"/jobs/{job.id}"},
                            status_code=202, headers={"Location": f"/jobs/{job.id}"})

    @app.get("/jobs/{job_id}", summary="A fit job's stage, progress and result")
    async def job_status(job_id: str) -> dict[str, Any]:
        return jobs.get(job_id).to_dict()

    return app


def _decode_all(uploads: list[tuple[str, bytes]], max_pixels: int) -> list[tuple[str, np.ndarray | ServeError]]:
    out: list[tuple[str, np.ndarray | ServeError]] = []
    for name, data in uploads:
        try:
            out.append((name, decode_upload(data, name, max_pixels)))
        except ImageLoadError as exc:
            out.append((name, ServeError(str(exc))))
        except ServeError as exc:
            out.append((name, exc))
    return out


def _failure(name: str, exc: ServeError) -> dict[str, Any]:
    return {"file": name, "error": str(exc), "status": exc.status}
