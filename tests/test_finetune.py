"""defense/finetune.py's pieces: the shifted labels of Alg. 1 and the crop/flip augmentation,
checked against values worked out by hand or with numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import defense.finetune as finetune
from defense.finetune import clean_finetune, mislabeling, random_crop_flip, shifted_labels, unlearn
from defense.preprocessing import Normalizer


def test_shifted_labels_move_every_label_to_its_next_class():
    assert shifted_labels(torch.tensor([0, 1, 2, 3]), 4).tolist() == [1, 2, 3, 0]
    assert shifted_labels(torch.tensor([9, 0, 5, 9]), 10).tolist() == [0, 1, 6, 0]
    assert shifted_labels(torch.tensor([1, 0]), 2).tolist() == [0, 1]
    labels = torch.arange(100) % 7
    shifted = shifted_labels(labels, 7)
    assert not (shifted == labels).any() and shifted.dtype == labels.dtype


def test_mislabeling_shift_is_the_papers_and_derangement_is_a_seeded_permutation_without_fixed_points():
    assert mislabeling(4, "shift").tolist() == [1, 2, 3, 0]
    mappings = {tuple(mislabeling(10, "derangement", seed).tolist()) for seed in range(20)}
    for mapping in mappings:
        assert sorted(mapping) == list(range(10)) and all(mapping[c] != c for c in range(10))
    assert len(mappings) == 20  # 1,334,961 derangements of 10: twenty seeds give twenty mappings
    assert torch.equal(mislabeling(10, "derangement", 3), mislabeling(10, "derangement", 3))
    assert mislabeling(2, "derangement", 5).tolist() == [1, 0]  # the only one for two classes
    with pytest.raises(ValueError, match="unknown mislabeling"):
        mislabeling(10, "reverse")


class Linear(nn.Module):
    """A linear classifier on the flattened image: small enough to train in a few steps."""

    def __init__(self, pixels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(pixels, classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _one_image_per_class(classes: int = 3):
    # Image c is bright in channel c only: linearly separable.
    images = torch.zeros(classes, 3, 2, 2, dtype=torch.uint8)
    for c in range(classes):
        images[c, c] = 255
    return images, torch.arange(classes)


def test_unlearning_trains_towards_the_next_class():
    # Alg. 1: the expert learns y -> y + 1 mod C, so image 0 goes to class 1, 1 to 2, 2 to 0
    # (not y - 1, not a random wrong class).
    images, labels = _one_image_per_class()
    model = Linear(12, 3)
    expert = unlearn(model, images, labels, 3, Normalizer((0.5,) * 3, (0.5,) * 3), lr=0.1, epochs=30,
                     batch_size=3, progress=False)
    assert expert(Normalizer((0.5,) * 3, (0.5,) * 3)(images)).argmax(1).tolist() == [1, 2, 0]
    assert torch.equal(model.fc.weight, torch.zeros(3, 12))  # the suspect model itself is untouched


def test_unlearning_follows_the_given_wrong_label_of_each_class():
    images, labels = _one_image_per_class()
    normalizer = Normalizer((0.5,) * 3, (0.5,) * 3)
    expert = unlearn(Linear(12, 3), images, labels, 3, normalizer, lr=0.1, epochs=30, batch_size=3,
                     progress=False, wrong_label_of=torch.tensor([2, 0, 1]))
    assert expert(normalizer(images)).argmax(1).tolist() == [2, 0, 1]  # y - 1 here, not the default y + 1


def _candidates(images: np.ndarray, pad: int) -> np.ndarray:
    """Every crop/flip the augmentation may produce: (N, 2 * (2 pad + 1)^2, C, H, W), by numpy."""
    n, c, h, w = images.shape
    padded = np.pad(images.astype(np.int16), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy:dy + h, dx:dx + w]
            out += [crop, crop[..., ::-1]]
    return np.stack(out, axis=1)


@pytest.mark.parametrize("size, pad", [(8, 1), (16, 2)])
def test_crop_flip_is_a_reflect_padded_shift_of_at_most_an_eighth_and_a_fair_flip(size, pad):
    n = 300
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    out = random_crop_flip(torch.from_numpy(images), torch.Generator().manual_seed(1))
    assert out.shape == (n, 3, size, size) and out.dtype == torch.float32
    candidates = _candidates(images, pad)
    matches = (candidates == out.numpy().astype(np.int16)[:, None]).all(axis=(2, 3, 4))  # (N, candidates)
    # Random pixels: each output is exactly one of its image's candidates.
    assert (matches.sum(1) == 1).all(), "an output is not a reflect-padded crop (+ flip) of its input"
    chosen = matches.argmax(1)
    flipped, offset = chosen % 2 == 1, chosen // 2
    shifts = (2 * pad + 1) ** 2
    assert 0.4 < flipped.mean() < 0.6  # about half are flipped
    counts = np.bincount(offset, minlength=shifts)
    assert (counts > 0).all(), f"not every shift in [-{pad}, {pad}]^2 occurs: {counts}"  # the whole range is used
    assert counts.max() < 3 * n / shifts
    # The identity (no shift, no flip) is one of the outcomes, and the unshifted centre crop equals the input.
    centre = pad * (2 * pad + 1) + pad
    assert np.array_equal(candidates[:, 2 * centre], images)


def test_crop_flip_is_seeded():
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = random_crop_flip(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, random_crop_flip(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, random_crop_flip(images, torch.Generator().manual_seed(6)))


@pytest.mark.parametrize("augment", [True, False])
def test_clean_finetuning_augments_every_batch_only_when_asked(monkeypatch, augment):
    calls = []
    real = finetune.random_crop_flip

    def counting(batch, generator):
        calls.append(len(batch))
        return real(batch, generator)

    monkeypatch.setattr(finetune, "random_crop_flip", counting)
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    clean_finetune(Linear(192, 2), images, torch.arange(10) % 2, Normalizer((0.5,) * 3, (0.5,) * 3), lr=0.01,
                   epochs=2, batch_size=4, milestones=(1,), augment=augment, progress=False)
    # 10 images in batches of 4: 4 + 4 + 2 per epoch, two epochs.
    assert calls == ([4, 4, 2, 4, 4, 2] if augment else [])


def test_a_warmed_up_step_is_a_share_of_the_scheduled_rate_and_leaves_the_schedule_alone():
    weight = nn.Parameter(torch.tensor([1.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = torch.tensor([2.0])
    finetune._step_warmed_up(optimizer, 0.25)
    assert weight.item() == pytest.approx(1.0 - 0.25 * 0.1 * 2.0)  # 0.95
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_warmup_scales_the_first_epochs_steps_linearly_and_clipping_bounds_a_step(monkeypatch):
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(64) % 2
    normalizer = Normalizer((0.5,) * 3, (0.05,) * 3)  # inputs of scale ~10: large gradients
    options = dict(milestones=(5,), momentum=0.0, weight_decay=0.0, augment=False, progress=False)
    scales, real_step = [], finetune._step_warmed_up
    monkeypatch.setattr(finetune, "_step_warmed_up", lambda optimizer, scale: (scales.append(scale), real_step(optimizer, scale)))
    clean_finetune(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), images, labels, normalizer, 0.1, epochs=2,
                   batch_size=16, warmup_epochs=1, **options)
    assert scales == [0.25, 0.5, 0.75] + [1.0] * 5  # four steps an epoch: the first epoch warms up

    def moved(**clip):
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        after = clean_finetune(model, images, labels, normalizer, 1.0, epochs=1, batch_size=64, **options, **clip)
        return float((torch.cat([p.detach().flatten() for p in after.parameters()]) - before).norm())

    assert moved() > 0.5 >= moved(max_grad_norm=0.5) - 1e-6  # one SGD step at lr 1 moves by the gradient's norm


def test_a_fresh_head_redraws_the_last_linear_layer_only_and_is_seeded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    first, second = [finetune.copy.deepcopy(model) for _ in range(2)]
    finetune.reinitialize_classifier(first, seed=1)
    finetune.reinitialize_classifier(second, seed=1)
    assert finetune.classifier_layer(model) is model[4]
    assert not torch.equal(first[4].weight, model[4].weight) and torch.equal(first[4].weight, second[4].weight)
    assert torch.equal(first[0].weight, model[0].weight) and torch.equal(first[2].weight, model[2].weight)
    with pytest.raises(ValueError, match="no nn.Linear"):
        finetune.reinitialize_classifier(nn.Conv2d(3, 3, 1), seed=0)
