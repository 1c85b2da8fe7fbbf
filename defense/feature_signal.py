"""The feature signal: how far an input's hidden activations in M lie from the clean images of
the class M gives it, and how that signal and the expert's score become one decision.

Per layer l (layers chosen by :func:`defense.features.find_feature_layers`), with f_l(x) the
pooled activation and y_hat = argmax M(x):

    d_l(x) = (f_l(x) - mu_{l, y_hat})^T  P_l  (f_l(x) - mu_{l, y_hat})     (class-conditional Mahalanobis)

mu_{l, c} are the class means of D_fit's activations (grouped by M's own predictions, so no labels
are needed and the grouping is the one used at inference) and P_l the inverse of their shared
covariance, shrunk by Ledoit-Wolf (a few hundred images for up to thousands of dimensions). P_l is
stored as its Cholesky factor W_l (P_l = W_l W_l^T), so d_l = ||(f - mu) W_l||^2.

Each layer's log-distance is put on a common scale by *reference statistics from D_select* (images
neither fitted on nor used for the threshold): z_l = (log d_l - median) / (q90 - median). The
feature anomaly is the mean of the z_l, standardized the same way (z_F). The expert's score s
(paper Eq. 3) is standardized by its lower tail: z_E = (median log s - log s) / (median - q10).

The rules (``signals``):
- ``expert``: score = s, the paper's score (bundles without the feature signal);
- ``features``: score = the feature signal alone, on the expert score's scale:
  s_F = exp(median log s - (median - q10) * z_F);
- ``fused``: score = min(s, s_F), i.e. an input is as suspect as the more suspect of the two
  signals (a max of the two anomalies, each in its own clean units). Where the feature signal is
  the less suspect one, the fused score is exactly the expert's score.

Everything here is fixed before calibration (fitted on D_fit, scaled on D_select), so the
threshold's conformal rule on D_cal holds for the fused score as it does for s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

SIGNALS = ("expert", "features", "fused")
_UPPER, _LOWER = 0.9, 0.1  # reference quantiles: the spread on the side each signal's anomalies lie
_MIN_SPREAD = 1e-6
_RIDGE = 1e-6  # added to the shrunk covariance's diagonal (relative to its mean variance)


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) float64 means of ``features`` per label; a class with no member gets the overall mean."""
    features = features.double()
    overall = features.mean(0)
    means = overall.repeat(num_classes, 1)
    for c in labels.unique().tolist():
        means[c] = features[labels == c].mean(0)
    return means


def whitening_factor(residuals: torch.Tensor) -> torch.Tensor:
    """W (D, D) float64 with W W^T = the inverse of the Ledoit-Wolf shrunk covariance of
    ``residuals`` (N, D), already centered per class."""
    from sklearn.covariance import LedoitWolf

    data = residuals.double().numpy()
    covariance = torch.from_numpy(LedoitWolf(assume_centered=True).fit(data).covariance_)
    scale = float(covariance.diagonal().mean().clamp_min(1e-12))
    covariance = covariance + _RIDGE * scale * torch.eye(len(covariance), dtype=torch.float64)
    precision = torch.linalg.inv(covariance)
    precision = (precision + precision.T) / 2
    return torch.linalg.cholesky(precision)


def mahalanobis(features: torch.Tensor, labels: torch.Tensor, means: torch.Tensor,
                whitening: torch.Tensor) -> torch.Tensor:
    """(N,) float64 squared Mahalanobis distance of each row to the mean of its label."""
    return ((features.double() - means[labels]) @ whitening).pow(2).sum(1)


def reference_scale(values: torch.Tensor, upper: bool) -> tuple[float, float]:
    """(center, spread): the median and its distance to the 90th (``upper``) or 10th percentile,
    the side on which anomalies lie. Non-finite values are ignored."""
    values = values.double()
    values = values[torch.isfinite(values)]
    if len(values) < 2:
        raise ValueError("at least two finite reference values are needed")
    center = float(torch.quantile(values, 0.5))
    tail = float(torch.quantile(values, _UPPER if upper else _LOWER))
    return center, max(abs(tail - center), _MIN_SPREAD)


@dataclass
class FeatureFit:
    """What :func:`fit_feature_detector` learned: per-layer class means and whitening factors."""

    means: list[torch.Tensor]
    whitening: list[torch.Tensor]


def fit_layers(activations: list[torch.Tensor], labels: torch.Tensor, num_classes: int) -> FeatureFit:
    """Class means and shared whitening per layer, from D_fit's activations and M's labels."""
    means, whitening = [], []
    for features in activations:
        layer_means = class_means(features, labels, num_classes)
        means.append(layer_means)
        whitening.append(whitening_factor(features.double() - layer_means[labels]))
    return FeatureFit(means, whitening)


class FeatureDetector(nn.Module):
    """The feature signal and the fusion rule, as buffers, so that it moves to the guard's device
    and traces into the jit engine with the three models."""

    def __init__(self, layers: list[str], means: list[torch.Tensor], whitening: list[torch.Tensor],
                 layer_center: torch.Tensor, layer_spread: torch.Tensor, normalizer: torch.Tensor, signals: str = "fused"):
        super().__init__()
        if signals not in SIGNALS:
            raise ValueError(f"signals {signals!r}: choose from {', '.join(SIGNALS)}")
        if not (len(layers) == len(means) == len(whitening) == len(layer_center) == len(layer_spread)) or not layers:
            raise ValueError("the feature signal needs, for each of its layers, means, whitening, center and spread")
        for index, (layer_means, factor) in enumerate(zip(means, whitening)):
            if layer_means.dim() != 2 or factor.shape != (layer_means.shape[1], layer_means.shape[1]):
                raise ValueError(f"feature layer {layers[index]!r}: means {tuple(layer_means.shape)} and whitening "
                                 f"{tuple(factor.shape)} do not fit together")
            if not (torch.isfinite(layer_means).all() and torch.isfinite(factor).all()):
                raise ValueError(f"feature layer {layers[index]!r}: non-finite statistics")
        if normalizer.shape != (4,) or not torch.isfinite(normalizer).all() or (normalizer[[1, 3]] <= 0).any():
            raise ValueError("the fusion's reference statistics must be 4 finite numbers with positive spreads")
        if not (torch.isfinite(layer_center).all() and torch.isfinite(layer_spread).all() and (layer_spread > 0).all()):
            raise ValueError("the feature layers' reference statistics must be finite with positive spreads")
        self.layers, self.signals = list(layers), signals
        for index, (layer_means, factor) in enumerate(zip(means, whitening)):
            # contiguous: the same memory layout as after a save and load, so the same rounding
            self.register_buffer(f"means_{index}", layer_means.double().contiguous())
            self.register_buffer(f"whitening_{index}", factor.double().contiguous())
        self.register_buffer("layer_center", layer_center.double().contiguous())
        self.register_buffer("layer_spread", layer_spread.double().contiguous())
        # feature center, feature spread (upper tail), expert center, expert spread (lower tail), all log-scale
        self.register_buffer("normalizer", normalizer.double().contiguous())

    @property
    def num_classes(self) -> int:
        return int(self.means_0.shape[0])

    def layer_log_distances(self, activations: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(N, L) float64: log of each layer's squared Mahalanobis distance to class ``labels``."""
        columns = []
        for index, features in enumerate(activations):
            distance = mahalanobis(features, labels, getattr(self, f"means_{index}"), getattr(self, f"whitening_{index}"))
            columns.append(distance.clamp_min(1e-300).log())
        return torch.stack(columns, dim=1)

    def raw_anomaly(self, activations: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(N,) the mean over layers of the standardized log-distances (before the last scaling)."""
        return ((self.layer_log_distances(activations, labels) - self.layer_center) / self.layer_spread).mean(1)

    def feature_anomaly(self, activations: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """(N,) z_F: large means far from the clean images of the predicted class."""
        return (self.raw_anomaly(activations, labels) - self.normalizer[0]) / self.normalizer[1]

    def feature_log_score(self, anomaly: torch.Tensor) -> torch.Tensor:
        """The feature signal on the log scale of the expert's score: log s_F."""
        return self.normalizer[2] - self.normalizer[3] * anomaly

    def decision_log_score(self, expert_log_score: torch.Tensor, feature_log_score: torch.Tensor) -> torch.Tensor:
        """The score the threshold applies to, by the rule ``signals``."""
        if self.signals == "expert":
            return expert_log_score
        if self.signals == "features":
            return feature_log_score
        return torch.minimum(expert_log_score, feature_log_score)

    # ----- storage ----------------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The statistics as a flat dict for safetensors (everything but the names and the rule)."""
        return {name: buffer.detach().cpu().contiguous() for name, buffer in self.named_buffers()}

    @classmethod
    def from_tensors(cls, layers: list[str], signals: str, tensors: dict[str, torch.Tensor]) -> "FeatureDetector":
        """The detector from :meth:`tensors`' output and the manifest's layer names and rule;
        ``ValueError`` when they do not fit together."""
        expected = {f"{kind}_{i}" for i in range(len(layers)) for kind in ("means", "whitening")}
        expected |= {"layer_center", "layer_spread", "normalizer"}
        if set(tensors) != expected:
            raise ValueError(f"the feature statistics hold {sorted(set(tensors) ^ expected)[:3]} unexpectedly "
                             f"for {len(layers)} layers")
        return cls(layers, [tensors[f"means_{i}"] for i in range(len(layers))],
                   [tensors[f"whitening_{i}"] for i in range(len(layers))], tensors["layer_center"],
                   tensors["layer_spread"], tensors["normalizer"], signals)


def fit_feature_detector(fit_activations: list[torch.Tensor], fit_labels: torch.Tensor,
                         reference_activations: list[torch.Tensor], reference_labels: torch.Tensor,
                         reference_expert_log_scores: torch.Tensor, layers: list[str], num_classes: int,
                         signals: str = "fused") -> FeatureDetector:
    """The feature detector: statistics from D_fit (activations and M's labels), reference scales
    from D_select (activations, M's labels and the expert's log scores there)."""
    fitted = fit_layers(fit_activations, fit_labels, num_classes)
    staging = FeatureDetector(layers, fitted.means, fitted.whitening, torch.zeros(len(layers)),
                              torch.ones(len(layers)), torch.tensor([0.0, 1.0, 0.0, 1.0]), signals)
    distances = staging.layer_log_distances(reference_activations, reference_labels)
    centers, spreads = zip(*(reference_scale(distances[:, i], upper=True) for i in range(len(layers))))
    staging.layer_center.copy_(torch.tensor(centers, dtype=torch.float64))
    staging.layer_spread.copy_(torch.tensor(spreads, dtype=torch.float64))
    feature_center, feature_spread = reference_scale(staging.raw_anomaly(reference_activations, reference_labels), upper=True)
    expert_center, expert_spread = reference_scale(reference_expert_log_scores, upper=False)
    staging.normalizer.copy_(torch.tensor([feature_center, feature_spread, expert_center, expert_spread],
                                         dtype=torch.float64))
    return staging


def log_or_nan(values: torch.Tensor) -> torch.Tensor:
    """log of positive scores in float64 (0 gives -inf, a NaN stays NaN)."""
    values = values.double()
    return torch.where(values >= 0, values.clamp_min(0).log(), torch.full_like(values, math.nan))
