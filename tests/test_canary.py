"""Canary triggers (defense/canary.py): the pure trigger functions against hand-computed images,
the drawing's seeding and secrecy, and the poisoned batch."""

import torch

from defense.canary import (Canary, apply_blend, apply_patch, draw_canaries, implant_canaries, patch_side,
                            poison_batch)
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
