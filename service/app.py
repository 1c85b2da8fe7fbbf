"""The FastAPI app: ``create_app(settings)`` builds one independent app (its own registry, batcher,
audit trail); nothing lives at module level.

The lifespan starts loading the bundle in the background (verify every hash, rebuild the three
models, warm up), so ``/healthz`` answers at once and ``/readyz`` says 503 until the guard is
ready. On shutdown it stops accepting and finishes what is queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import math
import re
import time
import uuid
from contextlib import asynccontextmanager
from typing import Callable

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from defense.bundle import load_bundle, package_versions
from defense.score import GuardScores, guard_scores, rejects
from service.audit import AuditTrail
from service.batcher import MicroBatcher, Overloaded, ShuttingDown
from service.inputs import (MULTIPART, InputError, Limits, check_content_length, check_media_type, decode_images,
                            media_type, parse_json, parse_multipart, read_body)
from service.metrics import ServiceMetrics
from service.schemas import (ErrorResponse, HealthResponse, InfoResponse, PredictJSONRequest, PredictResponse,
                             ReadyResponse)
from service.settings import ServiceSettings

log = logging.getLogger("badexpert.serve")

LOADING, READY, FAILED, SHUTTING_DOWN = "loading", "ready", "failed", "shutting_down"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: no CUDA device is available here; use cpu or auto")
    return name


class GuardService:
    """Everything one app serves with: the guard, the batcher, metrics, the audit trail."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.audit = AuditTrail(settings.audit_log, settings.quarantine_dir)
        self.limits = Limits(settings.max_images_per_request, settings.max_image_bytes, settings.max_request_bytes,
                             settings.max_pixels)
        self.enforce = settings.mode == "enforce"
        self.state = LOADING
        self.error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None  # set by `badexpert serve`: stop the server
        self.guard = self.manifest = self.batcher = None
        self.info: dict | None = None
        self.class_names: list[str] = []
        self.tau = math.nan
        self.device = "cpu"
        self._streams = None
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}
        self._decode_pool = concurrent.futures.ThreadPoolExecutor(settings.decode_threads, "badexpert-decode")
        self._audit_pool = concurrent.futures.ThreadPoolExecutor(1, "badexpert-audit")

    # ----- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: verify and load the bundle, prepare everything per-request work needs, warm up."""
        settings = self.settings
        started = time.monotonic()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        guard, manifest = load_bundle(settings.bundle_dir, self.device)
        self.guard, self.manifest = guard, manifest
        self.tau = float(guard.rejection_threshold)
        self.class_names = list(manifest.class_names)
        if len(self.class_names) != manifest.num_classes:
            raise RuntimeError(f"bundle {settings.bundle_dir}: {len(self.class_names)} class names for "
                               f"{manifest.num_classes} classes")
        if torch.device(self.device).type == "cuda" and settings.cuda_streams:
            self._streams = [torch.cuda.Stream(device=guard.device) for _ in range(3)]
        self.metrics.bind_bundle(manifest.bundle_id, self.tau, manifest.target_fpr, settings.mode, self.class_names)
        self.audit.open()
        self.info = InfoResponse(
            bundle_id=manifest.bundle_id, created_at=manifest.created_at, architecture=manifest.architecture,
            class_names=self.class_names, num_classes=manifest.num_classes,
            input_size=list(guard.preprocessing.input_size), mean=list(guard.preprocessing.mean),
            std=list(guard.preprocessing.std), alpha=guard.alpha, threshold=self.tau, target_fpr=manifest.target_fpr,
            calibration={**{k: manifest.threshold.get(k) for k in ("rule", "delta", "n", "k", "expected_fpr")},
                         "calibration_fpr": manifest.threshold.get("calibration_fpr")},
            mode=settings.mode, device=self.device,
            limits={"max_images_per_request": settings.max_images_per_request,
                    "max_image_bytes": settings.max_image_bytes, "max_request_bytes": settings.max_request_bytes,
                    "max_pixels": settings.max_pixels},
            batching={"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                      "max_queue": settings.max_queue},
            versions={"bundle": manifest.versions, "server": package_versions()},
        ).model_dump()
        if settings.warmup:
            self._warm_up()
        log.info("bundle %s loaded on %s in %.1f s (tau %.6g, mode %s)", manifest.bundle_id, self.device,
                 time.monotonic() - started, self.tau, settings.mode)

    def _warm_up(self) -> None:
        """One image through the whole path (decode, preprocess, forward, score), then a full batch."""
        from PIL import Image

        height, width = self.guard.preprocessing.input_size
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (127, 127, 127)).save(buffer, format="PNG")
        one = decode_images(self.guard.preprocessing, [buffer.getvalue()], self.settings.max_pixels)
        self.infer(one)
        self.infer(one.expand(self.settings.max_batch_size, -1, -1, -1).contiguous())

    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load)
            self.batcher = MicroBatcher(self.infer, self.settings.max_batch_size, self.settings.max_wait_ms,
                                        self.settings.max_queue, on_batch=self.metrics.batch_size.observe,
                                        on_queue_depth=self.metrics.queue_depth.set)
            self.batcher.start()
            self.state = READY
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.state, self.error = FAILED, str(error).splitlines()[0] if str(error) else type(error).__name__
            log.error("cannot serve bundle %s: %s", self.settings.bundle_dir, self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    async def stop(self, loading: asyncio.Task | None) -> None:
        """Stop accepting, finish what is queued, release threads and files."""
        self.state = SHUTTING_DOWN
        if loading is not None and not loading.done():
            loading.cancel()
            try:
                await loading
            except (asyncio.CancelledError, Exception):
                pass
        if self.batcher is not None:
            await self.batcher.close()
        self._decode_pool.shutdown(wait=True)
        self._audit_pool.shutdown(wait=True)
        self.audit.close()

    # ----- inference (runs in the batcher's inference thread) -----------------------------------

    def infer(self, images: torch.Tensor) -> GuardScores:
        if self._streams is None:
            return self.guard.score_batch(images)
        return self._infer_on_streams(images)

    @torch.inference_mode()
    def _infer_on_streams(self, images: torch.Tensor) -> GuardScores:
        """CUDA: the three models on three streams, so that their kernels may overlap."""
        guard = self.guard
        current = torch.cuda.current_stream(guard.device)
        inputs = guard.normalizer(images.to(guard.device, non_blocking=True))
        outputs = []
        for module, stream in zip((guard.model, guard.backdoor_expert, guard.auxiliary_model), self._streams):
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                outputs.append(module(inputs))
            inputs.record_stream(stream)
        for stream, output in zip(self._streams, outputs):
            current.wait_stream(stream)
            output.record_stream(current)
        return guard_scores(*outputs, alpha=guard.alpha).cpu()

    # ----- one request ---------------------------------------------------------------------------

    def prepare(self, kind: str, content_type: str, body: bytes) -> tuple[list[bytes], torch.Tensor]:
        """Blocking (decode thread): the request's image bytes and their (N, 3, H, W) uint8 tensor."""
        if kind == MULTIPART:
            blobs = parse_multipart(content_type, body, self.limits)
        else:
            blobs = parse_json(body, self.limits)
        return blobs, decode_images(self.guard.preprocessing, blobs, self.limits.max_pixels)

    def unavailable(self) -> JSONResponse:
        detail = {LOADING: "the guard is loading its bundle", FAILED: f"the bundle failed to load: {self.error}",
                  SHUTTING_DOWN: "the server is shutting down"}.get(self.state, "not ready")
        return JSONResponse({"error": "not_ready", "detail": detail}, 503, headers=self._retry_after)

    def overloaded(self) -> JSONResponse:
        self.metrics.overload.inc()
        return JSONResponse({"error": "overloaded", "detail": "the guard's queue is full; retry shortly"}, 503,
                            headers=self._retry_after)

    async def predict(self, request: Request) -> Response:
        if self.state != READY:
            return self.unavailable()
        kind = media_type(request)
        check_media_type(kind)
        check_content_length(request, self.limits)
        if not self.batcher.has_room(1):
            return self.overloaded()
        body = await read_body(request, self.limits)
        loop = asyncio.get_running_loop()
        blobs, images = await loop.run_in_executor(self._decode_pool, self.prepare, kind,
                                                   request.headers.get("content-type", ""), body)
        try:
            scores = await self.batcher.submit(images)
        except Overloaded:
            return self.overloaded()
        except ShuttingDown:
            return self.unavailable()
        labels, confidences, values = scores.label.tolist(), scores.confidence.tolist(), scores.score.tolist()
        tau, names = self.tau, self.class_names
        flagged = rejects(scores.score, tau).tolist()  # the guard's one rule: a NaN score is flagged
        hide = self.enforce and not self.settings.reveal_rejected
        predictions = []
        for index, (label, confidence, value, flag) in enumerate(zip(labels, confidences, values, flagged)):
            rejected = flag and self.enforce
            withheld = rejected and hide
            predictions.append({
                "index": index, "label": None if withheld else label, "class_name": None if withheld else names[label],
                "confidence": None if withheld else confidence, "score": value if math.isfinite(value) else None,
                "rejected": rejected, "flagged": flag,
            })
        if any(flagged) and self.audit.enabled:
            request_id = request.state.request_id
            records = [{"request_id": request_id, "index": i, "predicted_class": labels[i], "class_name": names[labels[i]],
                        "score": values[i] if math.isfinite(values[i]) else None, "tau": tau,
                        "mode": self.settings.mode, "bundle": self.manifest.bundle_id}
                       for i in range(len(values)) if flagged[i]]
            await loop.run_in_executor(self._audit_pool, self.audit.record, records,
                                       [blobs[i] for i in range(len(values)) if flagged[i]])
        self.metrics.record_inputs(labels, values, flagged)
        return JSONResponse({"bundle": self.manifest.bundle_id, "threshold": tau, "mode": self.settings.mode,
                             "predictions": predictions})


class ObservabilityMiddleware:
    """Request id (X-Request-ID in and out), responses by status, and /predict durations."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.count_status(status)
            if scope["path"] == "/predict":
                self.metrics.request_duration.observe(time.perf_counter() - started)


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)}
_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                        "description": "one or more image files (PNG, JPEG, WebP, BMP, ...)"}}}},
            "application/json": {"schema": PredictJSONRequest.model_json_schema()},
        },
    }
}


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """A new, independent app. Without settings, they come from BADEXPERT_* environment variables
    (so ``uvicorn --factory service.app:create_app`` works too)."""
    settings = settings or ServiceSettings()
    service = GuardService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(service.start(), name="badexpert-load")
        try:
            yield
        finally:
            await service.stop(loading)

    app = FastAPI(title="BaDExpert guard", version=package_versions()["badexpert"], lifespan=lifespan,
                  description="An inference-time backdoor guard: POST images to /predict; inputs whose BaDExpert "
                              "score falls below the bundle's threshold are flagged and, in enforce mode, rejected.")
    app.state.service = service
    app.state.settings = settings
    app.add_middleware(ObservabilityMiddleware, metrics=service.metrics)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return JSONResponse(error.body(), error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(error.detail)}, error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": "internal_error", "detail": f"{type(error).__name__}: the server failed "
                             "on this request; see its log"}, 500)

    @app.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_PREDICT_BODY,
              summary="Classify images behind the guard",
              description="Send images as multipart parts named 'file' or as JSON {\"images\": [base64, ...]}. "
                          "Each image gets the model's label and confidence, its BaDExpert score, and whether "
                          "it was rejected (score < threshold, in enforce mode): a rejected image gets null "
                          "label, class_name and confidence. A flagged input is a 200, never an HTTP error.")
    async def predict(request: Request):
        return await service.predict(request)

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness")
    async def healthz():
        if service.state == FAILED:
            return JSONResponse({"status": "failed"}, 503)
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
             summary="Readiness: bundle verified, models loaded and warm")
    async def readyz():
        ready = service.state == READY and service.batcher is not None and service.batcher.running
        status = service.state if service.state != READY or ready else "batcher_stopped"
        body = {"ready": ready, "status": status, "detail": service.error}
        return JSONResponse(body, 200 if ready else 503)

    @app.get("/v1/info", response_model=InfoResponse, responses={503: {"model": ErrorResponse}},
             summary="The bundle being served: classes, input size, threshold, versions")
    async def info():
        if service.info is None:
            return service.unavailable()
        return JSONResponse(service.info)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    return app
