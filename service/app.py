"""The FastAPI app: ``create_app(settings)`` builds one independent app (its own registry, batcher,
audit trail); nothing lives at module level.

The routes are here; what they serve with is :class:`service.guard_service.GuardService`, the
middleware is :mod:`service.middleware`. The lifespan starts loading the bundle in the background
(verify every hash, rebuild the three models, warm up), so ``/healthz`` answers at once and
``/readyz`` says 503 until the guard is ready. On shutdown it stops accepting and finishes what
is queued.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from defense.bundle import package_versions
from service.admin import add_admin_routes, admin_paths
from service.guard_service import FAILED, READY, GuardService
from service.inputs import InputError, capped
from service.middleware import ApiKeyMiddleware, ObservabilityMiddleware, metrics_keys, protected_paths
from service.predict_route import LeanPredictMiddleware
from service.schemas import (ErrorResponse, HealthResponse, InfoResponse, PredictJSONRequest, PredictResponse,
                             ReadyResponse)
from service.settings import ServiceSettings
from service.v2_routes import add_v2_routes, v2_paths

log = logging.getLogger("badexpert.serve")


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
    app.add_middleware(LeanPredictMiddleware, predict=service.predict)  # first added: innermost, inside the keys
    if settings.api_key_list:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list,
                           protected=protected_paths(settings) | v2_paths(settings))
    if metrics_keys(settings):  # /metrics: the metrics keys, or the API keys when there are none
        app.add_middleware(ApiKeyMiddleware, keys=metrics_keys(settings), protected={"/metrics"})
    if admin_paths(settings):  # the admin endpoints take admin keys only
        app.add_middleware(ApiKeyMiddleware, keys=settings.admin_api_key_list, protected=admin_paths(settings))
    app.add_middleware(ObservabilityMiddleware, metrics=service.metrics,  # outermost: sees every response
                       max_header_bytes=settings.max_header_bytes,
                       timed_paths=frozenset({f"/v2/models/{settings.v2_model_name}/infer"}))

    @app.exception_handler(InputError)
    async def input_error(request: Request, error: InputError):
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse({"error": code, "detail": capped(str(error.detail))}, error.status_code,
                            headers=error.headers)

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
             responses={401: {"model": ErrorResponse}})  # 401: with api_keys or metrics_api_keys (protect_metrics)
    async def metrics():
        data, content_type = service.metrics.exposition()
        return Response(data, media_type=content_type)

    add_v2_routes(app, service, settings)
    add_admin_routes(app, service, settings)
    return app
