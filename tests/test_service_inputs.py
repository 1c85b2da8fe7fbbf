"""Two answers of POST /predict that an HTTP client library will not produce, driven at the ASGI
level: a Content-Length that is not a number (400 bad_content_length) and a client that hangs up
before its body is sent (400 client_disconnected). The server stays up after each."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import pytest
import torch
from PIL import Image

from defense.bundle import save_bundle
from defense.guard import Guard
from defense.models import ModelSpec, create_model
from service.app import create_app
from service.settings import ServiceSettings
from synthetic import PREPROCESSING, manifest_fields


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    models = [create_model("tiny_cnn", 4).eval() for _ in range(3)]
    guard = Guard(*models, preprocessing=PREPROCESSING, rejection_threshold=0.5)
    path = tmp_path_factory.mktemp("inputs") / "bundle"
    save_bundle(path, guard, ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    return path


def scope(headers: list[tuple[bytes, bytes]], path: str = "/predict", method: str = "POST") -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "server": ("guard", 80), "client": ("127.0.0.1", 1), "headers": headers}


def exchange(bundle, requests):
    """Run each (headers, receive messages) through one app; the response start and body of each,
    then a GET /readyz to show the server is still up."""

    async def scenario():
        app = create_app(ServiceSettings(bundle=bundle, device="cpu", max_wait_ms=1.0))
        async with app.router.lifespan_context(app):
            while app.state.service.state != "ready":
                await asyncio.sleep(0.01)
            answers = []
            for headers, incoming in requests + [([], [])]:
                queue = list(incoming)
                sent = []

                async def receive():
                    if queue:
                        return queue.pop(0)
                    await asyncio.sleep(3600)  # a client that never sends more

                async def send(message):
                    sent.append(message)

                target = scope(headers) if headers else scope([], "/readyz", "GET")
                await asyncio.wait_for(app(target, receive, send), 30)
                start = next(m for m in sent if m["type"] == "http.response.start")
                body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
                answers.append((start["status"], json.loads(body)))
            return answers

    return asyncio.run(scenario())


@pytest.mark.parametrize("value", [b"lots", b"12abc", b""])
def test_a_content_length_that_is_not_a_number_is_400(bundle, value):
    headers = [(b"content-type", b"application/json"), (b"content-length", value)]
    (status, body), (ready_status, _) = exchange(bundle, [(headers, [{"type": "http.request", "body": b"{}"}])])
    assert status == 400 and body["error"] == "bad_content_length"
    assert repr(value.decode()) in body["detail"] and "not a number" in body["detail"]
    assert ready_status == 200


def test_a_client_that_disconnects_before_its_body_is_sent_gets_400(bundle):
    headers = [(b"content-type", b"application/json"), (b"content-length", b"5000")]
    incoming = [{"type": "http.request", "body": b'{"images": ["', "more_body": True}, {"type": "http.disconnect"}]
    (status, body), (ready_status, _) = exchange(bundle, [(headers, incoming)])
    assert status == 400 and body == {"error": "client_disconnected",
                                      "detail": "the client closed the connection before the body was sent"}
    assert ready_status == 200


def test_a_well_formed_request_through_the_same_driver_is_answered(bundle):
    # The driver itself is sound: a valid JSON request through it gets 200 and a prediction.
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buffer, format="PNG")
    payload = json.dumps({"images": [base64.b64encode(buffer.getvalue()).decode()]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    (status, body), _ = exchange(bundle, [(headers, [{"type": "http.request", "body": payload}])])
    assert status == 200 and len(body["predictions"]) == 1


def test_pixels_within_reads_headers_only_and_refuses_what_it_cannot_open():
    import io

    from PIL import Image

    from defense.preprocessing import png_size
    from service.inputs import pixels_within

    def png(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    assert pixels_within([png(16, 16), png(32, 32)], 16 * 16 + 32 * 32)
    assert not pixels_within([png(16, 16), png(32, 32)], 16 * 16 + 32 * 32 - 1)
    assert not pixels_within([b"not an image"], 10 ** 9)
    assert not pixels_within([png(4, 4)], 10 ** 9, formats=("JPEG",))
    assert png_size(png(7, 3)) == (7, 3) and png_size(png(7, 3)[:20]) is None and png_size(b"GIF89a" * 8) is None
    damaged = png(8, 8)[:40]  # a PNG header, then nothing Pillow can decode: the decode gives the error
    assert pixels_within([damaged], 64) and not pixels_within([damaged], 63)
