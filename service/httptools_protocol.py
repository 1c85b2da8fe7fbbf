"""uvicorn's httptools protocol (llhttp, a C parser) with the guarantees of the h11 one in
:mod:`service.http_protocol`: the JSON 400 body, the header-read timeout and coalesced writes, and
the request line and headers capped at ``max_header_bytes``.

Why a cap of its own: h11 refuses a request whose unfinished head outgrows its buffer limit
(uvicorn's ``h11_max_incomplete_event_size``), but uvicorn's httptools protocol has no such limit,
and llhttp keeps no buffer to bound. So this protocol counts the bytes that arrive while a request's
head is incomplete, and answers 400 once they pass the cap, as h11 does. A head that arrives whole
in one read reaches the app, whose middleware answers 431 past the same cap (as with h11). The count
starts at the first read after a request ends, so the tail of a read that also ended the previous
request is not counted: at most one read (256 KiB) more than the cap, and still bounded."""

from __future__ import annotations


from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.http_protocol import CoalescingTransport, HeaderTimer, bad_request_body

HEAD_TOO_LARGE = "Request line and headers over the limit."


class GuardedHttpToolsProtocol(HeaderTimer, HttpToolsProtocol):
    max_header_bytes: int = 16384

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self._awaiting_head = True  # no request, or one whose headers are not all in
        self._head_bytes = 0
        self._header_timer = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:  # a new request begins (a keep-alive's next one too), or its head goes on
            self._arm_header_timer()
            self._head_bytes += len(data)
        super().data_received(data)
        if self._awaiting_head and self._head_bytes > self.max_header_bytes and not self.transport.is_closing():
            self.logger.warning("refusing a request whose line and headers are over %d bytes", self.max_header_bytes)
            self.send_400_response(HEAD_TOO_LARGE)

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._disarm_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._awaiting_head, self._head_bytes = True, 0
        super().on_message_complete()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = bad_request_body(msg)
        self.transport.write(b"".join([STATUS_LINE[400], b"content-type: application/json\r\nconnection: close\r\n",
                                       b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body]))
        self.transport.close()

    def _head_pending(self) -> bool:
        return self._awaiting_head
