"""The guard's HTTP server: FastAPI ``POST /predict`` in front of a bundle built by ``defense``.
The ``badexpert serve`` command that starts it is :mod:`badexpert.serve`.

- :mod:`service.settings` every setting (``BADEXPERT_*`` environment variables and ``serve`` flags)
- :mod:`service.app`      ``create_app(settings)``: the app factory, its routes and lifespan
- :mod:`service.guard_service` what one app serves with: loading the bundle, handling one request
- :mod:`service.served_bundle` one bundle as served: the one loading path (startup and hot swap)
- :mod:`service.bundle_reload` hot swap: load beside the running bundle, then switch
- :mod:`service.admin`    the admin endpoints (``/v1/admin/*``), off unless configured
- :mod:`service.inference_v2`, :mod:`service.v2_routes` the Open Inference Protocol v2 (KServe) routes
- :mod:`service.shadow`   a candidate bundle in shadow beside the live one
- :mod:`service.decisions` one request's decisions and the ``/predict`` answer
- :mod:`service.middleware` request ids, status counts, API keys
- :mod:`service.predict_route` the lean ``POST /predict`` path (no router or endpoint wrapper per request)
- :mod:`service.http_protocol` uvicorn's h11 protocol with JSON 400s, a header timeout, coalesced writes
- :mod:`service.httptools_protocol` the same on uvicorn's httptools protocol (the default when installed)
- :mod:`service.protocol_choice` which of the two the server runs (``--http-parser``)
- :mod:`service.inputs`   reading one request's images (multipart or JSON base64), with limits
- :mod:`service.batcher`  the micro-batcher that coalesces concurrent requests for the device
- :mod:`service.metrics`  Prometheus metrics on a per-app registry
- :mod:`service.audit`    the audit log and quarantine of flagged inputs
- :mod:`service.schemas`  request and response models (the OpenAPI page shows them)
"""
