"""The lean ``POST /predict`` path: an ASGI middleware, the innermost of the app's own, that hands
``POST /predict`` straight to :meth:`GuardService.predict`, without the per-request work of the
router and of FastAPI's endpoint wrapper (route matching over every route, the request's
dependency solving, the exit stacks): for one-image requests under load that work cost about as
much as the JSON answer (docs/serving.md, "Where the time goes").

Everything the route promised stays: the route is still declared in the app (the OpenAPI page
documents it, and other methods on the path get its 405), the app's own middleware (request ids,
status counts, API keys) and Starlette's error middleware still wrap it, an :class:`InputError`
becomes the same JSON error the app's handler gives, and any other exception goes on to the app's
500 handler.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.requests import Request

from service.inputs import InputError

PREDICT_PATH = "/predict"


class LeanPredictMiddleware:
    def __init__(self, app, predict):
        """``predict``: the coroutine function that answers a POST /predict Request (GuardService.predict)."""
        self.app, self.predict = app, predict

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            response = await self.predict(Request(scope, receive, send))
        except InputError as error:  # the app's InputError handler, without the handler lookup
            response = JSONResponse(error.body(), error.status, headers=error.headers)
        await response(scope, receive, send)
