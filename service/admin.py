"""The admin endpoints, on only when ``admin_bundle_root`` is set (and then always behind
``admin_api_keys``, see :func:`admin_paths`):

- ``POST /v1/admin/bundle`` {"path": ...}: hot swap to the bundle folder at ``path``, which must
  resolve to a folder under ``admin_bundle_root``. The candidate is verified exactly as at startup;
  on failure the running bundle keeps serving and the answer is a 422 with the reason.
- ``POST /v1/admin/shadow`` {"path": ...}: load a candidate (verified the same way) to run in shadow
  beside the live bundle; ``DELETE /v1/admin/shadow`` removes it.
- ``POST /v1/admin/promote``: the candidate in shadow becomes live (as SIGUSR1 does).
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.bundle_reload import ReloadBusy, ReloadFailed
from service.guard_service import READY, GuardService
from service.inputs import InputError
from service.schemas import BundleSwapRequest, BundleSwapResponse, ErrorResponse, ShadowResponse
from service.settings import ServiceSettings

SWAP_PATH, SHADOW_PATH, PROMOTE_PATH = "/v1/admin/bundle", "/v1/admin/shadow", "/v1/admin/promote"
_PATH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": BundleSwapRequest.model_json_schema()}}}}
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 422, 503)}


def admin_paths(settings: ServiceSettings) -> set[str]:
    """The paths that need an admin key (none when the admin endpoints are off)."""
    return {SWAP_PATH, SHADOW_PATH, PROMOTE_PATH} if settings.admin_bundle_root is not None else set()


def allowed_folder(root: Path, given: str) -> Path:
    """``given`` resolved (symlinks followed), refused unless it lies under ``root`` (resolved too) and
    so does every file in it: a folder of symlinks to a bundle elsewhere is refused too."""
    if any(ord(char) < 32 or ord(char) == 127 for char in given):
        raise InputError(400, "bad_path", "the path holds a control character (NUL, newline, ...)")
    base = Path(root).resolve()
    folder = (base / given).resolve()  # an absolute `given` replaces base
    if not folder.is_relative_to(base):
        raise InputError(403, "path_not_allowed", f"{given!r} is not under the server's admin_bundle_root")
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if not entry.resolve().is_relative_to(base):
                raise InputError(403, "path_not_allowed", f"{given!r}: {entry.name} resolves outside the server's "
                                 "admin_bundle_root (a symlink out of it)")
    return folder


def parse_json_body(body: bytes, model):
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InputError(422, "malformed_json", f"{where}: {first['msg']}")


def _busy(error: ReloadBusy) -> JSONResponse:
    return JSONResponse({"error": "reload_in_progress", "detail": str(error)}, 409)


def add_admin_routes(app: FastAPI, service: GuardService, settings: ServiceSettings) -> None:
    root = settings.admin_bundle_root
    if root is None:
        return

    async def requested_folder(request: Request):
        """The allowed bundle folder a swap or shadow request names (400/403 raised for a bad one)."""
        return allowed_folder(root, parse_json_body(await request.body(), BundleSwapRequest).path)

    @app.post(SWAP_PATH, response_model=BundleSwapResponse, responses=_ERRORS,
              openapi_extra=_PATH_BODY,
              summary="Hot swap: serve another bundle without dropping a request",
              description="Loads and verifies the bundle beside the running one (signature, hashes, factory "
                          "allowlist, manifest), warms it up, then switches: requests in flight finish on the "
                          "old bundle. A candidate that fails leaves the old one serving (422).")
    async def swap_bundle(request: Request):
        folder = await requested_folder(request)
        if service.state != READY:
            return service.unavailable()
        try:
            result = await service.reloader.reload(folder, "admin")
        except ReloadBusy as error:
            return _busy(error)
        except ReloadFailed as error:
            return JSONResponse({"error": "bundle_rejected", "detail": f"{error}; the running bundle "
                                 f"{service.live.bundle_id} keeps serving"}, 422)
        return JSONResponse(BundleSwapResponse(**vars(result)).model_dump())

    @app.post(SHADOW_PATH, response_model=ShadowResponse, responses=_ERRORS, openapi_extra=_PATH_BODY,
              summary="Run a candidate bundle in shadow beside the live one",
              description="Loads and verifies the candidate as at startup; it then scores the same batches as the "
                          "live bundle, which alone decides. Its would-be decisions go to metrics and the audit log.")
    async def set_shadow(request: Request):
        folder = await requested_folder(request)
        if service.state != READY:
            return service.unavailable()
        started = time.monotonic()
        try:
            candidate = await service.reloader.load(folder, "admin shadow")
            service.set_candidate(candidate)
        except ReloadBusy as error:
            return _busy(error)
        except (ReloadFailed, ValueError) as error:
            return JSONResponse({"error": "bundle_rejected", "detail": f"{error}; no candidate in shadow now"}, 422)
        return ShadowResponse(live_bundle_id=service.live.bundle_id, candidate_bundle_id=candidate.bundle_id,
                              seconds=time.monotonic() - started)

    @app.delete(SHADOW_PATH, response_model=ShadowResponse, responses=_ERRORS, summary="Stop the candidate in shadow")
    async def drop_shadow():
        if service.state != READY:
            return service.unavailable()
        service.set_candidate(None)
        return ShadowResponse(live_bundle_id=service.live.bundle_id, candidate_bundle_id=None)

    @app.post(PROMOTE_PATH, response_model=BundleSwapResponse, responses=_ERRORS,
              summary="Make the candidate in shadow the live bundle")
    async def promote():
        if service.state != READY:
            return service.unavailable()
        try:
            new, previous = service.promote("admin")
        except LookupError as error:
            return JSONResponse({"error": "no_candidate", "detail": str(error)}, 409)
        return BundleSwapResponse(bundle_id=new, previous_bundle_id=previous, path=str(service.live.path), seconds=0.0)
