"""Confidence intervals of the detection metrics: percentile bootstrap, clean and triggered images
resampled independently, seeded, all resamples computed at once (pure functions of the scores)."""

from __future__ import annotations

import math

import torch

from defense.evaluation import METRIC_LABELS
from defense.score import rejects

BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def resample_counts(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """(resamples, n) multiplicities of a bootstrap resample of n items (float)."""
    index = torch.randint(0, n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n)
    counts.scatter_add_(1, index, torch.ones(resamples, n))
    return counts


def weighted_auroc(clean_scores: torch.Tensor, triggered_scores: torch.Tensor,
                   clean_weights: torch.Tensor, triggered_weights: torch.Tensor) -> torch.Tensor:
    """AUROC (triggered = positive, detected by a low score) for each row of weights, ties counted half.

    Weights (B, n) are bootstrap multiplicities (zero for items outside the AUROC's populations).
    For every clean score, the weighted number of triggered scores below it comes from one sort
    and a cumulative sum, so all B resamples cost O(B (n_c + n_t)) after O(n log n) sorting.
    """
    # A NaN score is rejected: rank it as the lowest (most backdoor-like) score.
    clean_scores, triggered_scores = (s.double().nan_to_num(nan=-math.inf) for s in (clean_scores, triggered_scores))
    order = triggered_scores.argsort()
    sorted_scores = triggered_scores[order].double()
    cumulative = torch.nn.functional.pad(triggered_weights[:, order].double().cumsum(1), (1, 0))
    queries = clean_scores.double()
    below = torch.searchsorted(sorted_scores, queries, right=False)
    at_or_below = torch.searchsorted(sorted_scores, queries, right=True)
    less = cumulative[:, below]
    ties = cumulative[:, at_or_below] - less
    wins = (clean_weights.double() * (less + 0.5 * ties)).sum(1)
    total = clean_weights.double().sum(1) * triggered_weights.double().sum(1)
    return torch.where(total > 0, wins / total.clamp_min(1e-300), torch.full_like(total, float("nan")))


def bootstrap_metrics(tau: float, clean_scores, clean_correct, triggered_scores, triggered_counted,
                      triggered_successful, resamples: int, seed: int = BOOTSTRAP_SEED,
                      chunk: int = 100) -> dict[str, torch.Tensor]:
    """Each metric on ``resamples`` bootstrap resamples: {name: (resamples,) tensor}."""
    generator = torch.Generator().manual_seed(seed)
    clean_rejected = rejects(clean_scores, tau).double()
    triggered_rejected = rejects(triggered_scores, tau).double()
    correct = clean_correct.double()
    counted = triggered_counted.double()
    successful = triggered_successful.double()
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in METRIC_LABELS}
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        wc = resample_counts(len(clean_scores), size, generator).double()
        wt = resample_counts(len(triggered_scores), size, generator).double()
        n_clean = wc.sum(1)
        n_counted = wt @ counted
        n_successful = wt @ successful
        nan = torch.full((size,), float("nan"), dtype=torch.double)
        columns["auroc"].append(weighted_auroc(clean_scores, triggered_scores, wc * correct, wt * successful))
        columns["tpr"].append(torch.where(n_successful > 0, (wt @ (successful * triggered_rejected)) / n_successful.clamp_min(1), nan))
        columns["fpr"].append((wc @ clean_rejected) / n_clean)
        columns["clean_accuracy_without_guard"].append((wc @ correct) / n_clean)
        columns["clean_accuracy_with_guard"].append((wc @ (correct * (1 - clean_rejected))) / n_clean)
        columns["asr_without_guard"].append(torch.where(n_counted > 0, (wt @ successful) / n_counted.clamp_min(1), nan))
        columns["asr_with_guard"].append(torch.where(n_counted > 0, (wt @ (successful * (1 - triggered_rejected)))
                                                     / n_counted.clamp_min(1), nan))
    return {name: torch.cat(parts) for name, parts in columns.items()}


def percentile_interval(values: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    finite = values[torch.isfinite(values)]
    if len(finite) == 0:
        return None, None
    tail = (1 - confidence) / 2
    low, high = torch.quantile(finite.double(), torch.tensor([tail, 1 - tail], dtype=torch.double))
    return float(low), float(high)
