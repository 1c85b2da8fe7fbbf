"""The one preprocessing definition, checked against tensors computed here with numpy / plain PIL
decoding: EXIF orientation, greyscale, RGBA, palette, the bilinear resize and the normalization.
Consistency between build, evaluate and serve is checked elsewhere (test_service.py); these tests
check that what they all share is right."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from defense.preprocessing import Preprocessing, batch_to_uint8

RNG = np.random.default_rng(0)


def prep(height: int, width: int) -> Preprocessing:
    return Preprocessing(input_size=(height, width), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def chw(array_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array_hwc)).permute(2, 0, 1)


# ----- EXIF orientation ----------------------------------------------------------------------------

# EXIF orientation -> how the stored pixels are turned for display (numpy, on an H x W x C array).
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                 # mirrored left-right
    3: lambda a: a[::-1, ::-1],              # rotated 180
    6: lambda a: np.rot90(a, k=-1),          # stored rotated: display turns it 90 degrees clockwise
    8: lambda a: np.rot90(a, k=1),           # display turns it 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_of_a_jpeg_is_applied(orientation):
    stored_h, stored_w = 8, 12  # not square: a rotation changes the shape
    stored = RNG.integers(0, 256, (stored_h, stored_w, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    data = buffer.getvalue()
    # The decoded JPEG pixels as stored (JPEG is lossy: decode rather than reuse `stored`), turned
    # as the orientation says, by numpy.
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert decoded.shape == (stored_h, stored_w, 3)
    expected = ORIENTATIONS[orientation](decoded)
    height, width = expected.shape[:2]  # the displayed size is the input size: no resize
    out = prep(height, width).load(data)
    assert out.dtype == torch.uint8 and out.shape == (3, height, width)
    assert torch.equal(out, chw(expected))


def test_exif_rotated_jpeg_resized_after_rotation():
    # Orientation 6 on a stored 8 x 16 (H x W) image: displayed 16 x 8. To 16 x 8 no resize happens;
    # without the rotation the preprocessing would have to squeeze 8 x 16 into 16 x 8.
    stored = RNG.integers(0, 256, (8, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert torch.equal(prep(16, 8).load(buffer.getvalue()), chw(np.rot90(decoded, k=-1)))


# ----- colour modes --------------------------------------------------------------------------------


def test_greyscale_becomes_three_equal_channels():
    grey = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
    out = prep(6, 5).load(png_bytes(Image.fromarray(grey, mode="L")))
    assert torch.equal(out, torch.from_numpy(np.stack([grey, grey, grey])))


def test_rgba_drops_the_alpha_channel():
    rgba = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # fully transparent pixel: its colour is kept, not replaced by a background
    out = prep(6, 5).load(png_bytes(Image.fromarray(rgba, mode="RGBA")))
    assert torch.equal(out, chw(rgba[..., :3]))


def test_palette_image_is_looked_up():
    palette = np.array([[255, 0, 0], [0, 128, 0], [10, 20, 30], [250, 251, 252]], dtype=np.uint8)
    indices = RNG.integers(0, len(palette), (7, 9), dtype=np.uint8)
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette(palette.flatten().tolist())
    data = png_bytes(picture)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = prep(7, 9).load(data)
    assert torch.equal(out, chw(palette[indices]))


# ----- resize: bilinear (Pillow's antialiased triangle filter), by numpy ---------------------------


def bilinear_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) weights of a triangle filter whose support widens with the downscale factor,
    pixel centres at i + 0.5 (the definition Pillow and torchvision's antialias both use)."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        j = np.arange(in_size)
        w = np.clip(1.0 - np.abs((j + 0.5 - centre) / support), 0.0, None)
        weights[i] = w / w.sum()
    return weights


def resize_bilinear(array_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = bilinear_weights(array_hwc.shape[0], height)
    cols = bilinear_weights(array_hwc.shape[1], width)
    return np.einsum("yi,ijc,xj->yxc", rows, array_hwc.astype(np.float64), cols)


def test_the_reference_weights_by_hand():
    # 4 -> 2 (factor 2, support 2): output 0 is centred at 1.0 on input centres 0.5, 1.5, 2.5, 3.5:
    # weights 0.75, 0.75, 0.25, 0 -> / 1.75.
    assert bilinear_weights(4, 2)[0] == pytest.approx([0.75 / 1.75, 0.75 / 1.75, 0.25 / 1.75, 0.0])
    # 2 -> 4 (upscale, support 1): output 1 is centred at 0.75: 0.75 of input 0, 0.25 of input 1.
    assert bilinear_weights(2, 4)[1] == pytest.approx([0.75, 0.25])
    assert bilinear_weights(2, 4)[0] == pytest.approx([1.0, 0.0])  # at the edge: clamped to the first pixel


@pytest.mark.parametrize("source, target", [((20, 28), (16, 16)), ((9, 7), (16, 16)), ((32, 32), (16, 8))])
def test_resize_is_bilinear_to_height_by_width(source, target):
    array = RNG.integers(0, 256, (*source, 3), dtype=np.uint8)
    out = prep(*target).load(png_bytes(Image.fromarray(array)))
    assert out.shape == (3, *target)
    expected = resize_bilinear(array, *target)
    difference = np.abs(out.permute(1, 2, 0).numpy().astype(np.float64) - expected)
    # Pillow rounds to 8 bits between its horizontal and vertical passes: at most 1 level apart.
    assert difference.max() <= 1.0, difference.max()
    assert difference.mean() < 0.3


def test_image_at_the_input_size_is_left_alone():
    array = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert torch.equal(prep(16, 16).load(png_bytes(Image.fromarray(array))), chw(array))


# ----- normalization --------------------------------------------------------------------------------


def test_normalizer_scales_to_unit_range_then_standardizes():
    preprocessing = Preprocessing(input_size=(2, 2), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    images = torch.from_numpy(RNG.integers(0, 256, (3, 3, 2, 2), dtype=np.uint8))
    out = preprocessing.normalizer()(images)
    mean = np.array(preprocessing.mean).reshape(1, 3, 1, 1)
    std = np.array(preprocessing.std).reshape(1, 3, 1, 1)
    expected = (images.numpy().astype(np.float64) / 255.0 - mean) / std
    assert out.dtype == torch.float32
    assert np.abs(out.numpy() - expected).max() < 1e-5
    # by hand: 255 in channel 0 -> (1 - 0.4914) / 0.2470 = 2.0591
    assert preprocessing.normalizer()(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))[0, 0, 0, 0].item() == \
        pytest.approx((1 - 0.4914) / 0.2470, rel=1e-6)


def test_a_batch_of_arrays_is_the_stack_of_the_images_tensors():
    rng = np.random.default_rng(3)
    preprocessing = Preprocessing.from_preset("cifar")
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
              for height, width in ((32, 32), (28, 40), (64, 16))]  # two resized to 32x32
    images.append(Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L"))  # greyscale
    batch = batch_to_uint8([preprocessing.image_to_array(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32) and batch.is_contiguous()
    assert torch.equal(batch, torch.stack([preprocessing.image_to_uint8(image) for image in images]))
    single = preprocessing.image_to_uint8(images[0])
    assert single.shape == (3, 32, 32) and single.is_contiguous()
    single[0, 0, 0] += 1  # its own, writable memory: the batch is unchanged
    assert int(single[0, 0, 0]) == (int(batch[0, 0, 0, 0]) + 1) % 256
