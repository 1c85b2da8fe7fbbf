"""uvicorn's HTTP/1.1 protocols with what the API promises on top: the JSON error body for the
requests the protocol refuses itself (a malformed request line, headers over ``max_header_bytes``):
the client gets ``{"error": "bad_http_request", "detail": ...}`` like every other error, not plain
text; a header-read timeout: a connection whose request line and headers have not all arrived
within ``header_timeout_s`` of its first byte (or of opening) is closed, so slow-header connections
cannot pile up (uvicorn itself times out only idle keep-alive connections); and writes coalesced:
what a response writes within one turn of the event loop (its head, then its body) leaves in one
send, not one per piece (:class:`CoalescingTransport`).

Two parsers, the same guarantees: httptools (llhttp, in C: a fraction of h11's parsing time per
request) when it is installed, as it is with the project's dependencies, else h11 (pure Python:
:func:`service.protocol_choice.http_protocol_class`). This module holds the shared parts and the h11 protocol;
:mod:`service.httptools_protocol` the other."""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop go out as one ``write`` at the end
    of that turn: a response's head and body in one TCP segment and one system call instead of two.
    ``close`` sends what is pending first; ``abort`` drops it. Everything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self._transport, self._loop = transport, loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._pending = []
            if not self._transport.is_closing():
                self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def bad_request_body(msg: str) -> bytes:
    """The JSON body of a 400 that the HTTP protocol sends itself (the parser's ``msg`` inside)."""
    return json.dumps({"error": "bad_http_request", "detail": f"{msg} (malformed request, or a request line "
                       "and headers over the server's limit)"}).encode()


class JSONErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = bad_request_body(msg)
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # the connection's state allows no response any more
            pass
        self.transport.close()


class HeaderTimer:
    """The header-read timeout both HTTP protocols share: a connection whose request line and headers
    are not all in within ``header_timeout_s`` of its first byte (or of opening) is closed. A protocol
    calls ``_arm_header_timer`` when a request may begin, ``_disarm_header_timer`` when its headers are
    in or the connection is lost, and says by ``_head_pending`` whether it still waits for them."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def _head_pending(self) -> bool:
        raise NotImplementedError

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._head_pending() and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers took over %g s", self.header_timeout_s)
            self.transport.close()


class HeaderTimeoutH11Protocol(HeaderTimer, JSONErrorH11Protocol):
    """Closes a connection whose request line and headers take longer than ``header_timeout_s``."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self._header_timer = None
        self._arm_header_timer()

    def _head_pending(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a new request begins (a keep-alive's next one too)
            self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are all in
            self._disarm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)
