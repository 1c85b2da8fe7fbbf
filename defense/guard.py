"""The guard: the suspect model M, the backdoor expert B and the auxiliary model M', scored together."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from defense.preprocessing import Preprocessing
from defense.score import DEFAULT_ALPHA, GuardScores, guard_scores, rejects


@dataclass
class Guard:
    model: nn.Module
    backdoor_expert: nn.Module
    auxiliary_model: nn.Module
    preprocessing: Preprocessing
    rejection_threshold: float
    alpha: float = DEFAULT_ALPHA
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        self.normalizer = self.preprocessing.normalizer()
        self.to(self.device)

    def to(self, device: torch.device | str) -> "Guard":
        self.device = torch.device(device)
        for module in (self.model, self.backdoor_expert, self.auxiliary_model, self.normalizer):
            module.to(self.device).eval()
        return self

    @torch.inference_mode()
    def logits(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = self.normalizer(images_uint8.to(self.device, non_blocking=True))
        return self.model(inputs), self.backdoor_expert(inputs), self.auxiliary_model(inputs)

    @torch.inference_mode()
    def score_batch(self, images_uint8: torch.Tensor) -> GuardScores:
        """Scores of one batch of (N, 3, H, W) uint8 images, as CPU tensors."""
        return guard_scores(*self.logits(images_uint8), alpha=self.alpha).cpu()

    def score(self, images_uint8: torch.Tensor, batch_size: int = 256) -> GuardScores:
        """Scores of any number of images, in batches."""
        parts = [self.score_batch(images_uint8[i:i + batch_size]) for i in range(0, len(images_uint8), batch_size)]
        return GuardScores.cat(parts)

    def rejects(self, scores: torch.Tensor) -> torch.Tensor:
        """Which scores this guard rejects (:func:`defense.score.rejects` at its threshold)."""
        return rejects(scores, self.rejection_threshold)
