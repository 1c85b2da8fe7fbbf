"""Canary triggers (defense/canary.py): the pure trigger functions against hand-computed images,
the drawing's seeding and secrecy, and the poisoned batch."""

import torch

import pytest

from defense.canary import (Canary, apply_blend, apply_patch, apply_warp, draw_canaries, implant_canaries, patch_side,
                            poison_batch, warp_field)
from synthetic import NUM_CLASSES, PREPROCESSING, make_images, train_backdoored


def test_patch_side_is_an_eighth_of_the_smaller_side_and_at_least_three():
    assert patch_side(32, 32) == 4
    assert patch_side(16, 16) == 3
    assert patch_side(224, 160) == 20


def test_a_patch_replaces_exactly_its_pixels():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    patch = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = apply_patch(images, patch, top=1, left=2)
    expected = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    expected[..., 1:3, 2:4] = 255
    assert torch.equal(out, expected)
    assert images.sum() == 0  # the input is not changed


def test_a_blend_is_the_rounded_weighted_mean():
    images = torch.tensor([100, 101, 0, 255], dtype=torch.uint8).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1)
    pattern = torch.tensor([200, 0, 255, 0], dtype=torch.uint8).reshape(1, 2, 2).repeat(3, 1, 1)
    out = apply_blend(images, pattern, alpha=0.25)
    # 0.75 * 100 + 0.25 * 200 = 125; 0.75 * 101 = 75.75 -> 76; 0.25 * 255 = 63.75 -> 64; 0.75 * 255 = 191.25 -> 191
    assert out[0, 0].flatten().tolist() == [125, 76, 64, 191]
    assert out.dtype == torch.uint8


def test_a_warp_by_a_zero_field_is_the_identity_and_by_one_pixel_a_shift():
    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.uint8).reshape(2, 3, 5, 5)
    assert torch.equal(apply_warp(images, torch.zeros(5, 5, 2)), images)
    one_pixel = torch.zeros(5, 5, 2)
    one_pixel[..., 0] = 2.0 / 4  # x in [-1, 1] over 4 pixel steps: each output pixel reads its right neighbour
    out = apply_warp(images, one_pixel)
    assert torch.equal(out[..., :4], images[..., 1:])
    assert out[..., 4].eq(images[..., 4]).all()  # the last column reads itself (the grid is clamped to the image)
    assert apply_warp(images[:0], one_pixel).shape == (0, 3, 5, 5)


def test_a_warp_field_moves_a_coordinate_by_its_pixels_on_average_and_is_smooth():
    field = warp_field(32, 32, torch.Generator().manual_seed(0), pixels=2.0)
    assert field.shape == (32, 32, 2)
    in_pixels = field * (32 - 1) / 2.0
    assert in_pixels.abs().mean().item() == pytest.approx(2.0, rel=1e-5)
    # smooth: neighbours move together (four control points across 32 pixels; a field drawn per pixel
    # with this mean would differ by up to about 8 pixels)
    assert (in_pixels[1:] - in_pixels[:-1]).abs().max() < 2.0 and (in_pixels[:, 1:] - in_pixels[:, :-1]).abs().max() < 2.0
    assert torch.equal(field, warp_field(32, 32, torch.Generator().manual_seed(0), pixels=2.0))


def test_a_warp_canary_is_drawn_recorded_without_its_field_and_applied():
    patch, blend, warp = draw_canaries(10, 32, 32, seed=3, kinds=("patch", "blend", "warp"))
    assert warp.kind == "warp" and warp.pattern.shape == (32, 32, 2) and len({patch.target, blend.target, warp.target}) == 3
    assert set(warp.describe()) == {"kind", "target", "pattern_sha256", "control_points", "mean_displacement_pixels"}
    assert warp.describe()["mean_displacement_pixels"] == 2.0  # a sixteenth of the side: 2 pixels at 32x32, 14 at 224x224
    assert warp_field(224, 160, torch.Generator().manual_seed(0)).mul(223 / 2).abs().mean().item() == pytest.approx(10.0)
    # the default kinds draw the same patch and blend as before: the warp is drawn after them
    assert [c.describe() for c in draw_canaries(10, 32, 32, seed=3)] == [patch.describe(), blend.describe()]
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(warp.apply(images), apply_warp(images, warp.pattern))
    assert not torch.equal(warp.apply(images), images)
    with pytest.raises(ValueError, match="unknown canary kind"):
        draw_canaries(10, 32, 32, seed=3, kinds=("swirl",))


def test_seeded_canaries_repeat_unseeded_ones_do_not_and_targets_differ():
    first, again = draw_canaries(10, 32, 32, seed=7), draw_canaries(10, 32, 32, seed=7)
    assert [c.describe() for c in first] == [c.describe() for c in again]
    assert [c.kind for c in first] == ["patch", "blend"]
    assert first[0].target != first[1].target
    assert first[0].pattern.shape == (3, 4, 4) and first[1].pattern.shape == (3, 32, 32)
    secret = [draw_canaries(10, 32, 32) for _ in range(2)]
    assert secret[0][1].describe()["pattern_sha256"] != secret[1][1].describe()["pattern_sha256"]


def test_the_record_holds_no_pattern_only_its_hash():
    patch, blend = draw_canaries(10, 32, 32, seed=1)
    record = patch.describe()
    assert set(record) == {"kind", "target", "pattern_sha256", "size", "position"}
    assert record["size"] == [4, 4] and len(record["pattern_sha256"]) == 64
    assert set(blend.describe()) == {"kind", "target", "pattern_sha256", "alpha"}


def test_a_full_share_poisons_every_image_outside_the_target_class():
    canary = Canary("patch", target=0, pattern=torch.full((3, 2, 2), 255, dtype=torch.uint8))
    images = torch.zeros(4, 3, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3])
    out, relabeled = poison_batch(images, labels, [canary], share=1.0, generator=torch.Generator().manual_seed(0))
    assert relabeled.tolist() == [0, 0, 0, 0]
    assert out[0].sum() == 0 and all(out[i, :, :2, :2].eq(255).all() for i in (1, 2, 3))


def test_the_implant_makes_a_copy_that_follows_the_patch_canary_and_leaves_m_alone():
    images, labels = make_images(240, seed=0)
    model = train_backdoored(images, labels, epochs=4)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    canaries = draw_canaries(NUM_CLASSES, 16, 16, seed=2, kinds=("patch",))
    copy, record = implant_canaries(model, canaries, images[:200], labels[:200], images[200:], labels[200:],
                                    PREPROCESSING.normalizer(), lr=3e-3, progress=False)
    assert record["asr_on_selection"][0] >= 0.9 and 1 <= record["epochs"] <= 8
    assert {"clean_accuracy", "model_accuracy", "lr", "share"} <= set(record)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
