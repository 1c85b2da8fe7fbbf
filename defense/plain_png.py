"""A plain PNG decoded by Pillow's own decoder without Pillow's plugin machinery.

A one-image request to the server is mostly a small PNG, and opening one through ``Image.open``
(format detection, the PNG plugin reading chunk by chunk in Python, ``load``) cost about twice what
decoding it does. For the common PNG, 8-bit greyscale, RGB or RGBA, not interlaced, with nothing
but colour-management and resolution chunks beside its pixels, :func:`decode_plain_png` reads the
chunks here (every CRC checked) and hands the joined image data to the decoder Pillow's PNG plugin
uses for it (``zip``, the same C code and raw mode), so the pixels are the ones ``Image.open``
gives, bit for bit.

Anything else gives None and the caller decodes through ``Image.open``, which then decides, error
messages included: another format, a palette, 16 bits, greyscale with alpha, interlacing, a
transparency chunk, any text or EXIF chunk (either may carry an EXIF orientation), an unknown
chunk, a bad CRC, damaged or short image data, bytes after the end chunk, more pixels than allowed,
more chunks than such a file needs.
Not libpng: torchvision's ``decode_png`` is faster still, but it kills the process on some damaged
image data, which on a server's request path would let one upload take the server down.
"""

from __future__ import annotations

import struct
import zlib

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Chunks that change nothing Pillow decodes: it records them in ``info`` at most.
PIXEL_NEUTRAL_CHUNKS = frozenset({b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"tIME"})

# At most this many chunks, and one more per 4 KiB of file (encoders write image data in chunks of
# 8 KiB or more), so that a file of tiny chunks costs no more here than Image.open's own reading.
MAX_CHUNKS, BYTES_PER_EXTRA_CHUNK = 16, 4096

# IHDR colour type at bit depth 8 -> the mode (and raw mode) Pillow's PNG plugin decodes it to.
PLAIN_MODES = {0: "L", 2: "RGB", 6: "RGBA"}


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header chunk (the size Pillow reads there too), or None for bytes
    that do not start like a PNG: a tenth of the time Pillow takes to open one (0.5 against 10 us)."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def plain_png_chunks(data: bytes) -> tuple[str, tuple[int, int], bytes] | None:
    """(mode, (width, height), the joined image data) of a plain PNG (see the module), or None."""
    view, end, pieces = memoryview(data), len(data), []
    if not data.startswith(PNG_SIGNATURE):
        return None
    position, state = len(PNG_SIGNATURE), "header"  # header -> before data -> data -> after data -> ended
    chunks_left = MAX_CHUNKS + end // BYTES_PER_EXTRA_CHUNK
    while position < end:
        if state == "ended" or position + 12 > end:
            return None  # bytes after the end chunk, or a chunk cut short
        chunks_left -= 1
        if chunks_left < 0:  # thousands of tiny chunks: not read twice (Image.open reads them anyway)
            return None
        length, kind = struct.unpack_from(">I4s", data, position)
        body_end = position + 8 + length
        if body_end + 4 > end or zlib.crc32(view[position + 4:body_end]) != struct.unpack_from(">I", data, body_end)[0]:
            return None
        body = view[position + 8:body_end]
        if state == "header":
            if kind != b"IHDR" or length != 13:
                return None
            width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour not in PLAIN_MODES or (compression, filtering, interlace) != (0, 0, 0):
                return None
            state = "before data"
        elif kind == b"IDAT" and state in ("before data", "data"):
            pieces.append(body)
            state = "data"
        elif kind == b"IEND" and state in ("data", "after data"):
            state = "ended"
        elif kind in PIXEL_NEUTRAL_CHUNKS:
            state = "after data" if state == "data" else state
        else:
            return None
        position = body_end + 4
    if state != "ended" or width < 1 or height < 1:
        return None
    return PLAIN_MODES[colour], (width, height), b"".join(pieces)


def decode_plain_png(data: bytes, max_pixels: int) -> Image.Image | None:
    """The decoded image of a plain PNG of at most ``max_pixels`` pixels (the pixels and mode that
    ``Image.open(...).load()`` gives), or None for any other bytes, damaged image data included:
    decode those with ``Image.open``."""
    plain = plain_png_chunks(data)
    if plain is None:
        return None
    mode, size, compressed = plain
    if size[0] * size[1] > min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels):
        return None  # Image.open's path refuses it, with the reason
    try:
        return Image.frombytes(mode, size, compressed, "zip", mode)
    except Exception:  # damaged or short image data: Image.open's path words the error
        return None
