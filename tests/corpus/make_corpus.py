"""Writes the corpus of bad images and bodies in this folder, and cases.json: for each file, how it
is sent and the status and error code docs/serving.md documents for it. The files are checked in;
run this again only to change the corpus: python tests/corpus/make_corpus.py"""

import io
import json
import struct
import zlib
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent


def png(width=16, height=16, colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb is refused from this alone)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif_bomb() -> bytes:
    """A 1x1 GIF whose screen and image descriptors were edited to claim 65535 x 65535 pixels."""
    data = bytearray(encoded(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    descriptor = data.index(b",", 13)
    data[descriptor + 5:descriptor + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def multipart(parts: list[tuple[str, bytes]], boundary="corpus", close=True) -> bytes:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x"\r\n\r\n'.encode()
                    + data + b"\r\n" for name, data in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


def main() -> None:
    good = png()
    small = Image.new("RGB", (16, 16), (10, 120, 30))
    images = {  # sent as the one multipart part named 'file'
        "ok.png": (good, 200, None),
        "empty.png": (b"", 422, "undecodable_image"),
        "text.png": (b"this is not an image\n", 422, "undecodable_image"),
        "truncated.png": (good[: len(good) // 2], 422, "undecodable_image"),
        "header-only.jpg": (encoded(small, "JPEG")[:200], 422, "undecodable_image"),
        "not-allowed.tif": (encoded(small, "TIFF"), 422, "undecodable_image"),
        "not-allowed.eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n", 422, "undecodable_image"),
        "not-allowed.ico": (encoded(small, "ICO"), 422, "undecodable_image"),
        "bomb-100M-pixels.png": (png_header_only(10_000, 10_000), 413, "image_too_large"),
        "bomb-65535x65535.gif": (gif_bomb(), 413, "image_too_large"),
        "ok.gif": (encoded(small.convert("P"), "GIF"), 200, None),
        "ok.webp": (encoded(small, "WEBP"), 200, None),
        "ok.bmp": (encoded(small, "BMP"), 200, None),
    }
    bodies = {  # sent as the whole body, with this content type
        "malformed.json": (b'{"images": [', "application/json", 422, "malformed_json"),
        "empty-object.json": (b"{}", "application/json", 422, "malformed_json"),
        "images-not-a-list.json": (b'{"images": "abc"}', "application/json", 422, "malformed_json"),
        "bad-base64.json": (b'{"images": ["%%%not base64%%%"]}', "application/json", 422, "malformed_base64"),
        "no-images.json": (b'{"images": []}', "application/json", 400, "no_image"),
        "nan.json": (b'{"images": NaN}', "application/json", 422, "malformed_json"),
        "no-boundary.multipart": (multipart([("file", good)]), "multipart/form-data", 422, "malformed_body"),
        "no-file-part.multipart": (multipart([("other", good)]), "multipart/form-data; boundary=corpus", 400, "no_image"),
        "unclosed.multipart": (multipart([("junk", b"x")], close=False), "multipart/form-data; boundary=corpus",
                               422, "malformed_body"),
        "100-parts.multipart": (multipart([("junk", b"x")] * 100 + [("file", good)]),
                                "multipart/form-data; boundary=corpus", 413, "too_many_parts"),
        "plain.txt": (b"hello", "text/plain", 415, "unsupported_media_type"),
    }
    cases = []
    for name, (data, status, error) in images.items():
        (HERE / name).write_bytes(data)
        cases.append({"file": name, "send": "multipart_file", "status": status, "error": error})
    for name, (data, content_type, status, error) in bodies.items():
        (HERE / name).write_bytes(data)
        cases.append({"file": name, "send": "body", "content_type": content_type, "status": status, "error": error})
    (HERE / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")


if __name__ == "__main__":
    main()
