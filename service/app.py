"""The FastAPI app: ``create_app(settings)`` builds one independent app (its own registry, batcher,
audit trail); nothing lives at module level.

The lifespan starts loading the bundle in the background (verify every hash, rebuild the three
models, warm up), so ``/healthz`` answers at once and ``/readyz`` says 503 until the guard is
ready. On shutdown it stops accepting and finishes what is queued.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
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
from service.audit import AuditTrail, finite_or_none
from service.batcher import MicroBatcher, Overloaded, ShuttingDown
from service.inputs import (MULTIPART, ByteBudget, InputError, Limits, Reservation, body_budget_exhausted,
                            check_content_length, check_media_type, decode_images, media_type, parse_json,
                            parse_multipart, read_body)
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
        self.audit = AuditTrail(settings.audit_log, settings.quarantine_dir, chain=settings.audit_chain,
                                min_free_bytes=settings.audit_min_free_bytes,
                                max_image_bytes=settings.quarantine_max_image_bytes,
                                max_total_bytes=settings.quarantine_max_bytes,
                                on_not_kept=self.metrics.count_quarantine_skipped)
        self.limits = Limits(settings.max_images_per_request, settings.max_image_bytes, settings.max_request_bytes,
                             settings.max_pixels, settings.max_parts, settings.max_part_header_bytes,
                             tuple(settings.image_format_list))
        self.body_budget = ByteBudget(settings.max_bytes_in_flight)
        self.decode_backlog = 0  # requests waiting for or in the decode threads (event loop only)
        self.show_scores = settings.response_policy == "full"
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
        guard, manifest = load_bundle(settings.bundle_dir, self.device, verify_key=settings.verify_key,
                                      allowed_factory_modules=settings.factory_module_list)
        self.guard, self.manifest = guard, manifest
        self.tau = float(guard.rejection_threshold)
        if not math.isfinite(self.tau):  # load_bundle refuses it; never serve one in any case
            raise RuntimeError(f"bundle {settings.bundle_dir}: the threshold {self.tau} is not a finite number")
        self.class_names = list(manifest.class_names)
        if len(self.class_names) != manifest.num_classes:
            raise RuntimeError(f"bundle {settings.bundle_dir}: {len(self.class_names)} class names for "
                               f"{manifest.num_classes} classes")
        if torch.device(self.device).type == "cuda" and settings.cuda_streams:
            self._streams = [torch.cuda.Stream(device=guard.device) for _ in range(3)]
        self.metrics.bind_bundle(manifest.bundle_id, self.tau, manifest.target_fpr, settings.mode, self.class_names)
        self.audit.open()
        info = InfoResponse(
            bundle_id=manifest.bundle_id, created_at=manifest.created_at, architecture=manifest.architecture,
            class_names=self.class_names, num_classes=manifest.num_classes,
            input_size=list(guard.preprocessing.input_size), mean=list(guard.preprocessing.mean),
            std=list(guard.preprocessing.std), alpha=guard.alpha, threshold=self.tau, target_fpr=manifest.target_fpr,
            calibration={**{k: manifest.threshold.get(k) for k in ("rule", "delta", "n", "k", "expected_fpr")},
                         "calibration_fpr": manifest.threshold.get("calibration_fpr")},
            mode=settings.mode, device=self.device,
            limits={"max_images_per_request": settings.max_images_per_request,
                    "max_image_bytes": settings.max_image_bytes, "max_request_bytes": settings.max_request_bytes,
                    "max_pixels": settings.max_pixels, "max_parts": settings.max_parts,
                    "max_header_bytes": settings.max_header_bytes, "body_timeout_s": settings.body_timeout_s,
                    "image_formats": self.limits.formats},
            batching={"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                      "max_queue": settings.max_queue},
            versions={"bundle": manifest.versions, "server": package_versions()},
            response_policy=settings.response_policy,
        ).model_dump()
        if not self.show_scores:  # decision_only: nothing that locates the threshold
            for name in ("alpha", "threshold", "calibration"):
                info.pop(name)
        self.info = info
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
        one = decode_images(self.guard.preprocessing, [buffer.getvalue()], self.settings.max_pixels, self.limits.formats)
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
        return blobs, decode_images(self.guard.preprocessing, blobs, self.limits.max_pixels, self.limits.formats)

    def readiness_problem(self) -> tuple[str, str | None] | None:
        """(status, reason) when requests cannot be answered now, or None when they can."""
        if self.state != READY:
            detail = {LOADING: "the guard is loading its bundle", FAILED: f"the bundle failed to load: {self.error}",
                      SHUTTING_DOWN: "the server is shutting down"}.get(self.state)
            return self.state, detail
        if self.batcher is None or not self.batcher.running:
            return "batcher_stopped", "the batching worker is not running"
        audit_problem = self.audit.problem()
        if audit_problem is not None:
            return "audit_unavailable", audit_problem
        return None

    def unavailable(self, problem: tuple[str, str | None] | None = None) -> JSONResponse:
        problem = problem or self.readiness_problem() or (self.state, None)
        return JSONResponse({"error": "not_ready", "detail": problem[1] or "not ready"}, 503,
                            headers=self._retry_after)

    def overloaded(self, detail: str = "the guard's queue is full; retry shortly") -> JSONResponse:
        self.metrics.overload.inc()
        return JSONResponse({"error": "overloaded", "detail": detail}, 503, headers=self._retry_after)

    def _no_room(self) -> str | None:
        if not self.batcher.has_room(1):
            return "the guard's queue is full; retry shortly"
        if self.decode_backlog >= self.settings.max_decode_backlog:
            return "the guard's decode backlog is full; retry shortly"
        return None

    async def predict(self, request: Request) -> Response:
        problem = self.readiness_problem()
        if problem is not None:
            return self.unavailable(problem)
        kind = media_type(request)
        check_media_type(kind)
        length = check_content_length(request, self.limits)
        full = self._no_room()  # admission before the body is read
        if full is not None:
            return self.overloaded(full)
        # Bytes are taken from the budget as they arrive (a stalled upload holds only what it sent), but a
        # body that could not fit now is refused before reading it.
        if length is not None and self.body_budget.held + length > self.body_budget.limit:
            return self.overloaded(body_budget_exhausted(self._retry_after).detail)
        reservation = Reservation()
        try:
            return await self._admitted(request, kind, reservation)
        except InputError as error:
            if error.code == "overloaded":
                self.metrics.overload.inc()
            raise
        finally:
            self.body_budget.give_back(reservation.bytes)

    async def _admitted(self, request: Request, kind: str, reservation: Reservation) -> Response:
        try:
            body = await asyncio.wait_for(
                read_body(request, self.limits, self.body_budget, reservation, self._retry_after),
                self.settings.body_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise InputError(408, "body_timeout", f"the request body did not arrive within "
                             f"{self.settings.body_timeout_s:g} s")
        full = self._no_room()
        if full is not None:
            return self.overloaded(full)
        loop = asyncio.get_running_loop()
        self.decode_backlog += 1
        try:
            blobs, images = await loop.run_in_executor(self._decode_pool, self.prepare, kind,
                                                       request.headers.get("content-type", ""), body)
        finally:
            self.decode_backlog -= 1
        del body
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
            prediction = {
                "index": index, "label": None if withheld else label, "class_name": None if withheld else names[label],
                "confidence": None if withheld else confidence, "score": finite_or_none(value),
                "rejected": rejected, "flagged": flag,
            }
            if not self.show_scores:
                del prediction["score"]
            predictions.append(prediction)
        if any(flagged) and self.audit.enabled:
            failure = await self._audit(request, scores, flagged, blobs, images)
            if failure is not None:
                return failure
        self.metrics.record_inputs(labels, values, flagged)
        answer = {"bundle": self.manifest.bundle_id, "threshold": tau, "mode": self.settings.mode,
                  "predictions": predictions}
        if not self.show_scores:
            del answer["threshold"]
        return JSONResponse(answer)

    async def _audit(self, request: Request, scores: GuardScores, flagged: list[bool], blobs: list[bytes],
                     images: torch.Tensor) -> JSONResponse | None:
        """Write the flagged inputs' records (off the event loop). None when they are on disk; a 503
        (and not ready until the disk has room again) when the disk refused them."""
        labels, values = scores.label.tolist(), scores.score.tolist()
        experts, auxiliaries = scores.expert_agreement.tolist(), scores.auxiliary_agreement.tolist()
        chosen = [i for i, flag in enumerate(flagged) if flag]
        records = [{"request_id": request.state.request_id, "client_request_id": request.state.client_request_id,
                    "index": i, "predicted_class": labels[i], "class_name": self.class_names[labels[i]],
                    "score": finite_or_none(values[i]), "b": finite_or_none(experts[i]),
                    "a": finite_or_none(auxiliaries[i]), "alpha": self.guard.alpha, "tau": self.tau,
                    "mode": self.settings.mode, "bundle": self.manifest.bundle_id}
                   for i in chosen]
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._audit_pool, self.audit.record, records, [blobs[i] for i in chosen], [images[i] for i in chosen])
        except OSError as error:
            reason = f"cannot write the audit trail ({error.strerror or error})"
            self.audit.fail(reason)
            log.error("%s; reporting not ready", reason)
            return JSONResponse({"error": "audit_unavailable", "detail": f"{reason}: the flagged input could not "
                                 "be recorded, so it is not answered"}, 503, headers=self._retry_after)
        return None


class ObservabilityMiddleware:
    """Request id (made by the server, X-Request-ID out; the client's X-Request-ID is kept beside it
    and echoed as X-Client-Request-ID), responses by status, and /predict durations."""

    def __init__(self, app, metrics: ServiceMetrics, max_header_bytes: int):
        self.app, self.metrics, self.max_header_bytes = app, metrics, max_header_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        header_bytes = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + \
            sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:  # uvicorn caps headers that arrive in pieces; this, the rest
            self.metrics.count_status(431)
            response = JSONResponse({"error": "headers_too_large", "detail": f"the request line and headers are "
                                     f"over {self.max_header_bytes} bytes"}, 431, headers={"Connection": "close"})
            return await response(scope, receive, send)
        given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), "")
        client_request_id = given if _REQUEST_ID.fullmatch(given) else None
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["client_request_id"] = request_id, client_request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("X-Request-ID", request_id)
                if client_request_id is not None:
                    headers.append("X-Client-Request-ID", client_request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.count_status(status)
            if scope["path"] == "/predict":
                self.metrics.request_duration.observe(time.perf_counter() - started)


class ApiKeyMiddleware:
    """With API keys set, the protected paths need 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.
    Keys are compared as sha256 digests with hmac.compare_digest, against every key (constant time
    in the key presented). Health probes stay open."""

    def __init__(self, app, keys: list[str], protected: set[str]):
        self.app, self.protected = app, protected
        self.key_digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        presented = None
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
            elif name == b"x-api-key":
                presented = value.strip()
        if not presented:
            return False
        digest = hashlib.sha256(presented).digest()
        matched = False
        for key_digest in self.key_digests:
            matched |= hmac.compare_digest(digest, key_digest)
        return matched

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.protected and not self.authorized(scope["headers"]):
            response = JSONResponse({"error": "unauthorized", "detail": "this endpoint needs an API key: "
                                     "'Authorization: Bearer KEY' or 'X-API-Key: KEY'"}, 401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def protected_paths(settings: ServiceSettings) -> set[str]:
    if not settings.api_key_list:
        return set()
    paths = {"/predict", "/v1/info"}
    if settings.protect_metrics:
        paths.add("/metrics")
    if settings.protect_docs:
        paths |= {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    return paths


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 422, 431, 503)}
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
    if settings.api_key_list:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list, protected=protected_paths(settings))
    app.add_middleware(ObservabilityMiddleware, metrics=service.metrics,  # outermost: sees every response
                       max_header_bytes=settings.max_header_bytes)

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return JSONResponse(error.body(), error.status, headers=error.headers)

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

    @app.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, summary="Liveness")
    @app.head("/healthz", include_in_schema=False)
    async def healthz():
        if service.state == FAILED:
            return JSONResponse({"status": "failed"}, 503)
        return {"status": "ok"}

    @app.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
             summary="Readiness: bundle verified, models loaded and warm, audit trail writable")
    @app.head("/readyz", include_in_schema=False)
    async def readyz():
        problem = service.readiness_problem()
        if problem is None:
            return JSONResponse({"ready": True, "status": READY, "detail": None})
        return JSONResponse({"ready": False, "status": problem[0], "detail": problem[1]}, 503)

    @app.get("/v1/info", response_model=InfoResponse,
             responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
             summary="The bundle being served: classes, input size, threshold, versions")
    async def info():
        if service.info is None:
            return service.unavailable()
        return JSONResponse(service.info)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={401: {"model": ErrorResponse}})  # 401: with api_keys and protect_metrics
    async def metrics():
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    return app
