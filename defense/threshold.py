"""Calibrating the rejection threshold tau on held-out clean scores (D_cal).

Inputs are rejected when score < tau. With tau set to the k-th smallest of n calibration scores,
the fraction of fresh clean inputs rejected is U_(k) ~ Beta(k, n + 1 - k) (exchangeable,
continuous scores): its mean is k / (n + 1). Two rules choose k:

- ``conformal``: k = floor(fpr * (n + 1)), so the *expected* false-positive rate is <= fpr;
- ``ucb`` (default): the largest k with P(U_(k) > fpr) <= delta, so the realized rate exceeds the
  target with probability at most delta. P(U_(k) <= fpr) = P(Binomial(n, fpr) >= k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from scipy.stats import binom

ThresholdRule = Literal["conformal", "ucb"]


def conformal_rank(n: int, fpr: float) -> int:
    """k = floor(fpr * (n + 1)); 0 means no threshold can promise this FPR with n scores."""
    return math.floor(fpr * (n + 1) + 1e-9)


def ucb_rank(n: int, fpr: float, delta: float) -> int:
    """Largest k with P(Binomial(n, fpr) >= k) >= 1 - delta (0 when even k = 1 fails)."""
    k = 0
    while k < n and binom.sf(k, n, fpr) >= 1.0 - delta:  # sf(k) = P(X >= k + 1)
        k += 1
    return k


@dataclass
class Threshold:
    tau: float
    rule: str
    target_fpr: float
    delta: float | None
    n: int
    k: int
    calibration_fpr: float  # realized on D_cal: fraction of calibration scores below tau
    expected_fpr: float  # k / (n + 1), the mean rate on fresh clean data
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_threshold(
    calibration_scores: torch.Tensor, fpr: float = 0.01, rule: ThresholdRule = "ucb", delta: float = 0.1
) -> Threshold:
    scores = calibration_scores.detach().double().flatten().cpu()
    if not torch.isfinite(scores).all():
        raise ValueError("calibration scores must be finite")
    n = scores.numel()
    if n == 0:
        raise ValueError("no calibration scores")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    ordered = scores.sort().values
    warning = None
    k = conformal_rank(n, fpr) if rule == "conformal" else ucb_rank(n, fpr, delta)
    if k == 0 and rule == "ucb" and conformal_rank(n, fpr) > 0:
        k = conformal_rank(n, fpr)
        warning = (
            f"{n} calibration images are too few to bound the FPR at {fpr:g} with confidence "
            f"{1 - delta:g}; used the conformal quantile (expected FPR <= target) instead"
        )
        rule = "conformal"
    if k == 0:
        k = 1
        warning = (
            f"{n} calibration images are too few for a target FPR of {fpr:g} (need at least "
            f"{math.ceil(1 / fpr) - 1}); tau is the smallest calibration score, so the expected "
            f"FPR is {1 / (n + 1):.3g}: add clean images or raise --fpr"
        )
    tau = float(ordered[k - 1])
    realized = float((scores < tau).double().mean())
    return Threshold(
        tau=tau, rule=rule, target_fpr=fpr, delta=delta if rule == "ucb" else None, n=n, k=k,
        calibration_fpr=realized, expected_fpr=k / (n + 1), warning=warning,
    )
