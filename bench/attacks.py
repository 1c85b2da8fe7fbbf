"""Backdoor attacks on uint8 image batches, in a registry: ``ATTACKS[name](...)``.

Each attack poisons a training set (``poison``) and triggers test images (``apply``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ATTACKS: dict[str, type] = {}


def register_attack(cls):
    ATTACKS[cls.name] = cls
    return cls


@dataclass
class Attack:
    target_class: int = 0
    poison_rate: float = 0.01
    name = "attack"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def poison(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0):
        """Poisoned copy of a training set and the mask of poisoned samples (all-to-one, dirty label)."""
        generator = torch.Generator().manual_seed(seed)
        candidates = (labels != self.target_class).nonzero().flatten()
        count = int(round(self.poison_rate * len(labels)))
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        images, labels = images.clone(), labels.clone()
        images[chosen] = self.apply(images[chosen])
        labels[chosen] = self.target_class
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[chosen] = True
        return images, labels, mask


@register_attack
@dataclass
class BadNet(Attack):
    """A fixed 3x3 black-and-white checkerboard patch in the bottom-right corner (Gu et al., 2017)."""

    name = "badnet"
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
class Blend(Attack):
    """Blend a fixed random-noise pattern over the whole image (Chen et al., 2017), opacity alpha."""

    name = "blend"
    alpha: float = 0.2
    pattern_seed: int = 1234

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.pattern_seed)
        pattern = torch.randint(0, 256, images.shape[1:], generator=generator, dtype=torch.uint8).float()
        mixed = (1 - self.alpha) * images.float() + self.alpha * pattern
        return mixed.round().clamp(0, 255).to(torch.uint8)
