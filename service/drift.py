"""Drift of clean traffic away from the calibration images, as a bounded-memory streaming statistic.

The bundle keeps quantiles of its calibration scores (``calibration.score_quantiles`` in the
manifest, covered by its digest). Triggered inputs score low (that is how the guard flags them), so
the part of the distribution above the calibration median is the one an attack does not reach:
there, the scores of clean traffic exchangeable with the calibration images fall between the
quantiles in known proportions (between q0.5 and q0.6: a fifth of them, ...). The statistic is
Pearson's chi-square of the window's counts in those bins against those proportions, divided by
its 1-in-1,000 critical value: 1.0 is the departure that clean traffic reaches in one window of a
thousand; well above it, the traffic is no longer like the calibration images.

The quantiles are themselves estimated from the N calibration images above the median, so a window
of n images above it is compared with a sample, not with the truth: the chi-square of the two-sample
(homogeneity) test is the one-sample one times N / (N + n), which keeps the 1-in-1,000 level honest
when the window is not small against the calibration set (without it: 2,000-image windows against
5,000 calibration images cross 1.0 about ten times as often as they should).

The window is the last ``window`` images scored, kept as ``blocks`` blocks of bin counts (memory:
blocks x bins integers, whatever the traffic). Below ``MIN_EXPECTED`` expected images in the
smallest bin the chi-square approximation does not hold and the statistic reads 0.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from scipy.stats import chi2

MEDIAN = 0.5
FALSE_ALARM = 1e-3  # the statistic is 1.0 at the chi-square quantile clean windows exceed this often
MIN_EXPECTED = 5  # images expected in the smallest bin before the statistic is computed


@dataclass(frozen=True)
class UpperTail:
    """The calibration scores from their median up: bin edges (scores) and the share of the scores
    above the median that falls in each bin (the last bin is open above)."""

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    reference_images: float | None = None  # calibration images above the median (None: unknown)

    @classmethod
    def from_quantiles(cls, quantiles: dict, calibration_images: int | None = None) -> "UpperTail | None":
        """From a manifest's ``score_quantiles`` ({"0.5": score, ...}) and its calibration ``n``; None
        without at least two levels from the median up (bundles of older builds may have none)."""
        points = sorted((float(level), float(score)) for level, score in (quantiles or {}).items()
                        if float(level) >= MEDIAN and math.isfinite(float(score)))
        if len(points) < 2 or points[0][0] != MEDIAN:
            return None
        edges, levels = [], []
        for level, score in points:
            if edges and score <= edges[-1]:  # tied quantiles: one bin
                continue
            edges.append(score)
            levels.append(level)
        if len(edges) < 2:
            return None
        bounds = levels + [1.0]
        shares = tuple((bounds[i + 1] - bounds[i]) / (1.0 - MEDIAN) for i in range(len(levels)))
        reference = calibration_images * (1.0 - MEDIAN) if calibration_images else None
        return cls(tuple(edges), shares, reference)

    def bin_of(self, score: float) -> int | None:
        """The bin of a score above the median; None at or below it (or not finite)."""
        if not math.isfinite(score) or score <= self.edges[0]:
            return None
        return bisect_right(self.edges, score) - 1

    @property
    def min_images(self) -> int:
        """Images above the median a window needs before its chi-square means something."""
        return math.ceil(MIN_EXPECTED / min(self.shares) - 1e-9)  # float shares: 5 / 0.0999... is 50


def drift_statistic(counts: list[int], shares: tuple[float, ...], reference_images: float | None = None) -> float:
    """Pearson's chi-square of ``counts`` against ``shares`` (two-sample when the shares come from
    ``reference_images`` images), over its ``FALSE_ALARM`` critical value."""
    n = sum(counts)
    if n == 0:
        return 0.0
    statistic = sum((count - n * share) ** 2 / (n * share) for count, share in zip(counts, shares))
    if reference_images:
        statistic *= reference_images / (reference_images + n)
    return statistic / chi2.isf(FALSE_ALARM, len(shares) - 1)


class DriftWindow:
    """The drift statistic over the last ``window`` scored images, in ``blocks`` blocks of counts."""

    def __init__(self, tail: UpperTail, window: int, blocks: int):
        if window < blocks or blocks < 1:
            raise ValueError(f"a window of {window} images cannot hold {blocks} blocks")
        self.tail = tail
        self.block_images = math.ceil(window / blocks)
        self._blocks: deque[tuple[list[int], list[int]]] = deque(maxlen=blocks)  # ([bin counts], [images])
        self._new_block()

    def _new_block(self) -> None:
        self._blocks.append(([0] * len(self.tail.shares), [0]))

    def add(self, scores: Iterable[float]) -> None:
        for score in scores:
            counts, images = self._blocks[-1]
            if images[0] >= self.block_images:
                self._new_block()  # the oldest block leaves the window (deque maxlen)
                counts, images = self._blocks[-1]
            images[0] += 1
            index = self.tail.bin_of(score)
            if index is not None:
                counts[index] += 1

    def counts(self) -> list[int]:
        return [sum(block[0][i] for block in self._blocks) for i in range(len(self.tail.shares))]

    @property
    def images(self) -> int:
        return sum(block[1][0] for block in self._blocks)

    def statistic(self) -> float:
        """0 until the window holds enough images above the median; then :func:`drift_statistic`."""
        counts = self.counts()
        if sum(counts) < self.tail.min_images:
            return 0.0
        return drift_statistic(counts, self.tail.shares, self.tail.reference_images)
