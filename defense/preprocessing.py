"""The one preprocessing definition. It is stored in the bundle, and build, evaluate and serve all
go through it: decode with Pillow, apply EXIF orientation, convert to RGB, resize to the input
size (bilinear), keep uint8 until the batch is on its device, then scale to [0, 1] and normalize.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

from defense.errors import UserError
from defense.plain_png import decode_plain_png, png_size

PRESETS: dict[str, dict] = {
    "cifar": {"input_size": (32, 32), "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
    "imagenet": {"input_size": (224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    "none": {"input_size": (32, 32), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
}

EXIF_ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads

# Generous for build-time folders; the server sets its own, stricter limit.
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """Bytes that are not a supported image, or an image over the pixel limit."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class Preprocessing:
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise UserError(f"--input-size: expected HEIGHT WIDTH (positive), got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise UserError("--mean/--std: expected three values (R G B)")
        if min(self.std) <= 0:
            raise UserError(f"--std: values must be positive, got {self.std}")

    @classmethod
    def from_preset(cls, name: str) -> "Preprocessing":
        if name not in PRESETS:
            raise UserError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(tuple(data["input_size"]), tuple(data["mean"]), tuple(data["std"]))

    def image_to_array(self, image: Image.Image) -> np.ndarray:
        """A decoded image as an (H, W, 3) uint8 array at the input size (it may be read-only)."""
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # else exif_transpose would only copy it
            image = ImageOps.exif_transpose(image)
        image = to_eight_bit(image)
        image = image if image.mode == "RGB" else image.convert("RGB")
        height, width = self.input_size
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def image_to_uint8(self, image: Image.Image) -> torch.Tensor:
        """A decoded image as a (3, H, W) uint8 tensor at the input size."""
        return batch_to_uint8([self.image_to_array(image)])[0]

    def normalizer(self) -> "Normalizer":
        return Normalizer(self.mean, self.std)

    def load(self, source: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
             formats: tuple[str, ...] | None = None) -> torch.Tensor:
        """Decode bytes or a file into a (3, H, W) uint8 tensor (``formats``: Pillow format names
        to try; None: any Pillow can open)."""
        return self.image_to_uint8(decode_image(source, max_pixels, formats))

    def load_array(self, source: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                   formats: tuple[str, ...] | None = None) -> np.ndarray:
        """:meth:`load`, as an (H, W, 3) uint8 array: a batch of them becomes one tensor in one step
        (:func:`batch_to_uint8`)."""
        return self.image_to_array(decode_image(source, max_pixels, formats))


def batch_to_uint8(arrays: list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) uint8 arrays of one size as an (N, 3, H, W) uint8 tensor, made in one copy (its own,
    writable memory); :meth:`Preprocessing.image_to_uint8` is its one-image case."""
    height, width = arrays[0].shape[:2]
    batch = np.empty((len(arrays), 3, height, width), dtype=np.uint8)
    for row, array in zip(batch, arrays):
        row[...] = array.transpose(2, 0, 1)
    return torch.from_numpy(batch)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (Pillow mode I;16, or I as older Pillow opens such PNGs) scaled to 8 bits
    (v * 255 / 65535); Pillow's own conversion would clip every value above 255 to white. An I image
    whose values all fit in 8 bits is kept as it is. Any other mode is returned unchanged."""
    if image.mode not in SIXTEEN_BIT_MODES and image.mode != "I":
        return image
    array = np.asarray(image).astype(np.float64)
    full = 255.0 if image.mode == "I" and array.max(initial=0) <= 255 else 65535.0
    return Image.fromarray(np.clip(np.rint(array * (255.0 / full)), 0, 255).astype(np.uint8), mode="L")


class Normalizer(nn.Module):
    """uint8 (N, 3, H, W) -> normalized float; mean and std are buffers, built once per device."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() - self.shift) * self.scale


def decode_image(source: bytes | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open and fully decode an image, refusing more than ``max_pixels`` before decoding. With
    ``formats``, only those Pillow plugins are tried (others never see the bytes). A plain PNG given
    as bytes goes to Pillow's decoder without its plugin machinery (:mod:`defense.plain_png`: the
    same pixels in half the time)."""
    in_memory = isinstance(source, (bytes, bytearray))
    if in_memory and (formats is None or "PNG" in formats):
        image = decode_plain_png(source, max_pixels)
        if image is not None:
            return image
    stream = io.BytesIO(source) if in_memory else open(source, "rb")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream, formats=formats)
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image of {width}x{height} pixels is over the limit of {max_pixels}", too_large=True
                    )
                image.load()
            except ImageDecodeError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
                raise ImageDecodeError(f"image too large ({error})", too_large=True)
            except Exception as error:  # Pillow raises many types for bad bytes
                allowed = f"; formats accepted: {', '.join(formats)}" if formats else ""
                raise ImageDecodeError(f"cannot decode image ({type(error).__name__}: {error}{allowed})")
        return image
    finally:
        if not in_memory:
            stream.close()


def pixels_within(images: list[bytes], limit: int, formats: tuple[str, ...] | None = None) -> bool:
    """Whether the images' headers say at most ``limit`` pixels in all. Cheap: nothing is decoded.
    False for bytes Pillow cannot open (the decode threads then give the error); a PNG's size is
    read from its header without Pillow (a damaged one then fails in its decode, as any other)."""
    total, png = 0, formats is None or "PNG" in formats
    for data in images:
        size = png_size(data) if png else None  # a PNG's header, read without Pillow's plugin machinery
        if size is not None:
            width, height = size
        else:
            try:
                with Image.open(io.BytesIO(data), formats=formats) as image:
                    width, height = image.size
            except Exception:
                return False
        total += width * height
        if total > limit:
            return False
    return True
