"""The tests behind the guard's alert rules (docker/prometheus/rules/badexpert.yml), in Python.

The rules compute them in PromQL; this module is the same arithmetic for the bench
(bench/detection_delay.py simulates streams through it) and for the unit tests, and
tests/test_deploy.py checks that the rules carry these constants.

- FPR budget: a bundle promises that clean traffic like its calibration images is rejected at a rate
  inside its realized-FPR range [low, high] (manifest ``threshold.fpr_range``). Over a window of n
  images with r rejected, the rate is *above* the range when r exceeds the one-sided ``Z`` upper
  limit of Binomial(n, high) (normal approximation), *below* it when r is under the lower limit of
  Binomial(n, low); either only once ``MIN_EXPECTED_REJECTIONS`` rejections are expected at that
  bound, so that the approximation holds and a handful of images cannot decide.
- Concentration: of the r flagged inputs of a window, class c holds r_c. Clean rejections spread over
  the classes about as accepted traffic does (share a_c); a targeted attack piles them on one class.
  The alert needs ``MIN_FLAGGED`` flagged inputs, most of them (> ``MAJORITY``) on class c, and r_c
  above the ``Z`` upper limit of Binomial(r, a_c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z = 3.09  # one-sided normal quantile of 0.999: a window of clean traffic crosses a limit once in ~1,000
MIN_EXPECTED_REJECTIONS = 10  # rejections expected at the band's bound before the band test counts
MIN_FLAGGED = 20  # flagged inputs in a window before the concentration test counts
MAJORITY = 0.5  # "one class holds most flagged inputs"
BOUNDS = ("target", "low", "expected", "high")


@dataclass(frozen=True)
class FprBand:
    """What a bundle promises of its rejection rate on clean traffic."""

    target: float
    low: float
    expected: float
    high: float

    @classmethod
    def from_manifest(cls, manifest) -> "FprBand | None":
        """From the manifest's threshold record (``badexpert build`` and ``calibrate`` write it); None when
        it has no finite range (bundles assembled by hand)."""
        threshold = manifest.threshold or {}
        low, high = (threshold.get("fpr_range") or [math.nan, math.nan])[:2]
        expected = threshold.get("expected_fpr", math.nan)
        values = [float(manifest.target_fpr), float(low), float(expected), float(high)]
        if not all(math.isfinite(v) for v in values) or not values[1] <= values[2] <= values[3]:
            return None
        return cls(*values)

    def as_dict(self) -> dict[str, float]:
        return {bound: getattr(self, bound) for bound in BOUNDS}


def upper_limit(images: float, rate: float) -> float:
    """Most rejections of ``images`` at ``rate`` that clean traffic reaches (one-sided, ``Z``)."""
    return images * rate + Z * math.sqrt(images * rate * (1 - rate))


def lower_limit(images: float, rate: float) -> float:
    return images * rate - Z * math.sqrt(images * rate * (1 - rate))


def above_band(rejected: float, images: float, high: float) -> bool:
    return images * high >= MIN_EXPECTED_REJECTIONS and rejected > upper_limit(images, high)


def below_band(rejected: float, images: float, low: float) -> bool:
    return images * low >= MIN_EXPECTED_REJECTIONS and rejected < lower_limit(images, low)


def concentrated(class_flagged: float, flagged: float, accepted_share: float) -> bool:
    """One class's flagged inputs against its share of accepted traffic."""
    return (flagged >= MIN_FLAGGED and class_flagged > MAJORITY * flagged
            and class_flagged > upper_limit(flagged, accepted_share))
