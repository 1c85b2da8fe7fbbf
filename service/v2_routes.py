"""The Open Inference Protocol v2 (KServe v2 REST) routes, beside ``/predict``:

    GET  /v2                          server metadata
    GET  /v2/health/live              liveness (as /healthz)
    GET  /v2/health/ready             readiness (as /readyz)
    GET  /v2/models/{name}            model metadata: inputs, outputs, versions (the live bundle id)
    GET  /v2/models/{name}/ready      the model's readiness
    POST /v2/models/{name}/infer      inference (:mod:`service.inference_v2` for the tensors)

``{name}`` is the ``v2_model_name`` setting. Inference goes through
:meth:`service.guard_service.GuardService.handle`, the ``/predict`` path: the same admission,
limits, decoding, batching, audit trail and metrics.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from defense.bundle import package_versions
from service.decisions import Decisions, signal_parts, withheld
from service.guard_service import FAILED, GuardService
from service.inference_v2 import (HEADER_LENGTH, header_length, max_json_values, model_metadata, parse_request,
                                  read_images, response_body)
from service.inputs import JSON, InputError, capped
from service.schemas import ErrorResponse
from service.served_bundle import ServedBundle
from service.settings import ServiceSettings

V2_MEDIA_TYPES = ("", JSON, "application/octet-stream")
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 422, 431, 503)}
_INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "description":
                                    "a v2 inference request: one input, 'images' (BYTES, base64 strings) or "
                                    "'pixels' (UINT8 [N, H, W, 3])"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
                                            "the binary tensor data extension: the JSON header (its length in "
                                            "Inference-Header-Content-Length), then the raw tensors"}}}}}


def v2_paths(settings: ServiceSettings) -> set[str]:
    """The v2 paths that need an API key (as /predict and /v1/info); health stays open."""
    return {f"/v2/models/{settings.v2_model_name}", f"/v2/models/{settings.v2_model_name}/infer"}


def check_v2_media_type(kind: str) -> None:
    if kind not in V2_MEDIA_TYPES:
        raise InputError(415, "unsupported_media_type", f"Content-Type {kind} is not supported: send a v2 inference "
                         "request as application/json, or with the binary tensor data extension")


def _unknown_model(name: str) -> JSONResponse:
    return JSONResponse({"error": "not_found", "detail": capped(f"no model {name!r} here")}, 404)


def add_v2_routes(app: FastAPI, service: GuardService, settings: ServiceSettings) -> None:
    model_name = settings.v2_model_name

    @app.get("/v2", summary="v2 protocol: server metadata")
    async def server_metadata():
        return {"name": "badexpert", "version": package_versions()["badexpert"], "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live", summary="v2 protocol: liveness", responses={503: {"model": ErrorResponse}})
    async def live():
        if service.state == FAILED:
            return JSONResponse({"live": False}, 503)
        return {"live": True}

    @app.get("/v2/health/ready", summary="v2 protocol: readiness", responses={503: {"model": ErrorResponse}})
    async def ready():
        if service.readiness_problem() is not None:
            return JSONResponse({"ready": False}, 503)
        return {"ready": True}

    @app.get("/v2/models/{name}", summary="v2 protocol: model metadata", responses=_ERRORS)
    async def metadata(name: str):
        if name != model_name:
            return _unknown_model(name)
        bundle = service.live
        if bundle is None:
            return service.unavailable()
        return model_metadata(model_name, bundle.bundle_id, bundle.guard.preprocessing.input_size, service.show_scores)

    @app.get("/v2/models/{name}/ready", summary="v2 protocol: model readiness", responses=_ERRORS)
    async def model_ready(name: str):
        if name != model_name:
            return _unknown_model(name)
        ready = service.readiness_problem() is None
        return JSONResponse({"name": model_name, "ready": ready}, 200 if ready else 503)

    @app.post("/v2/models/{name}/infer", summary="v2 protocol: inference behind the guard", responses=_ERRORS,
              openapi_extra=_INFER_BODY)
    async def infer(name: str, request: Request):
        if name != model_name:
            return _unknown_model(name)
        return await infer_v2(service, request, model_name)


async def infer_v2(service: GuardService, request: Request, model_name: str) -> Response:
    parsed = {}
    given_length = request.headers.get(HEADER_LENGTH)

    def parse(kind: str, content_type: str, body: bytes, bundle: ServedBundle):
        v2_request, binary = parse_request(body, header_length(given_length, len(body)),
                                           max_json_values(service.limits, bundle.guard.preprocessing.input_size))
        parsed["request"] = v2_request
        return read_images(v2_request, binary, service.limits, bundle.guard.preprocessing)

    def answer(decisions: Decisions) -> Response:
        hidden = withheld(decisions, service.settings)
        outputs = {"label": [-1 if hide else label for label, hide in zip(decisions.labels, hidden)],
                   "confidence": [-1.0 if hide else confidence for confidence, hide in zip(decisions.confidences, hidden)],
                   "rejected": decisions.rejected, "flagged": decisions.flagged}
        parameters = {"mode": service.settings.mode}
        if service.show_scores:
            outputs["score"] = [value if value == value and abs(value) != float("inf") else None
                                for value in decisions.scores]
            parts = [signal_parts(decisions, index) for index in range(len(decisions.scores))]
            outputs["expert_score"] = [part["expert"] for part in parts]
            outputs["feature_score"] = [part["features"] for part in parts]
            parameters["threshold"] = decisions.bundle.tau
        body = response_body(model_name, parsed["request"], decisions.bundle.bundle_id, outputs, parameters)
        return Response(body, media_type=JSON)

    return await service.handle(request, check_v2_media_type, parse, answer)
