"""``badexpert serve BUNDLE``: the guard's HTTP server on uvicorn. SIGHUP hot-swaps the bundle
(re-reading the BUNDLE path, e.g. a symlink an operator re-pointed); SIGUSR1 promotes the candidate
bundle in shadow; SIGTERM/SIGINT stop it.

Every setting of :class:`service.settings.ServiceSettings` has a flag here (``max_batch_size`` is
``--max-batch-size``) and an environment variable (``BADEXPERT_MAX_BATCH_SIZE``); a flag given on
the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from defense.device import resolve_device
from defense.errors import UserError
from service.settings import ServiceSettings, env_name

POSITIONAL = "bundle"


def add_parser(commands) -> None:
    serve = commands.add_parser("serve", help="run the guard's HTTP server on a bundle",
                                description="Serve POST /predict with the guard in front of the model.")
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)


def _flag_type(annotation):
    """argparse type and choices of a settings field's annotation (Optional unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, list(typing.get_args(annotation))
    return annotation, None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(POSITIONAL, type=Path, nargs="?", metavar="BUNDLE",
                        help=f"bundle folder written by 'badexpert build' (env {env_name(POSITIONAL)})")
    parser.epilog = ("Each option can also be set with the environment variable shown; the command line wins. "
                     "Example: badexpert serve ./bundle --port 8000, then curl -F file=@image.png "
                     "http://127.0.0.1:8000/predict")
    for name, field in ServiceSettings.model_fields.items():
        if name == POSITIONAL:
            continue
        flag = "--" + name.replace("_", "-")
        default = field.default
        shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
        help_text = f"{field.description} (env {env_name(name)}; default {shown})".replace("%", "%%")
        kind, choices = _flag_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS,
                                metavar=None if choices else name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace) -> ServiceSettings:
    given = {name: getattr(args, name) for name in ServiceSettings.model_fields if getattr(args, name, None) is not None}
    try:
        return ServiceSettings(**given)
    except ValidationError as error:
        first = error.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        if name == POSITIONAL and first["type"] == "missing":
            raise UserError(f"BUNDLE: give the bundle folder as an argument or set {env_name(POSITIONAL)}")
        where = f"--{name.replace('_', '-')} / {env_name(name)}" if name else "settings"
        raise UserError(f"{where}: {first['msg']}")


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from defense.bundle import read_manifest
    from defense.bundle_trust import load_verify_key
    from service.app import create_app
    from service.protocol_choice import http_protocol_class

    settings = settings_from_args(args)
    if settings.verify_key is not None:
        load_verify_key(settings.verify_key, f"--verify-key / {env_name('verify_key')}")
    read_manifest(settings.bundle_dir)  # a missing, edited or invalid bundle fails here, before anything listens
    if settings.shadow_bundle is not None:
        read_manifest(settings.shadow_bundle)
    resolve_device(settings.device)
    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
    logger = logging.getLogger("badexpert")
    logger.addHandler(handler)
    logger.setLevel(settings.log_level.upper())
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.access_log, lifespan="on",
                            http=http_protocol_class(settings.header_timeout_s, settings.max_header_bytes, settings.http_parser),
                            loop=settings.event_loop, h11_max_incomplete_event_size=settings.max_header_bytes,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    server = uvicorn.Server(config)
    service = app.state.service

    def stop(reason: str) -> None:
        server.should_exit = True

    service.on_fatal = stop
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with these
    # handlers in place that is a no-op, and a SIGTERM/Ctrl-C stop exits with code 0.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda number, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        # SIGHUP: hot swap to whatever the bundle path points at now (e.g. a re-pointed symlink)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda number, frame: service.reload_soon("SIGHUP"))
        # SIGUSR1: the candidate bundle in shadow (--shadow-bundle, or set by the admin endpoint) becomes live
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda number, frame: service.promote_soon("SIGUSR1"))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if service.error is not None:
        print(f"badexpert: error: {service.error}", file=sys.stderr)
        return 2
    if not server.started:
        print(f"badexpert: error: the server could not start on {settings.host}:{settings.port} (see the log above)",
              file=sys.stderr)
        return 2
    return 0
