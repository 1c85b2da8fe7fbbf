"""defense.plain_png: a plain PNG decodes to the pixels and mode Image.open gives, through every row
filter, mode and chunk layout it takes; every other PNG, and every damaged one, goes back to
Image.open (None), which then decides as before."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from defense.plain_png import decode_plain_png, png_size
from defense.preprocessing import ImageDecodeError, Preprocessing, decode_image

RNG = np.random.default_rng(7)
CHANNELS = {0: 1, 2: 3, 6: 4}  # PNG colour type -> channels
MODES = {0: "L", 2: "RGB", 6: "RGBA"}


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
    return (left, up, up_left)[distances.index(min(distances))]


def filtered_rows(pixels: np.ndarray, filters: list[int]) -> bytes:
    """The PNG filtered scanlines of ``pixels`` (H, W, C), row y with filter type ``filters[y]`` (spec 9.2)."""
    height, width, channels = pixels.shape
    rows, out = pixels.reshape(height, width * channels).astype(int), bytearray()
    for y in range(height):
        row, above = rows[y], rows[y - 1] if y else np.zeros_like(rows[0])
        line = []
        for x in range(len(row)):
            left = row[x - channels] if x >= channels else 0
            up_left = above[x - channels] if x >= channels else 0
            predictor = [0, left, above[x], (left + above[x]) // 2, paeth(left, above[x], up_left)][filters[y]]
            line.append((row[x] - predictor) % 256)
        out += bytes([filters[y]]) + bytes(line)
    return bytes(out)


def handmade_png(pixels: np.ndarray, colour: int, filters: list[int] | None = None, idat_pieces: int = 1,
                 before: list[bytes] = (), after: list[bytes] = (), header: dict | None = None,
                 data: bytes | None = None, between: bytes = b"") -> bytes:
    """A PNG written here, byte by byte: ``before``/``after`` chunks around the image data, split into
    ``idat_pieces`` IDAT chunks (``between`` them); ``header`` overrides IHDR fields; ``data``
    replaces the compressed data."""
    height, width = pixels.shape[:2]
    fields = {"width": width, "height": height, "depth": 8, "colour": colour, "interlace": 0, **(header or {})}
    ihdr = struct.pack(">IIBBBBB", fields["width"], fields["height"], fields["depth"], fields["colour"], 0, 0,
                       fields["interlace"])
    compressed = data if data is not None else zlib.compress(filtered_rows(pixels, filters or [0] * height))
    cut = np.linspace(0, len(compressed), idat_pieces + 1).astype(int)
    idats = [chunk(b"IDAT", compressed[a:b]) for a, b in zip(cut[:-1], cut[1:])]
    chunks = [chunk(b"IHDR", ihdr), *before, between.join(idats), *after, chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def pixels(height: int, width: int, colour: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, CHANNELS[colour]), dtype=np.uint8)


def opened(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_same_as_pillow(data: bytes) -> Image.Image:
    image, expected = decode_plain_png(data, 10 ** 8), opened(data)
    assert image is not None, "a plain PNG went to Image.open"
    assert image.mode == expected.mode and image.size == expected.size
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    return image


@pytest.mark.parametrize("colour", [0, 2, 6])
@pytest.mark.parametrize("row_filter", [0, 1, 2, 3, 4])
def test_every_row_filter_and_plain_mode_decodes_to_pillows_pixels(colour, row_filter):
    picture = pixels(5, 7, colour)
    image = assert_same_as_pillow(handmade_png(picture, colour, [row_filter] * 5))
    assert image.mode == MODES[colour]
    np.testing.assert_array_equal(np.asarray(image).reshape(picture.shape), picture)


def test_mixed_filters_split_data_and_neutral_chunks():
    picture = pixels(9, 6, 2)
    neutral = [chunk(b"gAMA", struct.pack(">I", 45455)), chunk(b"sRGB", b"\x00"), chunk(b"pHYs", bytes(9))]
    data = handmade_png(picture, 2, [0, 1, 2, 3, 4, 4, 3, 2, 1], idat_pieces=4, before=neutral,
                        after=[chunk(b"tIME", bytes(7))])
    np.testing.assert_array_equal(np.asarray(assert_same_as_pillow(data)), picture)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_pngs_written_by_pillow_and_by_libpng(mode):
    picture = Image.fromarray(pixels(13, 17, {"L": 0, "RGB": 2, "RGBA": 6}[mode]).squeeze(-1) if mode == "L"
                              else pixels(13, 17, {"RGB": 2, "RGBA": 6}[mode]), mode)
    for options in ({}, {"optimize": True}, {"compress_level": 0}):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", **options)
        assert_same_as_pillow(buffer.getvalue())
    if mode != "RGBA":  # libpng through torchvision (1 or 3 channels), with its own choice of row filters
        tensor = torch.from_numpy(np.array(picture)).reshape(13, 17, -1).permute(2, 0, 1).contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its image io
            import torchvision.io
            encoded = torchvision.io.encode_png(tensor).numpy().tobytes()
        assert_same_as_pillow(encoded)


def saved(picture: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def other_pngs() -> dict[str, bytes]:
    """PNGs that are not plain, and damaged ones: each must go to Image.open."""
    rgb, plain = pixels(4, 4, 2), handmade_png(pixels(4, 4, 2), 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    compressed = zlib.compress(filtered_rows(rgb, [0] * 4))
    text = Image.new("RGB", (4, 4))
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Comment", "hello")
    bad_crc = bytearray(plain)
    bad_crc[29] ^= 1  # IHDR's CRC
    bad_data_crc = bytearray(plain)
    bad_data_crc[-13] ^= 1  # the last byte of IDAT's CRC
    return {
        "palette": saved(Image.new("P", (4, 4))),
        "16-bit": saved(Image.new("I;16", (4, 4))),
        "greyscale with alpha": saved(Image.new("LA", (4, 4))),
        "1-bit": saved(Image.new("1", (4, 4))),
        "interlaced": handmade_png(rgb, 2, header={"interlace": 1}),
        "transparency chunk": handmade_png(rgb, 2, before=[chunk(b"tRNS", bytes(6))]),
        "text chunk": saved(text, pnginfo=info),
        "EXIF chunk": saved(text, exif=exif),
        "unknown chunk": handmade_png(rgb, 2, before=[chunk(b"prVt", b"x")]),
        "bad header CRC": bytes(bad_crc),
        "bad data CRC": bytes(bad_data_crc),
        "cut short": plain[:-6],
        "bytes after the end": plain + b"\x00",
        "a chunk after the end": plain + chunk(b"gAMA", bytes(4)),
        "palette without its chunk": handmade_png(pixels(4, 4, 0), 0, header={"colour": 3}),
        "damaged image data": handmade_png(rgb, 2, data=b"not zlib at all"),
        "too little image data": handmade_png(rgb, 2, data=compressed[:len(compressed) // 2]),
        "row filter 5": handmade_png(rgb, 2, data=zlib.compress(b"\x05" + bytes(12) + (b"\x00" + bytes(12)) * 3)),
        "data split by another chunk": handmade_png(rgb, 2, idat_pieces=2, between=chunk(b"gAMA", bytes(4))),
        "thousands of empty image data chunks": plain[:33] + chunk(b"IDAT", b"") * 2000 + plain[33:],
        "no image data": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b""),
        "zero width": handmade_png(np.zeros((4, 0, 3), np.uint8), 2),
        "a JPEG": (lambda buffer: (Image.new("RGB", (4, 4)).save(buffer, format="JPEG"), buffer.getvalue())[1])(
            io.BytesIO()),
        "empty": b"",
    }


@pytest.mark.parametrize("name", list(other_pngs()))
def test_other_and_damaged_pngs_go_to_image_open(name):
    assert decode_plain_png(other_pngs()[name], 10 ** 8) is None


def test_many_chunks_are_refused_early_and_image_open_still_decodes_them():
    picture = pixels(4, 4, 2)
    data = handmade_png(picture, 2)
    many = data[:33] + chunk(b"IDAT", b"") * 2000 + data[33:]
    assert decode_plain_png(many, 10 ** 8) is None
    np.testing.assert_array_equal(np.asarray(decode_image(many)), picture)  # through Image.open, as before
    libpng_like = handmade_png(pixels(64, 64, 2), 2, idat_pieces=6)  # image data in several chunks
    assert decode_plain_png(libpng_like, 10 ** 8) is not None


def test_pixel_limits_send_the_image_to_image_open(monkeypatch):
    data = handmade_png(pixels(4, 5, 2), 2)
    assert decode_plain_png(data, 20) is not None and decode_plain_png(data, 19) is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 19)  # Pillow's own decompression-bomb limit
    assert decode_plain_png(data, 10 ** 8) is None


def test_decode_image_gives_what_image_open_gives_for_every_png():
    """Through the one preprocessing definition, the fast path changes nothing: same arrays for plain
    PNGs, the EXIF rotation still applied, damaged PNGs still refused with Pillow's reason."""
    preprocessing = Preprocessing(input_size=(4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for data in [handmade_png(pixels(4, 4, colour), colour, [4, 3, 2, 1]) for colour in (0, 2, 6)]:
        np.testing.assert_array_equal(preprocessing.load_array(data), preprocessing.image_to_array(opened(data)))
    stored = pixels(4, 4, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    rotated = preprocessing.load_array(saved(Image.fromarray(stored), exif=exif))
    np.testing.assert_array_equal(rotated, np.rot90(stored, k=-1))
    for name in ("damaged image data", "too little image data", "bad header CRC"):
        with pytest.raises(ImageDecodeError, match="cannot decode image"):
            decode_image(other_pngs()[name])
    assert png_size(other_pngs()["a JPEG"]) is None
