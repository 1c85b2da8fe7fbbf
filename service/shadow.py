"""A candidate bundle in shadow: it scores the same batches as the live bundle, but only the live
bundle decides. The candidate's would-be decisions go to metrics (per bundle, and how often it
disagrees with the live bundle) and to the audit trail; promoting it makes it live.

:class:`Lineup` is what a request runs on: the live bundle and the candidate (or None), replaced
as a whole (never edited) by a hot swap, a new candidate or a promotion, so a request keeps the
pair it started with, and the batcher's groups keep two lineups out of one forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from defense.score import GuardScores, rejects
from service.served_bundle import ServedBundle

log = logging.getLogger("badexpert.serve")


@dataclass(frozen=True, eq=False)
class Lineup:
    live: ServedBundle
    candidate: ServedBundle | None = None


@dataclass
class ShadowedScores(GuardScores):
    """The live bundle's scores, with the candidate's label and score of the same images (NaN score and
    label -1 where the candidate failed on the batch)."""

    candidate_label: torch.Tensor = None
    candidate_score: torch.Tensor = None


def check_candidate(live: ServedBundle, candidate: ServedBundle) -> None:
    """The candidate scores the tensors decoded for the live bundle: their input sizes must agree."""
    live_size, candidate_size = live.guard.preprocessing.input_size, candidate.guard.preprocessing.input_size
    if tuple(live_size) != tuple(candidate_size):
        raise ValueError(f"candidate bundle {candidate.bundle_id}: input size {list(candidate_size)} differs from the "
                         f"live bundle's {list(live_size)}; a candidate must score the same images")


def score_lineup(lineup: Lineup, images: torch.Tensor, on_failure=None, cores: int | None = None) -> GuardScores:
    """Blocking (the inference thread): the live bundle's scores, and the candidate's beside them.
    A failing candidate never fails the request: its scores are then NaN (and counted)."""
    scores = lineup.live.infer(images, cores)
    if lineup.candidate is None:
        return scores
    try:
        shadow = lineup.candidate.infer(images, cores)
        label, score = shadow.label, shadow.score
    except Exception as error:  # the live answer stands whatever the candidate does
        log.error("candidate bundle %s failed on a batch: %s", lineup.candidate.bundle_id, error)
        if on_failure is not None:
            on_failure()
        label = torch.full_like(scores.label, -1)
        score = torch.full_like(scores.score, float("nan"))
    return ShadowedScores(**vars(scores), candidate_label=label, candidate_score=score)


@dataclass
class CandidateDecisions:
    bundle: ServedBundle
    labels: list[int]
    scores: list[float]
    flagged: list[bool]


def candidate_decisions(lineup: Lineup, scores: GuardScores) -> CandidateDecisions | None:
    if lineup.candidate is None or not isinstance(scores, ShadowedScores):
        return None
    return CandidateDecisions(lineup.candidate, scores.candidate_label.tolist(), scores.candidate_score.tolist(),
                              rejects(scores.candidate_score, lineup.candidate.tau).tolist())


def candidate_fields(candidate: CandidateDecisions, index: int) -> dict:
    """What an audit line says of the candidate's would-be decision on one image."""
    from service.audit import finite_or_none

    label = candidate.labels[index]
    names = candidate.bundle.class_names
    return {"bundle": candidate.bundle.bundle_id, "tau": candidate.bundle.tau, "flagged": candidate.flagged[index],
            "predicted_class": label, "class_name": names[label] if 0 <= label < len(names) else None,
            "score": finite_or_none(candidate.scores[index])}


def lineup_info(lineup: Lineup, show_scores: bool) -> dict:
    """``/v1/info``: the live bundle's document, with the candidate's id (and threshold) when one runs."""
    info = dict(lineup.live.info)
    if lineup.candidate is not None:
        info["candidate"] = {"bundle_id": lineup.candidate.bundle_id, "created_at": lineup.candidate.manifest.created_at}
        if show_scores:
            info["candidate"]["threshold"] = lineup.candidate.tau
    return info
