"""The guard: the suspect model M, the backdoor expert B and the auxiliary model M', scored together,
with the optional feature signal read from M's hidden activations in the same forward
(:mod:`defense.feature_signal`)."""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.nn as nn

from defense.feature_signal import FeatureDetector
from defense.features import ActivationTap
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
    feature_detector: FeatureDetector | None = None

    def __post_init__(self):
        self.normalizer = self.preprocessing.normalizer()
        self.tap: ActivationTap | None = None
        self.set_feature_detector(self.feature_detector)
        self.to(self.device)

    def set_feature_detector(self, detector: FeatureDetector | None) -> None:
        """Read the feature signal from M's forward (``None``: the expert's score alone)."""
        if self.tap is not None:
            self.tap.remove()
        self.feature_detector = detector
        self.tap = ActivationTap(self.model, detector.layers) if detector is not None else None
        if detector is not None:
            detector.to(self.device)

    def to(self, device: torch.device | str) -> "Guard":
        self.device = torch.device(device)
        for module in (self.model, self.backdoor_expert, self.auxiliary_model, self.normalizer, self.feature_detector):
            if module is not None:
                module.to(self.device).eval()
        return self

    @torch.inference_mode()
    def logits(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = self.normalizer(images_uint8.to(self.device, non_blocking=True))
        return self.model(inputs), self.backdoor_expert(inputs), self.auxiliary_model(inputs)

    def activations(self) -> list[torch.Tensor]:
        """The feature layers' pooled activations of M's latest forward (empty without the signal)."""
        return self.tap.take() if self.tap is not None else []

    def scores_from(self, model_logits: torch.Tensor, expert_logits: torch.Tensor, auxiliary_logits: torch.Tensor,
                    activations: list[torch.Tensor] | tuple = ()) -> GuardScores:
        """The guard's numbers from the three models' logits and, with the feature signal, M's
        activations at its layers (on the guard's device; CPU tensors out)."""
        scores = guard_scores(model_logits, expert_logits, auxiliary_logits, alpha=self.alpha)
        detector = self.feature_detector
        if detector is None:
            return scores.cpu()
        expert_log = scores.expert_score.log()
        feature_log = detector.feature_log_score(detector.feature_anomaly(list(activations), scores.label))
        decision = detector.decision_log_score(expert_log, feature_log).exp()
        decision = torch.where(torch.isfinite(scores.score), decision, math.nan)  # a broken M or B output is no pass
        scores.score, scores.feature_score = decision, feature_log.exp()
        return scores.cpu()

    @torch.inference_mode()
    def score_batch(self, images_uint8: torch.Tensor) -> GuardScores:
        """Scores of one batch of (N, 3, H, W) uint8 images, as CPU tensors."""
        logits = self.logits(images_uint8)
        return self.scores_from(*logits, self.activations())

    def score(self, images_uint8: torch.Tensor, batch_size: int = 256) -> GuardScores:
        """Scores of any number of images, in batches."""
        parts = [self.score_batch(images_uint8[i:i + batch_size]) for i in range(0, len(images_uint8), batch_size)]
        return GuardScores.cat(parts)

    def rejects(self, scores: torch.Tensor) -> torch.Tensor:
        """Which scores this guard rejects (:func:`defense.score.rejects` at its threshold)."""
        return rejects(scores, self.rejection_threshold)
