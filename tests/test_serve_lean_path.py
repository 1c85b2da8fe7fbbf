"""Issue 30's server changes keep what the route promised: ``POST /predict`` through the lean path
answers and refuses exactly as the route does (errors, 405, middleware headers), and a response's
writes leave in one send (``CoalescingTransport``), with close sending and abort dropping what is
pending."""

from __future__ import annotations

import asyncio

from service.http_protocol import CoalescingTransport
from test_service import serving


class _RecordingTransport:
    def __init__(self):
        self.writes, self.closed, self.aborted = [], False, False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_writes_within_one_turn_leave_as_one_and_close_sends_what_is_pending():
    async def scenario():
        real = _RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"{}")
        assert real.writes == [] and transport.get_write_buffer_size() == 21
        await asyncio.sleep(0)
        assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\n{}"]
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else is the transport's
        transport.write(b"last")
        transport.close()
        assert real.writes[-1] == b"last" and real.closed
        await asyncio.sleep(0)
        assert len(real.writes) == 2  # the flush scheduled before close found nothing left

    asyncio.run(scenario())


def test_abort_drops_what_is_pending():
    async def scenario():
        real = _RecordingTransport()
        transport = CoalescingTransport(real, asyncio.get_running_loop())
        transport.write(b"partial")
        transport.abort()
        await asyncio.sleep(0)
        assert real.writes == [] and real.aborted

    asyncio.run(scenario())


def test_the_lean_predict_path_answers_refuses_and_keeps_the_route(tiny):
    with serving(tiny.bundle) as client:
        answer = client.post("/predict", files=[("file", ("a.png", tiny.files[0].read_bytes(), "image/png"))])
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
        assert answer.headers["x-request-id"]  # the observability middleware still wraps it
        refused = client.post("/predict", content=b"not an image", headers={"content-type": "text/plain"})
        assert refused.status_code == 415 and refused.json()["error"] == "unsupported_media_type"
        wrong_method = client.get("/predict")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"
        assert "/predict" in client.get("/openapi.json").json()["paths"]
