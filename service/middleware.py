"""The app's ASGI middleware: request ids, status counts and ``/predict`` durations
(``ObservabilityMiddleware``), and API keys on the protected paths (``ApiKeyMiddleware``)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class ObservabilityMiddleware:
    """Request id (made by the server, X-Request-ID out; the client's X-Request-ID is kept beside it
    and echoed as X-Client-Request-ID), responses by status, and the durations of /predict (and the
    other ``timed_paths``: the v2 infer path)."""

    def __init__(self, app, metrics: ServiceMetrics, max_header_bytes: int, timed_paths: frozenset[str] = frozenset()):
        self.app, self.metrics, self.max_header_bytes = app, metrics, max_header_bytes
        self.timed_paths = {"/predict"} | set(timed_paths)

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
            if scope["path"] in self.timed_paths:
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
    """The paths the API keys open (``/metrics`` has its own keys: :func:`metrics_keys`)."""
    if not settings.api_key_list:
        return set()
    paths = {"/predict", "/v1/info"}
    if settings.protect_docs:
        paths |= {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
    return paths


def metrics_keys(settings: ServiceSettings) -> list[str]:
    """The keys that open ``/metrics``: the metrics keys when set, else the API keys; none (open) when
    protect_metrics is off or no key is set."""
    if not settings.protect_metrics:
        return []
    return settings.metrics_api_key_list or settings.api_key_list
