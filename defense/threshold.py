"""Calibrating the rejection threshold tau on clean scores that no finetuning and no rate choice saw.

Inputs are rejected unless score >= tau (:func:`defense.score.rejects`). With tau set to the k-th
smallest of n calibration scores, the fraction of fresh clean inputs rejected is U_(k) ~
Beta(k, n + 1 - k) (exchangeable, continuous scores): its mean is k / (n + 1). Two rules choose k:

- ``conformal`` (default): k = floor(fpr * (n + 1)), so the *expected* false-positive rate is
  <= fpr (it is within 1 / (n + 1) of it);
- ``ucb``: the largest k with P(U_(k) > fpr) <= delta, so the realized rate exceeds the target
  with probability at most delta. P(U_(k) <= fpr) = P(Binomial(n, fpr) >= k). The promise is paid
  for in missed backdoors: with few images it rejects far fewer clean inputs than the target
  (400 images, 1% target, delta 0.1: k = 2, an expected 0.5%).

Either way the realized rate on fresh data falls in the central ``RANGE_CONFIDENCE`` interval of
Beta(k, n + 1 - k), which :func:`calibrate_threshold` reports, and the spread shrinks only with n:
calibration needs clean images but no labels, so more of them is the cheap way to a tight range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from scipy.stats import beta, binom

from defense.errors import UserError
from defense.score import rejects

ThresholdRule = Literal["conformal", "ucb"]
THRESHOLD_RULES = ("conformal", "ucb")
DEFAULT_RULE, DEFAULT_DELTA = "conformal", 0.1
RANGE_CONFIDENCE = 0.95  # the realized-FPR range reported with every threshold
# The range is "tight enough" when its upper end is at most this multiple of the target.
TOLERATED_OVERSHOOT = 1.5


class ThresholdError(UserError):
    """The calibration scores cannot give a sound threshold (non-finite, or tau on a tie)."""


def conformal_rank(n: int, fpr: float) -> int:
    """k = floor(fpr * (n + 1)); 0 means no threshold can promise this FPR with n scores."""
    return math.floor(fpr * (n + 1) + 1e-9)


def ucb_rank(n: int, fpr: float, delta: float) -> int:
    """Largest k with P(Binomial(n, fpr) >= k) >= 1 - delta (0 when even k = 1 fails)."""
    k = 0
    while k < n and binom.sf(k, n, fpr) >= 1.0 - delta:  # sf(k) = P(X >= k + 1)
        k += 1
    return k


def realized_fpr_range(n: int, k: int, confidence: float = RANGE_CONFIDENCE) -> tuple[float, float]:
    """Central interval that the rate of fresh clean inputs rejected at the k-th of n scores falls
    in with probability ``confidence``: quantiles of Beta(k, n + 1 - k)."""
    tail = (1.0 - confidence) / 2
    return float(beta.ppf(tail, k, n + 1 - k)), float(beta.ppf(1.0 - tail, k, n + 1 - k))


def recommended_calibration_size(fpr: float, confidence: float = RANGE_CONFIDENCE,
                                 overshoot: float = TOLERATED_OVERSHOOT) -> int:
    """Smallest n (in steps of 100) whose conformal threshold keeps the upper end of the realized
    FPR range at most ``overshoot`` times the target (1% target: about 1,700 images)."""
    n = 100
    while n < 10_000_000:
        k = conformal_rank(n, fpr)
        if k > 0 and realized_fpr_range(n, k, confidence)[1] <= overshoot * fpr:
            return n
        n += 100 if n < 10_000 else 1000
    return n


@dataclass
class Threshold:
    tau: float
    rule: str
    target_fpr: float
    delta: float | None
    n: int
    k: int
    calibration_fpr: float  # realized on the calibration images: fraction of their scores rejected
    expected_fpr: float  # k / (n + 1), the mean rate on fresh clean data
    fpr_range: tuple[float, float] = (math.nan, math.nan)  # realized FPR on fresh data, RANGE_CONFIDENCE
    range_confidence: float = RANGE_CONFIDENCE
    warning: str | None = None
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["fpr_range"] = list(self.fpr_range)
        return values

    def describe(self) -> str:
        """One line for a summary: tau, the rule and what to expect of the realized FPR."""
        low, high = self.fpr_range
        return (f"tau {self.tau:.6g} ({self.rule}, k={self.k} of n={self.n}); target FPR {self.target_fpr:.2%}, "
                f"expected {self.expected_fpr:.2%}, realized on fresh clean data within "
                f"{low:.2%}-{high:.2%} ({self.range_confidence:.0%} of calibrations)")


def _advice(n: int, k: int, fpr: float, rule: str, fpr_range: tuple[float, float]) -> list[str]:
    """Plain words when n is too small for the target, and what to do about it."""
    needed = recommended_calibration_size(fpr)
    expected = k / (n + 1)
    advice = []
    if rule == "ucb" and expected < 0.75 * fpr:
        advice.append(f"{n} calibration images can only promise a {fpr:.2%} target by rejecting about {expected:.2%} "
                      f"of clean inputs, which lets more triggered inputs through: add {needed:,}+ clean images "
                      "(no labels needed) with --calibration-data or 'badexpert calibrate', or use --threshold-rule conformal")
    if fpr_range[1] > TOLERATED_OVERSHOOT * fpr:
        advice.append(f"{n} calibration images leave the realized FPR anywhere in {fpr_range[0]:.2%}-{fpr_range[1]:.2%}: "
                      f"add clean images (no labels needed; about {needed:,} in all keep it under "
                      f"{TOLERATED_OVERSHOOT * fpr:.2%}) with --calibration-data or 'badexpert calibrate'")
    return advice


def calibrate_threshold(
    calibration_scores: torch.Tensor, fpr: float = 0.01, rule: ThresholdRule = DEFAULT_RULE, delta: float = DEFAULT_DELTA
) -> Threshold:
    """tau from clean calibration scores. Raises :class:`ThresholdError` when the scores are not
    finite or tau would sit on a tie of calibration scores (then the rate below tau is not what
    the rule assumes: duplicate images, or a model that saturates)."""
    scores = calibration_scores.detach().double().flatten().cpu()
    n = scores.numel()
    if n == 0:
        raise ValueError("no calibration scores")
    non_finite = int((~torch.isfinite(scores)).sum())
    if non_finite:
        raise ThresholdError(f"{non_finite} of {n} calibration scores are not finite; the guard's models give "
                             "non-finite outputs on clean images, so no threshold is sound")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {THRESHOLD_RULES}")
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
    tied = int((ordered == tau).sum())
    if tied > 1:
        raise ThresholdError(
            f"tau = {tau:.6g} is shared by {tied} of the {n} calibration scores, so the rejected share of clean "
            "inputs is not what the threshold rule assumes; remove duplicate calibration images, or check that "
            "the model's outputs are not saturated (identical scores on different images)"
        )
    realized = float(rejects(scores, tau).double().mean())
    fpr_range = realized_fpr_range(n, k)
    return Threshold(
        tau=tau, rule=rule, target_fpr=fpr, delta=delta if rule == "ucb" else None, n=n, k=k,
        calibration_fpr=realized, expected_fpr=k / (n + 1), fpr_range=fpr_range, warning=warning,
        advice=_advice(n, k, fpr, rule, fpr_range),
    )
