"""uvicorn's HTTP/1.1 protocol (h11) with the API's JSON error body for the requests it refuses
itself (a malformed request line, headers over ``max_header_bytes``): the client gets
``{"error": "bad_http_request", "detail": ...}`` like every other error, not plain text."""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class JSONErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": "bad_http_request", "detail": f"{msg} (malformed request, or a request line "
                           "and headers over the server's limit)"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # the connection's state allows no response any more
            pass
        self.transport.close()
