"""Fitting the feature signal inside the build: M's activations on D_fit give the class means and
the shared covariance, D_select the reference scales and the fusion's constants
(:mod:`defense.feature_signal`). D_cal is not touched, so the threshold is calibrated on the fused
score exactly as on the expert's."""

from __future__ import annotations

import torch

from defense.feature_signal import FeatureDetector, fit_feature_detector
from defense.features import ActivationTap, find_feature_layers
from defense.guard import Guard
from defense.score import GuardScores, guard_scores


@torch.inference_mode()
def activations_and_scores(guard: Guard, tap: ActivationTap, images: torch.Tensor,
                           batch_size: int = 256) -> tuple[list[torch.Tensor], GuardScores]:
    """M's pooled activations at the tap's layers (CPU, float32) and the expert's scores, for
    uint8 ``images``."""
    columns, scores = [], []
    for start in range(0, len(images), batch_size):
        logits = guard.logits(images[start:start + batch_size])
        columns.append([value.cpu() for value in tap.take()])
        scores.append(guard_scores(*logits, alpha=guard.alpha).cpu())
    return [torch.cat(layer) for layer in zip(*columns)], GuardScores.cat(scores)


def fit_guard_features(guard: Guard, fit_images: torch.Tensor, reference_images: torch.Tensor, num_classes: int,
                       signals: str, max_stages: int = 4, layers: list[str] | None = None) -> FeatureDetector:
    """The feature detector of ``guard`` (whose M, B and M' are final), fitted on ``fit_images``
    (D_fit) with M's own predictions as classes and scaled on ``reference_images`` (D_select).
    ``layers``: the layer names to read (default: :func:`find_feature_layers`)."""
    guard.set_feature_detector(None)
    if layers is None:
        example = guard.normalizer(fit_images[:2].to(guard.device))
        layers = find_feature_layers(guard.model, example, max_stages)
    if not layers:
        raise ValueError("the model has no layer the feature signal can read (no 4-D activations, no final nn.Linear)")
    tap = ActivationTap(guard.model, layers)
    try:
        fit_activations, fit_scores = activations_and_scores(guard, tap, fit_images)
        reference_activations, reference_scores = activations_and_scores(guard, tap, reference_images)
    finally:
        tap.remove()
    detector = fit_feature_detector(fit_activations, fit_scores.label, reference_activations, reference_scores.label,
                                    reference_scores.expert_score.log(), layers, num_classes, signals)
    guard.set_feature_detector(detector)
    return detector
