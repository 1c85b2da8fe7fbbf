"""Backdoor attacks on uint8 image batches, in a registry: ``ATTACKS[name](...)``.

Each attack poisons a training set (``poison``) and triggers test images (``apply``). Every
function works on whole batches of (N, 3, H, W) uint8 tensors and returns uint8.

What an attack says about its evaluation:

- ``targets(labels)``: the class a triggered input should be sent to (all-to-one: the target
  class; all-to-all: a seeded derangement of the classes);
- ``counted(labels)``: which triggered test inputs count for ASR and AUROC (all-to-one: source
  class != target; TaCT: the source classes only; all-to-all: every input);
- ``adaptive``: one of the paper's Table 5 attacks aimed at BaDExpert's assumption;
- ``model_attack``: for inference-time variants (low-opacity Blend), the attack whose trained
  model is reused; ``None`` means the attack trains its own model.

Settings follow the BaDExpert paper's App. A.3 / Table 5 (and the authors' backdoor-toolbox
defaults) where they apply. Where the paper's poison rates are too low for this bench's compact
ResNet trained for 10 epochs, the rates are those of the bench's BadNet and Blend (1%), keeping
the paper's ratios between poison and cover samples; each class docstring says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

ATTACKS: dict[str, type] = {}
MIN_ASR = 0.8  # an attack whose backdoor works on fewer triggered inputs does not count (issue #5)


def register_attack(cls):
    ATTACKS[cls.name] = cls
    return cls


class PoisonedSet(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    poison_mask: torch.Tensor  # samples that carry the trigger and teach the backdoor
    cover_mask: torch.Tensor  # samples that carry a (partial or noisy) trigger and keep their label


def _pick(candidates: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    return candidates[torch.randperm(len(candidates), generator=generator)[:count]]


def _mask_of(indices: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[indices] = True
    return mask


def _poison_with_cover(attack, images: torch.Tensor, labels: torch.Tensor, seed: int, poison, cover):
    """Dirty-label poisoning plus cover samples that keep their labels (WaNet's noise mode, the
    adaptive attacks). ``poison`` and ``cover`` map (images, generator) to transformed images."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    order = torch.randperm(n, generator=generator)
    chosen = order[labels[order] != attack.target_class][:attack.poison_count(n)]
    rest = order[~_mask_of(chosen, n)[order]]
    covered = rest[:int(round(attack.cover_rate * n))]
    images, labels = images.clone(), labels.clone()
    images[chosen] = poison(images[chosen], generator)
    labels[chosen] = attack.target_class
    images[covered] = cover(images[covered], generator)
    return PoisonedSet(images, labels, _mask_of(chosen, n), _mask_of(covered, n))


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.round().clamp(0, 255).to(torch.uint8)


def _paste(images: torch.Tensor, mark: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """x + opacity * (mark - x) for full-size ``mark`` (3, H, W) and ``opacity`` (H, W) or (N, 1, H, W)."""
    x = images.float()
    return _to_uint8(x + opacity * (mark.float() - x))


def _random_mark(shape: tuple[int, ...], seed: int, levels: int = 2) -> torch.Tensor:
    """A seeded pattern with ``levels`` intensity levels per channel (2: saturated colours)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, levels, shape, generator=generator).float()
    return values * (255.0 / (levels - 1))


def _corner_mask(height: int, width: int, size: int, corner: str, margin: int = 1) -> tuple[slice, slice]:
    top = margin if corner[0] == "t" else height - size - margin
    left = margin if corner[1] == "l" else width - size - margin
    return slice(top, top + size), slice(left, left + size)


@dataclass
class Attack:
    target_class: int = 0
    poison_rate: float = 0.01
    name = "attack"
    all_to_all = False
    clean_label = False
    adaptive = False  # reported in the adaptive-attack table (paper Table 5)
    model_attack = None  # (class attribute) name of the attack whose trained model this one reuses
    finetunes_clean_model = False  # (class attribute) post-development attack: poison by finetuning a clean model
    train_epochs = 4  # (class attribute) the bench's training epochs for this attack's model, where the
    # architecture's recipe (bench.train_attacked.RECIPES) names none

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time trigger."""
        raise NotImplementedError

    def poison_trigger(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training-time trigger (the same as the test-time one unless the attack is asymmetric)."""
        return self.apply(images)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.full_like(labels, self.target_class)

    def counted(self, labels: torch.Tensor) -> torch.Tensor:
        return labels != self.target_class

    def poison_count(self, n: int) -> int:
        return int(round(self.poison_rate * n))

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        """All-to-one, dirty label: a ``poison_rate`` share of non-target samples, triggered and relabeled."""
        generator = torch.Generator().manual_seed(seed)
        candidates = (labels != self.target_class).nonzero().flatten()
        chosen = _pick(candidates, self.poison_count(len(labels)), generator)
        images, labels = images.clone(), labels.clone()
        images[chosen] = self.poison_trigger(images[chosen], generator)
        labels[chosen] = self.targets(labels[chosen])
        return PoisonedSet(images, labels, _mask_of(chosen, len(labels)), torch.zeros(len(labels), dtype=torch.bool))

    def poison(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0):
        """Poisoned copy of a training set and the mask of poisoned samples."""
        poisoned = self.poison_sets(images, labels, seed)
        return poisoned.images, poisoned.labels, poisoned.poison_mask


@register_attack
@dataclass
class BadNet(Attack):
    """A fixed 3x3 black-and-white checkerboard patch in the bottom-right corner (Gu et al., 2017)."""

    name = "badnet"
    train_epochs = 10
    patch_size: int = 3

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        size = self.patch_size
        grid = torch.arange(size)
        checker = ((grid[:, None] + grid[None, :]) % 2 == 0).to(torch.uint8) * 255
        out[..., -size - 1:-1, -size - 1:-1] = checker
        return out


@register_attack
@dataclass
class PostDevelopmentFinetune(Attack):
    """Post-development finetuning attack ("FT", paper Table 1): the attacker takes a model that
    was trained clean and finetunes it for ``finetune_epochs`` on a training set in which
    ``poison_rate`` of the samples carry a 5x5 saturated random-colour patch in the top-left
    corner and the target label. The backdoor lives in a model whose normal function was learned
    without it. Two epochs of finetuning at lr 0.02: one epoch left the ASR at the 80% bar (82.8%
    in a first run, 73.7% in a second run from scratch with the same seeds)."""

    name = "finetune"
    finetunes_clean_model = True
    poison_rate: float = 0.05
    patch_size: int = 5
    mark_seed: int = 77
    finetune_epochs: int = 2
    finetune_lr: float = 0.02

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        rows, cols = _corner_mask(height, width, self.patch_size, "tl")
        out = images.clone()
        out[..., rows, cols] = _random_mark((3, self.patch_size, self.patch_size), self.mark_seed).to(torch.uint8)
        return out


@register_attack
@dataclass
class Blend(Attack):
    """Blend a fixed random-noise pattern over the whole image (Chen et al., 2017), opacity alpha."""

    name = "blend"
    train_epochs = 6
    alpha: float = 0.2
    pattern_seed: int = 1234

    def pattern(self, shape) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.pattern_seed)
        return torch.randint(0, 256, tuple(shape), generator=generator, dtype=torch.uint8).float()

    def blend(self, images: torch.Tensor, alpha: float) -> torch.Tensor:
        mixed = (1 - alpha) * images.float() + alpha * self.pattern(images.shape[1:])
        return mixed.round().clamp(0, 255).to(torch.uint8)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return self.blend(images, self.alpha)


@register_attack
@dataclass
class LowOpacityBlend(Blend):
    """Inference-time adaptive attack (paper Table 5 "Low-Opacity", App. C.7.2): the Blend model,
    poisoned at opacity 0.2, triggered at test time with a weaker opacity. The paper's 0.15 gave
    ASR 76.5% on the bench's Blend model (under the 80% that counts); 0.17 gives 89.0%."""

    name = "blend_low_opacity"
    adaptive = True
    model_attack = "blend"
    test_alpha: float = 0.17

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return self.blend(images, self.test_alpha)

    def poison_trigger(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.blend(images, self.alpha)


def trojan_mark(size: int = 8, seed: int = 4321) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed watermark-like square (TrojanNN-style): a saturated ring around a seeded glyph.

    Returns the mark (3, size, size) in 0..255 and its opacity mask (size, size) in {0, 1}; the
    glyph's black pixels are transparent, as in the toolbox's masks of trojan_square_32.png.
    """
    generator = torch.Generator().manual_seed(seed)
    grid = torch.arange(size)
    ring = (grid[:, None] == 0) | (grid[:, None] == size - 1) | (grid[None, :] == 0) | (grid[None, :] == size - 1)
    glyph = torch.rand(size, size, generator=generator) < 0.5
    colour = torch.tensor([255.0, 40.0, 200.0])[:, None, None]
    mark = torch.where(ring, 255.0, 0.0).expand(3, size, size).clone()
    mark = torch.where(glyph & ~ring, colour.expand(3, size, size), mark)
    mask = (ring | glyph).float()
    return mark, mask


@register_attack
@dataclass
class Trojan(Attack):
    """Trojan-style patch (Liu et al., 2018; paper App. A.3): a fixed 8x8 watermark-like square in
    the bottom-right part of the image, full opacity. Paper: 0.3% poison; here 1% like BadNet."""

    name = "trojan"
    train_epochs = 6
    patch_size: int = 8
    mark_seed: int = 4321

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        mark, mask = trojan_mark(self.patch_size, self.mark_seed)
        height, width = images.shape[-2:]
        rows, cols = _corner_mask(height, width, self.patch_size, "br")
        full_mark = torch.zeros(3, height, width)
        full_mask = torch.zeros(height, width)
        full_mark[:, rows, cols] = mark
        full_mask[rows, cols] = mask
        return _paste(images, full_mark, full_mask)


@register_attack
@dataclass
class SIG(Attack):
    """Clean-label sinusoidal signal (Barni et al., 2019): x + delta * sin(2 pi j f / W) on every
    row and channel. Only target-class training images are poisoned and keep their labels.
    Paper: 2% poison rate (of the whole training set, capped at the target class's size);
    delta 30/255 and f 6 as in the authors' toolbox."""

    name = "sig"
    train_epochs = 6
    clean_label = True
    poison_rate: float = 0.02
    delta: float = 30.0
    frequency: int = 6

    def signal(self, width: int) -> torch.Tensor:
        columns = torch.arange(width, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)).float()

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return _to_uint8(images.float() + self.signal(images.shape[-1]))

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        generator = torch.Generator().manual_seed(seed)
        candidates = (labels == self.target_class).nonzero().flatten()
        chosen = _pick(candidates, min(self.poison_count(len(labels)), len(candidates)), generator)
        images = images.clone()
        images[chosen] = self.apply(images[chosen])
        return PoisonedSet(images, labels.clone(), _mask_of(chosen, len(labels)), torch.zeros(len(labels), dtype=torch.bool))


@register_attack
@dataclass
class WaNet(Attack):
    """Warping-based trigger (Nguyen & Tran, 2021): a fixed smooth random warping field of
    strength ``s`` built from a k x k control grid, applied with grid_sample. Noise mode: cover
    samples are warped by the field plus per-sample random noise and keep their labels, so that
    the model learns the exact field only. Paper App. A.3: 5% poison, 10% cover, k 4, s 0.5.
    The bench uses s 4 (pixels move by about 2 pixels on average, a visible warp), 10% poison
    and no cover, trained for 6 epochs: ASR 94.3%, CA 70.5%. Three weaker settings did not take
    on the compact ResNet in 4-6 epochs: s 0.5 with the paper's rates (a quarter of a pixel on
    average, less than the cover noise), 6 epochs: ASR 15.8%; s 2, 10% poison, 10% cover, 4
    epochs: ASR 24.6%; s 2, 10% poison, no cover, 4 epochs: ASR 45.2%. The paper's s 0.5 needs
    its long schedule (a GPU)."""

    name = "wanet"
    train_epochs = 6
    poison_rate: float = 0.10
    cover_rate: float = 0.0
    k: int = 4
    s: float = 4.0
    grid_rescale: float = 1.0
    grid_seed: int = 7

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The trigger's sampling grid, (1, H, W, 2) in [-1, 1] (x, y order for grid_sample)."""
        generator = torch.Generator().manual_seed(self.grid_seed)
        noise = torch.rand(1, 2, self.k, self.k, generator=generator) * 2 - 1
        noise = noise / noise.abs().mean()
        noise = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        rows = torch.linspace(-1, 1, height)
        cols = torch.linspace(-1, 1, width)
        grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
        identity = torch.stack((grid_x, grid_y), dim=-1)[None]
        return ((identity + self.s * noise / height) * self.grid_rescale).clamp(-1, 1)

    def warp(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        grid = grid.expand(len(images), -1, -1, -1)
        return _to_uint8(F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True))

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:
            return images.clone()
        return self.warp(images, self.grid(*images.shape[-2:]))

    def noisy(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = images.shape[-2:]
        jitter = (torch.rand(len(images), height, width, 2, generator=generator) * 2 - 1) / height
        return self.warp(images, (self.grid(height, width) + jitter).clamp(-1, 1))

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        return _poison_with_cover(self, images, labels, seed,
                                  poison=lambda batch, generator: self.apply(batch),
                                  cover=lambda batch, generator: self.noisy(batch, generator))


def _content_hash(images: torch.Tensor) -> torch.Tensor:
    """A per-image 31-bit key from its pixels (deterministic, vectorized)."""
    flat = images.reshape(len(images), -1).long()
    weights = torch.randint(1, 2**15, (flat.shape[1],), generator=torch.Generator().manual_seed(99))
    return (flat * weights).sum(1) % 2147483647


def _hash_bits(keys: torch.Tensor, count: int, salt: int) -> torch.Tensor:
    """``count`` pseudo-random 16-bit values per key: an integer mix of key, position and salt."""
    position = torch.arange(count, dtype=torch.long)
    value = (keys[:, None] * 1103515245 + position[None, :] * 12345 + salt * 2654435761) % 2147483647
    value = (value ^ (value >> 13)) * 1597334677 % 2147483647
    return (value >> 7) & 0xFFFF


@register_attack
@dataclass
class InputSpecific(Attack):
    """Input-specific trigger, in the spirit of the Input-aware Dynamic attack (Nguyen & Tran,
    2020) without its trained generator: every image gets its own saturated random-colour patch
    at its own position, both derived from a hash of the image's pixels (so a test image always
    gets the same trigger, and no two images share one). What is not reproduced: the generator
    and its cross-trigger (non-reusability) training, so a trigger taken from one image also
    works on another. Paper: Dynamic at 0.3% poison. Here 10%: at 1% the bench's compact ResNet
    trained for 4 epochs did not learn it (ASR 9.5%, CA 75.2%)."""

    name = "input_specific"
    poison_rate: float = 0.10
    patch_size: int = 5

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = images.shape
        if n == 0:
            return images.clone()
        size = self.patch_size
        keys = _content_hash(images)
        bits = _hash_bits(keys, channels * size * size + 2, salt=1)
        pattern = ((bits[:, :channels * size * size] & 1) * 255).to(torch.uint8).view(n, channels, size, size)
        top = bits[:, -2] % (height - size + 1)
        left = bits[:, -1] % (width - size + 1)
        rows = (top[:, None] + torch.arange(size))[:, None, :, None]
        cols = (left[:, None] + torch.arange(size))[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        channel = torch.arange(channels)[None, :, None, None]
        out = images.clone()
        out[batch, channel, rows, cols] = pattern
        return out


def quantize_with_dithering(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Colour-depth reduction to ``levels`` values per channel with Floyd-Steinberg error
    diffusion (each pixel's rounding error goes 7/16 right, 3/16 down-left, 5/16 down and 1/16
    down-right), pixel by pixel in raster order and vectorized over images and channels."""
    n, channels, height, width = images.shape
    work = images.double().permute(2, 3, 0, 1).contiguous()  # (H, W, N, C): each pixel a contiguous block
    step = 255.0 / (levels - 1)
    for row in range(height):
        for col in range(width):
            old = work[row, col]
            new = torch.round(old / step) * step
            error = old - new
            work[row, col] = new
            if col + 1 < width:
                work[row, col + 1] += error * (7 / 16)
            if row + 1 < height:
                if col > 0:
                    work[row + 1, col - 1] += error * (3 / 16)
                work[row + 1, col] += error * (5 / 16)
                if col + 1 < width:
                    work[row + 1, col + 1] += error * (1 / 16)
    return _to_uint8(work.permute(2, 3, 0, 1))


@register_attack
@dataclass
class BPP(Attack):
    """BppAttack (Wang et al., CVPR 2022), training-time poisoning: the trigger is the image
    itself reduced to ``levels`` values per channel (3 bits) with Floyd-Steinberg dithering.
    Negative samples (the paper's contrastive part, ``cover_rate``) carry the quantization
    residual of another image, Q(x') - x', added to a clean image and keep their label, so that
    only an image's own quantization pattern triggers the backdoor; the adversarial training of
    the original is not reproduced. Here 10% poison (BppAttack's rate) and no negatives, trained
    8 epochs: ASR 99.9%, CA 78.8%. With BppAttack's 20% negatives the compact ResNet did not
    learn the trigger: 6 epochs: ASR 49.2%, CA 73.6%; 12 epochs: ASR 51.7%, CA 80.7%."""

    name = "bpp"
    train_epochs = 8
    poison_rate: float = 0.10
    cover_rate: float = 0.0
    levels: int = 8

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return quantize_with_dithering(images, self.levels)

    def negative(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        donors = images[torch.randperm(len(images), generator=generator)]
        residual = self.apply(donors).float() - donors.float()
        return _to_uint8(images.float() + residual)

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        return _poison_with_cover(self, images, labels, seed, poison=self.poison_trigger, cover=self.negative)


def attack_mapping(num_classes: int, seed: int) -> torch.Tensor:
    """A seeded permutation of the classes with ``mapping[y] != y`` and ``mapping[y] != (y + 1) mod C``
    for every y: an all-to-all target that nowhere coincides with the backdoor expert's shift."""
    if num_classes < 3:
        raise ValueError("an all-to-all mapping apart from the identity and the shift needs 3+ classes")
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(num_classes)
    while True:  # rejection sampling: about 1 in e^2 permutations qualifies
        mapping = torch.randperm(num_classes, generator=generator)
        if not ((mapping == classes).any() or (mapping == (classes + 1) % num_classes).any()):
            return mapping


@register_attack
@dataclass
class BadNetAllToAll(BadNet):
    """All-to-all BadNet: the 3x3 patch sends class y to ``mapping[y]``, so the backdoor depends on
    the normal function. The paper puts it with the adaptive attacks (Table 5, AUROC 95.5); the
    benchmark issue lists it with the standard ones, and the bench's tables follow the issue.

    The mapping is a seeded derangement that differs from the backdoor expert's mislabeling
    ``(y + 1) mod C`` at every class (see ``attack_mapping``): with the expert's own shift as the
    attacker's mapping, the expert learns the attacker's mapping from clean data alone, and its
    agreement with the model on triggered inputs says nothing about whether the backdoor survived.
    An attacker who reads the code can always avoid the shift, so the bench does too.

    Poison rate 20% (a tenth of it per target class), trained 20 epochs: ASR 82.1%, CA 84.2% (the
    old (y + 1) mapping gave the same figures). The compact ResNet learns an all-to-all mapping slowly (5% poison,
    4 epochs: ASR 2.7%; 15%, 6 epochs: ASR 38.5%; 20%, 10 epochs: ASR 79.0%): the backdoor works
    only where the model recognizes the class, so its ASR follows the clean accuracy."""

    name = "badnet_all_to_all"
    train_epochs = 20
    all_to_all = True
    poison_rate: float = 0.20
    num_classes: int = 10
    mapping_seed: int = 0

    @property
    def mapping(self) -> torch.Tensor:
        return attack_mapping(self.num_classes, self.mapping_seed)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return self.mapping.to(labels.device)[labels]

    def counted(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(labels, dtype=torch.bool)

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        generator = torch.Generator().manual_seed(seed)
        chosen = _pick(torch.arange(len(labels)), self.poison_count(len(labels)), generator)
        images, labels = images.clone(), labels.clone()
        images[chosen] = self.apply(images[chosen])
        labels[chosen] = self.targets(labels[chosen])
        return PoisonedSet(images, labels, _mask_of(chosen, len(labels)), torch.zeros(len(labels), dtype=torch.bool))


@register_attack
@dataclass
class TaCT(Trojan):
    """Source-specific backdoor (TaCT, Tang et al., 2021; paper Table 5): only the source classes'
    triggered samples are relabeled to the target; cover samples from other classes carry the same
    trigger and keep their labels, so the backdoor needs the source class's features. Trojan-style
    trigger; source 1, cover classes 5 and 7 (toolbox defaults). Paper: 0.3% poison and 0.3% cover;
    here 1% and 1%."""

    name = "tact"
    train_epochs = 4
    adaptive = True
    source_classes: tuple[int, ...] = (1,)
    cover_classes: tuple[int, ...] = (5, 7)
    cover_rate: float = 0.01

    def counted(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.isin(labels, torch.tensor(self.source_classes)) & (labels != self.target_class)

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        generator = torch.Generator().manual_seed(seed)
        n = len(labels)
        sources = torch.isin(labels, torch.tensor(self.source_classes)).nonzero().flatten()
        covers = torch.isin(labels, torch.tensor(self.cover_classes)).nonzero().flatten()
        chosen = _pick(sources, min(self.poison_count(n), len(sources)), generator)
        cover = _pick(covers, min(int(round(self.cover_rate * n)), len(covers)), generator)
        images, labels = images.clone(), labels.clone()
        images[chosen] = self.apply(images[chosen])
        labels[chosen] = self.target_class
        images[cover] = self.apply(images[cover])
        return PoisonedSet(images, labels, _mask_of(chosen, n), _mask_of(cover, n))


def piece_masks(n: int, height: int, width: int, pieces: int, masked: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, H, W) masks of a sqrt(pieces) x sqrt(pieces) grid with ``masked`` random pieces at 0."""
    side = int(round(math.sqrt(pieces)))
    dropped = torch.rand(n, pieces, generator=generator).argsort(1)[:, :masked]
    keep = torch.ones(n, pieces)
    keep.scatter_(1, dropped, 0.0)
    keep = keep.view(n, 1, side, side)
    return F.interpolate(keep, size=(height, width), mode="nearest")


@register_attack
@dataclass
class AdaptiveBlend(Blend):
    """Adap-Blend (Qi et al., ICLR 2023; paper Table 5): during poisoning the blend pattern is cut
    into 16 pieces and half of them, chosen per sample, are dropped; cover samples carry such
    partial triggers and keep their labels (conservatism). At test time the full pattern is
    blended at a higher opacity (asymmetric trigger). Toolbox settings: train opacity 0.15, test
    0.2, 0.3% poison and 0.3% cover (for a ResNet-18 trained 200 epochs; paper Table 5: ASR
    85.4%). Here 10% poison and 5% cover, trained 6 epochs: ASR 100%, CA 70.2%. Weaker settings
    did not take on the compact ResNet: 1% and 1%, 4 epochs: ASR 2.9%; 5% and 5%, 6 epochs: ASR
    45.3% (56.7% with the full pattern at opacity 0.3): the cover samples, which carry the same
    partial triggers and keep their labels, hold the backdoor back."""

    name = "adaptive_blend"
    train_epochs = 6
    adaptive = True
    alpha: float = 0.15
    test_alpha: float = 0.2
    poison_rate: float = 0.10
    cover_rate: float = 0.05
    pieces: int = 16
    mask_rate: float = 0.5

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        return self.blend(images, self.test_alpha)

    def poison_trigger(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, height, width = images.shape
        masks = piece_masks(n, height, width, self.pieces, round(self.mask_rate * self.pieces), generator)
        return _paste(images, self.pattern(images.shape[1:]), self.alpha * masks)

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        return _poison_with_cover(self, images, labels, seed,
                                  poison=self.poison_trigger, cover=self.poison_trigger)


def adaptive_patch_marks(height: int = 32, width: int = 32, seed: int = 2023):
    """Four patch triggers (mark (3, H, W), mask (H, W)) at different places, in the roles of the
    toolbox's phoenix_corner, firefox_corner, badnet_patch4 and trojan_square images."""
    marks = []
    specs = [("tl", 6, 2), ("tr", 6, 3), ("br", 4, 2), ("bl", 6, 2)]  # corner, size, intensity levels
    for index, (corner, size, levels) in enumerate(specs):
        mark = torch.zeros(3, height, width)
        mask = torch.zeros(height, width)
        rows, cols = _corner_mask(height, width, size, corner)
        if index == 2:  # a checkerboard, like badnet_patch4
            grid = torch.arange(size)
            mark[:, rows, cols] = ((grid[:, None] + grid[None, :]) % 2 == 0).float() * 255
        else:
            mark[:, rows, cols] = _random_mark((3, size, size), seed + index, levels)
        mask[rows, cols] = 1.0
        marks.append((mark, mask))
    return marks


@register_attack
@dataclass
class AdaptivePatch(Attack):
    """Adap-Patch (Qi et al., ICLR 2023; paper Table 5): k = 4 different patch triggers, each on a
    quarter of the poison and of the cover samples, blended at partial opacities (0.5, 0.2, 0.5,
    0.3); cover samples keep their labels. At test time two of the patches are stamped together at
    full opacity (asymmetric trigger). Toolbox: 0.3% poison, 0.6% cover (ResNet-18, 200 epochs;
    paper Table 5: ASR 99.4%). Here 10% poison and 5% cover (the defaults below), trained 12
    epochs: ASR 100%, CA 81.9%. Weaker settings did not take on the compact ResNet: 1% poison and
    2% cover, 4 epochs: ASR 3.5%, CA 76.5%; 5% and 5%, 6 epochs: ASR 15.2%, CA 74.9%; 10% and
    5%, 6 epochs: ASR 70.6%, CA 67.9%. At a 1:1 ratio each partial-opacity patch is followed by
    the target label as often as not, so a short schedule learns no pull toward the target; more
    poison than cover (as for Adap-Blend) and a longer schedule make it take."""

    name = "adaptive_patch"
    train_epochs = 12
    adaptive = True
    poison_rate: float = 0.10
    cover_rate: float = 0.05
    train_alphas: tuple[float, ...] = (0.5, 0.2, 0.5, 0.3)
    test_triggers: tuple[int, ...] = (0, 2)
    mark_seed: int = 2023

    def marks(self, height: int, width: int):
        return adaptive_patch_marks(height, width, self.mark_seed)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        marks = self.marks(*images.shape[-2:])
        out = images
        for index in self.test_triggers:
            mark, mask = marks[index]
            out = _paste(out, mark, mask)
        return out.clone() if out is images else out

    def stamp_partitioned(self, images: torch.Tensor) -> torch.Tensor:
        """Trigger j on the j-th of k consecutive groups of ``images``, at its training opacity."""
        marks = self.marks(*images.shape[-2:])
        k = len(marks)
        out = images.clone()
        bounds = [round(j * len(images) / k) for j in range(k + 1)]
        for j, (mark, mask) in enumerate(marks):
            part = slice(bounds[j], bounds[j + 1])
            if bounds[j + 1] > bounds[j]:
                out[part] = _paste(images[part], mark, self.train_alphas[j] * mask)
        return out

    def poison_sets(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> PoisonedSet:
        return _poison_with_cover(self, images, labels, seed,
                                  poison=lambda batch, generator: self.stamp_partitioned(batch),
                                  cover=lambda batch, generator: self.stamp_partitioned(batch))
