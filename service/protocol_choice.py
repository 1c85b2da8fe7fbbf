"""Which of uvicorn's HTTP/1.1 protocols the server runs: its own module, because the choice imports
both protocols (:mod:`service.http_protocol`, :mod:`service.httptools_protocol`), and the second
imports the first."""

from __future__ import annotations

from service.http_protocol import HeaderTimeoutH11Protocol


def http_protocol_class(header_timeout_s: float, max_header_bytes: int, parser: str = "auto") -> type:
    """The protocol class for uvicorn's ``http`` setting: ``parser`` "httptools", "h11", or "auto"
    (httptools when it can be imported). With h11, uvicorn's ``h11_max_incomplete_event_size`` must be
    ``max_header_bytes`` (h11 enforces it); the httptools protocol counts the bytes itself."""
    if parser != "h11":
        try:
            from service.httptools_protocol import GuardedHttpToolsProtocol
        except ImportError:
            if parser == "httptools":
                raise
        else:
            return type("BadExpertHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
    return type("BadExpertH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": header_timeout_s})
