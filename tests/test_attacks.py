"""The bench's attacks on small synthetic uint8 batches: shapes, where triggers land, poison counts."""

from __future__ import annotations

import pytest
import torch

from bench.attacks import ATTACKS, AdaptivePatch, BadNetAllToAll, TaCT

SIZE = 32
N = 200


def batch(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(30, 220, (n, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)
    return images, torch.arange(n) % 10


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_apply_keeps_shape_and_dtype_and_changes_pixels(name):
    images, _ = batch(16)
    attack = ATTACKS[name]()
    out = attack.apply(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    assert torch.equal(images, batch(16)[0]), "apply must not modify its input"
    assert torch.equal(out, attack.apply(images)), "triggers are deterministic"
    assert attack.apply(images[:0]).shape == (0, 3, SIZE, SIZE)


@pytest.mark.parametrize("name", ["badnet", "trojan", "tact", "badnet_all_to_all"])
def test_patch_triggers_touch_only_the_bottom_right_corner(name):
    images, _ = batch(8)
    changed = (ATTACKS[name]().apply(images) != images).any(dim=1).any(dim=0)
    rows, cols = changed.nonzero(as_tuple=True)
    size = {"badnet": 3, "badnet_all_to_all": 3}.get(name, 8)
    assert rows.min() >= SIZE - size - 1 and cols.min() >= SIZE - size - 1
    assert rows.max() <= SIZE - 2 and cols.max() <= SIZE - 2  # a one-pixel margin


def test_finetune_attack_stamps_the_top_left_corner_and_starts_from_a_clean_model():
    images, _ = batch(8)
    attack = ATTACKS["finetune"]()
    changed = (attack.apply(images) != images).any(dim=1).any(dim=0)
    rows, cols = changed.nonzero(as_tuple=True)
    assert rows.min() >= 1 and cols.min() >= 1 and rows.max() <= 5 and cols.max() <= 5
    assert attack.finetunes_clean_model and not ATTACKS["badnet"].finetunes_clean_model


def test_adaptive_patch_test_trigger_is_two_corner_patches():
    images, _ = batch(8)
    changed = (AdaptivePatch().apply(images) != images).any(dim=1).any(dim=0)
    assert changed[:8, :8].any() and changed[-6:, -6:].any()
    assert not changed[8:-6, :].any() and not changed[:, 8:-6].any()


def test_sig_is_a_column_signal_and_blend_is_global():
    images = torch.full((4, 3, SIZE, SIZE), 128, dtype=torch.uint8)
    sig = ATTACKS["sig"]().apply(images).float() - 128
    assert torch.allclose(sig[:, :, 0, :], sig[:, :, 17, :])  # same on every row
    assert sig.abs().max() <= 30.5 and sig.abs().max() >= 25
    blended = ATTACKS["blend"]().apply(images)
    assert (blended != images).float().mean() > 0.9
    weak = (ATTACKS["blend_low_opacity"]().apply(images).float() - 128).abs().mean()
    assert weak < (blended.float() - 128).abs().mean()


def test_wanet_warp_is_small_and_noise_mode_differs():
    images, labels = batch()
    attack = ATTACKS["wanet"](cover_rate=0.1, s=0.5)  # the paper's noise mode (the bench's default has no cover)
    warped = attack.apply(images)
    assert (warped.float() - images.float()).abs().mean() < 60  # a geometric warp, not an overlay
    poisoned = attack.poison_sets(images, labels, seed=0)
    assert int(poisoned.poison_mask.sum()) == round(attack.poison_rate * N)
    assert int(poisoned.cover_mask.sum()) == round(attack.cover_rate * N)
    assert not (poisoned.poison_mask & poisoned.cover_mask).any()
    cover = poisoned.cover_mask
    assert torch.equal(poisoned.labels[cover], labels[cover])
    assert not torch.equal(poisoned.images[cover], attack.apply(images[cover]))


def test_input_specific_triggers_differ_between_images():
    images, _ = batch(32)
    out = ATTACKS["input_specific"]().apply(images)
    masks = (out != images).any(dim=1)  # (N, H, W)
    assert all(int(m.sum()) <= 25 for m in masks)
    positions = {tuple(m.nonzero()[0].tolist()) for m in masks}
    assert len(positions) > 20  # different places for different images


@pytest.mark.parametrize("name", sorted(n for n, cls in ATTACKS.items() if cls.model_attack is None))
def test_poison_counts_and_labels(name):
    images, labels = batch()
    attack = ATTACKS[name]()
    poisoned = attack.poison_sets(images, labels, seed=3)
    assert poisoned.images.shape == images.shape and poisoned.images.dtype == torch.uint8
    mask = poisoned.poison_mask
    expected = round(attack.poison_rate * N)
    if attack.clean_label:
        expected = min(expected, int((labels == attack.target_class).sum()))
    if isinstance(attack, TaCT):
        expected = min(expected, int(torch.isin(labels, torch.tensor(attack.source_classes)).sum()))
    assert int(mask.sum()) == expected
    assert torch.equal(poisoned.images[~mask & ~poisoned.cover_mask], images[~mask & ~poisoned.cover_mask])
    assert torch.equal(poisoned.labels[~mask], labels[~mask]), "cover and clean samples keep their labels"
    if attack.clean_label:
        assert torch.equal(poisoned.labels, labels)
        assert (labels[mask] == attack.target_class).all()
    else:
        assert torch.equal(poisoned.labels[mask], attack.targets(labels[mask]))
    again = attack.poison_sets(images, labels, seed=3)
    assert torch.equal(again.images, poisoned.images) and torch.equal(again.labels, poisoned.labels)
    legacy_images, legacy_labels, legacy_mask = attack.poison(images, labels, seed=3)
    assert torch.equal(legacy_mask, mask) and torch.equal(legacy_labels, poisoned.labels)


def test_all_to_all_targets_and_counted():
    attack = BadNetAllToAll()
    labels = torch.arange(10)
    targets = attack.targets(labels)
    assert sorted(targets.tolist()) == list(range(10))  # a permutation: every class is someone's target
    assert not (targets == labels).any()  # no class maps to itself
    assert not (targets == (labels + 1) % 10).any()  # and nowhere the backdoor expert's shift
    assert torch.equal(attack.targets(torch.tensor([3, 3, 7])), targets[[3, 3, 7]])
    assert torch.equal(BadNetAllToAll(mapping_seed=0).targets(labels), targets)  # seeded
    assert not torch.equal(BadNetAllToAll(mapping_seed=1).targets(labels), targets)
    assert attack.counted(labels).all() and attack.all_to_all


def test_tact_poisons_only_sources_and_covers_keep_labels():
    images, labels = batch(1000)
    attack = TaCT(poison_rate=0.02, cover_rate=0.02)
    poisoned = attack.poison_sets(images, labels, seed=0)
    assert (labels[poisoned.poison_mask] == 1).all()
    assert torch.isin(labels[poisoned.cover_mask], torch.tensor([5, 7])).all()
    assert int(poisoned.cover_mask.sum()) == 20
    assert torch.equal(attack.counted(labels), labels == 1)


def test_adaptive_attacks_use_weaker_partial_triggers_in_training():
    images, labels = batch()
    for name in ("adaptive_blend", "adaptive_patch"):
        attack = ATTACKS[name]()
        poisoned = attack.poison_sets(images, labels, seed=0)
        assert poisoned.cover_mask.sum() > 0 and not (poisoned.poison_mask & poisoned.cover_mask).any()
        trained = poisoned.images[poisoned.poison_mask].float() - images[poisoned.poison_mask].float()
        tested = attack.apply(images[poisoned.poison_mask]).float() - images[poisoned.poison_mask].float()
        assert trained.abs().sum() < tested.abs().sum()  # asymmetric: the test trigger is stronger


def test_dithered_quantization_lands_on_the_grid_and_keeps_the_mean():
    from bench.attacks import quantize_with_dithering

    flat = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    out = quantize_with_dithering(flat, levels=8)
    grid = torch.tensor([round(k * 255 / 7) for k in range(8)], dtype=torch.uint8)
    assert torch.isin(out, grid).all()
    # plain rounding would put every pixel at 146 (128 / 36.43 = 3.51 -> level 4); dithering mixes
    # levels 3 (109) and 4 (146) so the mean stays near 128
    assert set(out.unique().tolist()) == {109, 146}
    assert abs(out.float().mean().item() - 128) < 2
    # a 2 x 2 example by hand (step 255 / 7 = 36.43): top-left 100 -> 109.29, error -9.29; top-right
    # 100 - 4.06 = 95.94 -> 109.29, error -13.35; bottom-left 100 - 2.90 - 2.50 = 94.60 -> 109.29,
    # error -14.69; bottom-right 100 - 0.58 - 4.17 - 6.43 = 88.82 -> 2 steps = 72.86
    tiny = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)
    assert quantize_with_dithering(tiny, levels=8).flatten().tolist() == [109, 109, 109, 73]


def test_bpp_negatives_carry_another_images_residual_and_keep_labels():
    images, labels = batch()
    attack = ATTACKS["bpp"](cover_rate=0.2)  # BppAttack's negative training, off by default here
    poisoned = attack.poison_sets(images, labels, seed=0)
    cover = poisoned.cover_mask
    assert int(cover.sum()) == round(attack.cover_rate * N)
    assert torch.equal(poisoned.labels[cover], labels[cover])
    assert not torch.equal(poisoned.images[cover], attack.apply(images[cover]))
    assert (poisoned.images[cover] != images[cover]).float().mean() > 0.5
