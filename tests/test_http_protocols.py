"""Both HTTP/1.1 protocols (httptools, the default when installed, and h11, the fallback) keep the
same promises: the JSON 400 for a malformed request and for an unfinished request line and headers
over ``max_header_bytes``, the header-read timeout (and none on an idle keep-alive connection), and
a response's head and body in one write. Driven in process on a recording transport: no sockets,
milliseconds per test."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn
from uvicorn.server import ServerState

from service.protocol_choice import http_protocol_class

PARSERS = ("httptools", "h11")
MAX_HEADER_BYTES = 2048


class _Transport:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name, default)


async def _app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _connection(parser: str, header_timeout_s: float = 10.0):
    """A protocol of ``parser`` on a recording transport, as uvicorn would make it."""
    protocol_class = http_protocol_class(header_timeout_s, MAX_HEADER_BYTES, parser)
    assert parser in protocol_class.__name__.lower()
    config = uvicorn.Config(_app, http=protocol_class, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            access_log=False, lifespan="off")
    config.load()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={},
                              _loop=asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def _settle(seconds: float = 0.02) -> None:
    await asyncio.sleep(seconds)


def _json_400(transport: _Transport) -> dict:
    reply = b"".join(transport.writes)
    assert reply.startswith(b"HTTP/1.1 400") and transport.closed
    assert b"content-type: application/json" in reply.lower()
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


@pytest.mark.parametrize("parser", PARSERS)
def test_a_malformed_request_gets_the_json_400(parser):
    async def scenario():
        protocol, transport = _connection(parser)
        protocol.data_received(b"NOT A REQUEST\r\n\r\n")
        await _settle()
        assert _json_400(transport)["error"] == "bad_http_request"

    asyncio.run(scenario())


@pytest.mark.parametrize("parser", PARSERS)
def test_headers_arriving_in_pieces_over_the_cap_get_the_json_400(parser):
    async def scenario():
        protocol, transport = _connection(parser)
        protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(2 * MAX_HEADER_BYTES // 100):
            if transport.closed:
                break
            protocol.data_received(b"X-Piece: " + b"a" * 90 + b"\r\n")
        await _settle()
        assert _json_400(transport)["error"] == "bad_http_request"

    asyncio.run(scenario())


@pytest.mark.parametrize("parser", PARSERS)
def test_a_response_leaves_in_one_write_and_keep_alive_outlasts_the_header_timeout(parser):
    async def scenario():
        protocol, transport = _connection(parser, header_timeout_s=0.05)
        head = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n"
        protocol.data_received(head)  # the head in one read, the body in two more
        protocol.data_received(b"ab")
        protocol.data_received(b"cd")
        await _settle()
        assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 200")
        assert transport.writes[0].endswith(b"\r\n\r\n{}")
        await _settle(0.15)  # idle on keep-alive past the header timeout: left open
        assert not transport.closed
        protocol.data_received(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        await _settle()
        assert len(transport.writes) == 2 and transport.writes[1].startswith(b"HTTP/1.1 200")
        protocol.connection_lost(None)

    asyncio.run(scenario())


@pytest.mark.parametrize("parser", PARSERS)
def test_a_head_that_does_not_finish_in_time_is_closed(parser):
    async def scenario():
        protocol, transport = _connection(parser, header_timeout_s=0.05)
        protocol.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the blank line
        await _settle(0.15)
        assert transport.closed and transport.writes == []
        silent, silent_transport = _connection(parser, header_timeout_s=0.05)  # nothing sent at all
        await _settle(0.15)
        assert silent_transport.closed

    asyncio.run(scenario())


def test_auto_picks_httptools_when_it_is_installed():
    pytest.importorskip("httptools")
    assert "HttpTools" in http_protocol_class(10.0, MAX_HEADER_BYTES).__name__
    assert "H11" in http_protocol_class(10.0, MAX_HEADER_BYTES, "h11").__name__
