"""Reading one request's images, multipart or JSON, within the limits; every refusal is an
:class:`InputError` (a 4xx with a JSON body), never a 500.

The body is read once, up to ``max_request_bytes`` (a larger Content-Length is refused before
reading), and the images are kept as bytes: they are decoded by :func:`decode_images`, which is
``Preprocessing.load`` from the bundle, the offline job's own code path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from defense.preprocessing import ImageDecodeError, Preprocessing, batch_to_uint8, pixels_within
from service.schemas import PredictJSONRequest

MULTIPART = "multipart/form-data"
JSON = "application/json"
SUPPORTED = (MULTIPART, JSON)
PART_NAME = "file"
_DATA_URL = re.compile(r"data:[\w.+-]*/?[\w.+-]*((?:;[\w.+-]+=[^;,]*)*);base64,", re.IGNORECASE)
_WHITESPACE_BYTES = b" \t\n\r\v\f"
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_STREAM_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
JSON_SLICE = 1 << 20  # bytes counted per C call when a JSON body's values are counted
MAX_DETAIL_CHARS = 1024  # an error's detail sentence; what a client sent is never echoed beyond it


def capped(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut (error bodies that echo input stay small)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} characters cut)"


class InputError(Exception):
    """A request the server refuses: HTTP status, a machine-readable code, a sentence, the image index."""

    def __init__(self, status: int, code: str, detail: str, index: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.index = status, code, detail, index
        self.headers = headers

    def body(self) -> dict:
        body = {"error": self.code, "detail": capped(self.detail)}
        if self.index is not None:
            body["index"] = self.index
        return body


@dataclass(frozen=True)
class Limits:
    max_images: int
    max_image_bytes: int
    max_request_bytes: int
    max_pixels: int
    max_parts: int = 64
    max_part_header_bytes: int = 8192
    formats: tuple[str, ...] | None = None  # Pillow format names to decode; None: any


class ByteBudget:
    """Request-body bytes held by all requests in flight together. Used on the event loop only."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def try_take(self, count: int) -> bool:
        if self.held + count > self.limit:
            return False
        self.held += count
        return True

    def give_back(self, count: int) -> None:
        self.held -= count


@dataclass
class Reservation:
    """What one request holds of the :class:`ByteBudget` (given back when the request ends)."""

    bytes: int = 0


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_media_type(kind: str) -> None:
    if kind not in SUPPORTED:
        shown = kind or "none"
        raise InputError(415, "unsupported_media_type",
                         f"Content-Type {shown} is not supported: send multipart/form-data with one or more parts "
                         f"named '{PART_NAME}', or application/json {{\"images\": [\"<base64>\", ...]}}")


def check_content_length(request: Request, limits: Limits) -> int | None:
    """The announced body size (None when the body is chunked), refused when over the limit."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InputError(400, "bad_content_length", f"Content-Length {value!r} is not a number")
    if length > limits.max_request_bytes:
        raise InputError(413, "request_too_large",
                         f"request body of {length} bytes is over the limit of {limits.max_request_bytes}")
    return length


def body_budget_exhausted(retry_after: dict[str, str]) -> InputError:
    return InputError(503, "overloaded", "the server holds as many request bytes as it may; retry shortly",
                      headers=retry_after)


async def read_body_within(seconds: float, *args) -> bytes:
    """:func:`read_body` (same arguments), TimeoutError past ``seconds``; asyncio.timeout (3.11+) is a
    timer, where wait_for makes a task per request."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await read_body(*args)
    return await asyncio.wait_for(read_body(*args), seconds)


async def read_body(request: Request, limits: Limits, budget: ByteBudget, reservation: Reservation,
                    retry_after: dict[str, str]) -> bytes:
    """The whole body, refusing it as soon as it grows past the limit (chunked uploads too) or
    past what the byte budget has left (503). ``reservation`` grows with what is taken."""
    chunks, total = [], 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_request_bytes:
                raise InputError(413, "request_too_large",
                                 f"request body is over the limit of {limits.max_request_bytes} bytes")
            if total > reservation.bytes:
                if not budget.try_take(total - reservation.bytes):
                    raise body_budget_exhausted(retry_after)
                reservation.bytes = total
            chunks.append(chunk)
    except ClientDisconnect:
        raise InputError(400, "client_disconnected", "the client closed the connection before the body was sent")
    return b"".join(chunks)


def _too_many(count: int, limits: Limits) -> InputError:
    return InputError(413, "too_many_images",
                      f"{count} images in one request; the limit is {limits.max_images} (split the request)")


def _too_big(index: int, size: int, limits: Limits) -> InputError:
    return InputError(413, "image_too_large",
                      f"image {index} has {size} bytes, over the limit of {limits.max_image_bytes}", index)


def parse_multipart(content_type: str, body: bytes, limits: Limits) -> list[bytes]:
    """The contents of the parts named 'file', in order; other parts are ignored."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise InputError(422, "malformed_body", "multipart/form-data without a boundary parameter in its Content-Type")
    images: list[bytes] = []
    state = {"header": b"", "value": b"", "headers": {}, "data": None, "ended": False, "parts": 0,
             "header_bytes": 0}

    def on_part_begin():
        state["headers"], state["data"], state["header_bytes"] = {}, None, 0
        state["parts"] += 1
        if state["parts"] > limits.max_parts:
            raise InputError(413, "too_many_parts", f"more than {limits.max_parts} multipart parts in one request")

    def count_header_bytes(count: int):
        state["header_bytes"] += count
        if state["header_bytes"] > limits.max_part_header_bytes:
            raise InputError(413, "part_header_too_large",
                             f"the headers of multipart part {state['parts'] - 1} are over "
                             f"{limits.max_part_header_bytes} bytes")

    def on_header_field(data, start, end):
        count_header_bytes(end - start)
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        count_header_bytes(end - start)
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["header"].strip().lower()] = state["value"].strip()
        state["header"], state["value"] = b"", b""

    def on_headers_finished():
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == PART_NAME.encode():
            if len(images) + 1 > limits.max_images:
                raise _too_many_sentinel
            state["data"] = bytearray()

    def on_part_data(data, start, end):
        buffer = state["data"]
        if buffer is not None:
            buffer += data[start:end]
            if len(buffer) > limits.max_image_bytes:
                raise InputError(413, "image_too_large", f"image {len(images)} is over the limit of "
                                 f"{limits.max_image_bytes} bytes", len(images))

    def on_part_end():
        if state["data"] is not None:
            images.append(bytes(state["data"]))
            state["data"] = None

    def on_end():
        state["ended"] = True

    _too_many_sentinel = InputError(413, "too_many_images",
                                    f"more than {limits.max_images} images in one request (split the request)")
    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except InputError:
        raise
    except (MultipartParseError, ValueError) as error:
        if "header size" in str(error):  # python-multipart's own cap on one header line
            raise InputError(413, "part_header_too_large", f"a multipart part's header is too large ({error})")
        raise InputError(422, "malformed_body", f"malformed multipart body ({error})")
    if not state["ended"] and not images:
        raise InputError(422, "malformed_body", "malformed multipart body (no closing boundary)")
    if not images:
        raise InputError(400, "no_image", f"no image: send one or more multipart parts named '{PART_NAME}'")
    return images


def decode_base64(text: str, index: int, limits: Limits) -> bytes:
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            raise InputError(422, "malformed_base64", f"image {index}: a data URL must look like "
                             "'data:image/png;base64,<data>'", index)
        text = text[match.end():]
    if len(text) // 8 * 3 > limits.max_image_bytes + 3:  # over the limit even if half of it were line breaks
        raise _too_big(index, len(text) // 4 * 3, limits)
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise InputError(422, "malformed_base64", f"image {index}: not valid base64 (a character outside ASCII)",
                         index)
    raw = raw.translate(None, _WHITESPACE_BYTES)  # line-wrapped base64; one pass of a few ms (a regex: 100+ ms)
    if len(raw) // 4 * 3 > limits.max_image_bytes + 3:  # refuse before decoding
        raise _too_big(index, len(raw) // 4 * 3, limits)
    if b"-" in raw or b"_" in raw:
        raw = raw.translate(_URLSAFE)
    raw += b"=" * (-len(raw) % 4)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InputError(422, "malformed_base64", f"image {index}: not valid base64 ({error})", index)
    if not data:
        raise InputError(422, "undecodable_image", f"image {index}: empty", index)
    if len(data) > limits.max_image_bytes:
        raise _too_big(index, len(data), limits)
    return data


def check_json_values(body: bytes, max_values: int, what: str) -> None:
    """Refuse a JSON body that could hold more than ``max_values`` values, before it is parsed: a
    parser's error for each of a million items holds the GIL (and so the event loop) for seconds.
    Counted as commas, in slices of JSON_SLICE bytes: each count is a short C call, so the event
    loop gets its turn between them whatever the body's size. (Base64 holds no comma.)"""
    commas = 0
    for start in range(0, len(body), JSON_SLICE):
        commas += body.count(b",", start, start + JSON_SLICE)
        if commas >= max_values:
            raise InputError(413, "too_many_values", f"{what} holds more than {max_values} JSON values; this "
                             "request's limits allow no more (split the request)")


def predict_json_values(limits: Limits) -> int:
    """The most JSON values a /predict body may hold: two commas an image (separator, data URL) and some slack."""
    return 4 * limits.max_images + 64


def parse_json(body: bytes, limits: Limits) -> list[bytes]:
    check_json_values(body, predict_json_values(limits), "the body")
    try:
        request = PredictJSONRequest.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid" or not body.strip():
            raise InputError(422, "malformed_json", f"the body is not valid JSON ({first['msg']})")
        where = ".".join(str(part) for part in first["loc"]) or "body"
        index = first["loc"][1] if len(first["loc"]) > 1 and isinstance(first["loc"][1], int) else None
        raise InputError(422, "malformed_json", f"expected {{\"images\": [\"<base64>\", ...]}}: {where}: {first['msg']}",
                         index)
    if not request.images:
        raise InputError(400, "no_image", "no image: 'images' is an empty list")
    if len(request.images) > limits.max_images:
        raise _too_many(len(request.images), limits)
    return [decode_base64(text, index, limits) for index, text in enumerate(request.images)]


def decode_images(preprocessing: Preprocessing, images: list[bytes], max_pixels: int,
                  formats: tuple[str, ...] | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 through the bundle's preprocessing. Blocking: run it off the event loop."""
    arrays = []
    for index, data in enumerate(images):
        try:
            arrays.append(preprocessing.load_array(data, max_pixels, formats))
        except ImageDecodeError as error:
            if error.too_large:
                raise InputError(413, "image_too_large", f"image {index}: {error}", index)
            message = _STREAM_REPR.sub("", str(error))
            raise InputError(422, "undecodable_image", f"image {index}: {message}", index)
        except Exception as error:  # EXIF or mode conversion trouble in an otherwise decodable file
            raise InputError(422, "undecodable_image",
                             f"image {index}: cannot process image ({type(error).__name__}: {error})", index)
    return batch_to_uint8(arrays)


def parse_images(kind: str, content_type: str, body: bytes, limits: Limits, preprocessing: Preprocessing,
                 inline: int = 0) -> tuple[list[bytes], torch.Tensor] | None:
    """Blocking (a decode thread): a /predict body's image bytes and their (N, 3, H, W) uint8 tensor.
    ``inline`` pixels (on the event loop): None instead when the headers say more than that."""
    blobs = parse_multipart(content_type, body, limits) if kind == MULTIPART else parse_json(body, limits)
    if inline and not pixels_within(blobs, inline, limits.formats):
        return None
    return blobs, decode_images(preprocessing, blobs, limits.max_pixels, limits.formats)
