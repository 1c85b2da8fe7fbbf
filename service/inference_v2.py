"""The Open Inference Protocol v2 (KServe v2 REST) request and response, as pure functions; the
routes are :mod:`service.v2_routes`.

A request carries exactly one input tensor, either

- ``images``, datatype ``BYTES``, shape ``[N]``: encoded image files (PNG, JPEG, ...), decoded by
  the bundle's preprocessing exactly as ``POST /predict`` decodes them; or
- ``pixels``, datatype ``UINT8``, shape ``[N, H, W, 3]`` (channels last, RGB) at the bundle's input
  size ``H x W``: already-decoded images, which then skip the decoder.

Tensor data come either in the JSON (``data``: base64 strings for ``images``, this server's
convention as in ``/predict``; integers 0-255 for ``pixels``) or in the binary tensor data
extension that tritonclient uses: the body is the JSON header (its length in the
``Inference-Header-Content-Length`` header) followed by the raw tensor (``parameters.binary_data_size``
bytes); a ``BYTES`` element there is a 4-byte little-endian length then its bytes.

The outputs, shape ``[N]`` each: ``label`` INT64 (-1 where ``/predict`` withholds it), ``confidence``
FP32 (-1 where withheld), ``score`` FP64 and its parts ``expert_score`` and ``feature_score`` FP64
(null where the bundle has no feature signal; all three absent with the decision_only policy),
``rejected`` and ``flagged`` BOOL. Answers are JSON (no binary outputs, which every v2 client reads).
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pydantic_core
import torch
from pydantic import BaseModel, ValidationError

from defense.preprocessing import Preprocessing
from service.inputs import InputError, Limits, check_json_values, decode_base64, decode_images

BYTES_INPUT, PIXELS_INPUT = "images", "pixels"
OUTPUTS = {"label": "INT64", "confidence": "FP32", "score": "FP64", "rejected": "BOOL", "flagged": "BOOL",
           "expert_score": "FP64", "feature_score": "FP64"}
SCORE_OUTPUTS = ("score", "expert_score", "feature_score")  # absent with the decision_only policy
HEADER_LENGTH = "inference-header-content-length"
MAX_DIMENSIONS = 4  # of an input tensor's shape


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict | None = None
    data: list | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


def model_metadata(name: str, bundle_id: str, input_size: tuple[int, int], show_scores: bool) -> dict:
    """``GET /v2/models/{name}``: the two input forms and the outputs."""
    height, width = input_size
    outputs = [name_ for name_ in OUTPUTS if show_scores or name_ not in SCORE_OUTPUTS]
    return {"name": name, "versions": [bundle_id], "platform": "badexpert_guard",
            "inputs": [{"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": PIXELS_INPUT, "datatype": "UINT8", "shape": [-1, height, width, 3]}],
            "outputs": [{"name": output, "datatype": OUTPUTS[output], "shape": [-1]} for output in outputs]}


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON header's length from Inference-Header-Content-Length (None: the body is all JSON)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if not 0 < length <= body_size:
        raise InputError(400, "malformed_body", f"Inference-Header-Content-Length {value!r} is not a length "
                         f"between 1 and the body's {body_size} bytes")
    return length


def max_json_values(limits: Limits, input_size: tuple[int, int]) -> int:
    """The most JSON values a v2 request may hold: a full ``pixels`` tensor in JSON, and some slack."""
    height, width = input_size
    return limits.max_images * height * width * 3 + 256


def check_sizes(document) -> None:
    """The list sizes a v2 request may have, checked on the parsed JSON before validation, which would
    build an error for each item of a long list (a million of them hold the GIL for seconds)."""
    if not isinstance(document, dict):
        return  # validation says what is wrong
    inputs, outputs = document.get("inputs"), document.get("outputs")
    if isinstance(inputs, list) and len(inputs) != 1:
        raise InputError(400, "bad_tensor", f"{len(inputs)} input tensors; send exactly one: "
                         f"'{BYTES_INPUT}' (BYTES) or '{PIXELS_INPUT}' (UINT8)")
    if isinstance(outputs, list) and len(outputs) > len(OUTPUTS):
        raise InputError(400, "bad_tensor", f"{len(outputs)} requested outputs; there are {len(OUTPUTS)}: "
                         f"{', '.join(OUTPUTS)}")
    for tensor in inputs if isinstance(inputs, list) else []:
        shape = tensor.get("shape") if isinstance(tensor, dict) else None
        if isinstance(shape, list) and len(shape) > MAX_DIMENSIONS:
            raise InputError(400, "bad_tensor", f"a shape of {len(shape)} dimensions; '{BYTES_INPUT}' is [N] and "
                             f"'{PIXELS_INPUT}' [N, H, W, 3]")


def parse_request(body: bytes, json_length: int | None, max_values: int) -> tuple[V2InferRequest, memoryview]:
    """The JSON header, validated, and the binary tensor data after it. A header that could hold more
    than ``max_values`` values is refused before it is parsed."""
    header, binary = (body, b"") if json_length is None else (body[:json_length], body[json_length:])
    check_json_values(header, max_values, "the inference request")
    try:
        document = pydantic_core.from_json(header)
    except ValueError as error:
        raise InputError(400, "malformed_json", f"the inference request is not valid JSON ({error})")
    check_sizes(document)
    try:
        request = V2InferRequest.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InputError(400, "malformed_json", f"inference request: {where}: {first['msg']}")
    if len(request.inputs) != 1:
        raise InputError(400, "bad_tensor", f"{len(request.inputs)} input tensors; send exactly one: "
                         f"'{BYTES_INPUT}' (BYTES) or '{PIXELS_INPUT}' (UINT8)")
    for output in request.outputs or []:
        if output.name not in OUTPUTS:
            raise InputError(400, "bad_tensor", f"unknown output {output.name!r}; outputs: {', '.join(OUTPUTS)}")
    return request, memoryview(binary)


def _binary_part(tensor: V2Tensor, binary: memoryview) -> memoryview | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise InputError(400, "bad_tensor", f"input {tensor.name!r} has neither data nor binary_data_size")
        return None
    if not isinstance(size, int) or size < 0 or size != len(binary):
        raise InputError(400, "bad_tensor", f"input {tensor.name!r}: binary_data_size {size!r} does not match the "
                         f"{len(binary)} bytes after the JSON header")
    return binary


def _count(tensor: V2Tensor, limits: Limits) -> int:
    if not tensor.shape or any(dimension < 0 for dimension in tensor.shape):
        raise InputError(400, "bad_tensor", f"input {tensor.name!r}: shape {tensor.shape} is not a tensor shape")
    count = tensor.shape[0]
    if count == 0:
        raise InputError(400, "no_image", f"no image: input {tensor.name!r} has shape {tensor.shape}")
    if count > limits.max_images:
        raise InputError(413, "too_many_images", f"{count} images in one request; the limit is {limits.max_images} "
                         "(split the request)")
    return count


def _flatten(data: list) -> list:
    flat, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def byte_elements(tensor: V2Tensor, binary: memoryview, limits: Limits) -> list[bytes]:
    """The encoded images of a BYTES tensor, within the image count and size limits."""
    count = _count(tensor, limits)
    if tensor.shape[1:] not in ([], [1]):
        raise InputError(400, "bad_tensor", f"input {tensor.name!r}: shape {tensor.shape}; expected [N] or [N, 1]")
    raw = _binary_part(tensor, binary)
    if raw is None:
        texts = _flatten(tensor.data)
        if len(texts) != count or not all(isinstance(text, str) for text in texts):
            raise InputError(400, "bad_tensor", f"input {tensor.name!r}: data must be {count} base64 strings")
        return [decode_base64(text, index, limits) for index, text in enumerate(texts)]
    blobs, offset = [], 0
    while offset < len(raw):
        if len(blobs) == count:
            raise InputError(400, "bad_tensor", f"input {tensor.name!r}: more elements than its shape {tensor.shape}")
        if offset + 4 > len(raw):
            raise InputError(400, "bad_tensor", f"input {tensor.name!r}: element {len(blobs)} has a torn length prefix")
        (size,) = struct.unpack_from("<I", raw, offset)
        if size > limits.max_image_bytes:
            raise InputError(413, "image_too_large", f"image {len(blobs)} has {size} bytes, over the limit of "
                             f"{limits.max_image_bytes}", len(blobs))
        if offset + 4 + size > len(raw):
            raise InputError(400, "bad_tensor", f"input {tensor.name!r}: element {len(blobs)} is cut short")
        blobs.append(bytes(raw[offset + 4: offset + 4 + size]))
        offset += 4 + size
    if len(blobs) != count:
        raise InputError(400, "bad_tensor", f"input {tensor.name!r}: {len(blobs)} elements for shape {tensor.shape}")
    return blobs


def pixel_images(tensor: V2Tensor, binary: memoryview, limits: Limits, input_size: tuple[int, int]) -> torch.Tensor:
    """The (N, 3, H, W) uint8 images of a UINT8 [N, H, W, 3] tensor at the bundle's input size."""
    count = _count(tensor, limits)
    height, width = input_size
    if tensor.shape[1:] != [height, width, 3]:
        raise InputError(400, "bad_tensor", f"input {tensor.name!r}: shape {tensor.shape}; expected "
                         f"[N, {height}, {width}, 3] (channels last, the bundle's input size)")
    expected = count * height * width * 3
    raw = _binary_part(tensor, binary)
    if raw is None:
        values = _flatten(tensor.data)
        if len(values) != expected or not all(type(v) is int and 0 <= v <= 255 for v in values):
            raise InputError(400, "bad_tensor", f"input {tensor.name!r}: data must be {expected} integers 0-255")
        array = np.asarray(values, dtype=np.uint8)
    else:
        if len(raw) != expected:
            raise InputError(400, "bad_tensor", f"input {tensor.name!r}: {len(raw)} bytes for shape {tensor.shape}")
        array = np.frombuffer(raw, dtype=np.uint8)
    return torch.from_numpy(array.reshape(count, height, width, 3).copy()).permute(0, 3, 1, 2).contiguous()


def png_bytes(image: torch.Tensor) -> bytes:
    """A (3, H, W) uint8 image as PNG: what the audit trail hashes and quarantines for a pixels input."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def read_images(request: V2InferRequest, binary: memoryview, limits: Limits,
                preprocessing: Preprocessing) -> tuple[list[bytes], torch.Tensor]:
    """Blocking (decode thread): the request's image bytes and (N, 3, H, W) uint8 tensor."""
    (tensor,) = request.inputs
    if tensor.name == BYTES_INPUT and tensor.datatype == "BYTES":
        blobs = byte_elements(tensor, binary, limits)
        return blobs, decode_images(preprocessing, blobs, limits.max_pixels, limits.formats)
    if tensor.name == PIXELS_INPUT and tensor.datatype == "UINT8":
        images = pixel_images(tensor, binary, limits, preprocessing.input_size)
        return [png_bytes(image) for image in images], images
    raise InputError(400, "bad_tensor", f"input {tensor.name!r} of datatype {tensor.datatype}: send "
                     f"'{BYTES_INPUT}' as BYTES or '{PIXELS_INPUT}' as UINT8")


def response_body(model_name: str, request: V2InferRequest, bundle_id: str, outputs: dict[str, list],
                  parameters: dict) -> bytes:
    """The JSON inference response with the requested outputs (all of them when none was named)."""
    wanted = [output.name for output in request.outputs] if request.outputs else list(OUTPUTS)
    tensors = [{"name": name, "datatype": OUTPUTS[name], "shape": [len(outputs[name])], "data": outputs[name]}
               for name in wanted if name in outputs]
    answer = {"model_name": model_name, "model_version": bundle_id, "outputs": tensors,
              "parameters": {"bundle": bundle_id, **parameters}}
    if request.id is not None:
        answer["id"] = request.id
    return json.dumps(answer, allow_nan=False).encode()
