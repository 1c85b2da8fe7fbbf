"""The guard's decisions on one request's images (:class:`Decisions`), the ``POST /predict``
answer made of them, and the audit trail's records of the flagged ones. The v2 protocol formats the same decisions as tensors (:mod:`service.v2_routes`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response

from defense.score import GuardScores
from service.audit import finite_or_none
from service.served_bundle import ServedBundle
from service.settings import ServiceSettings
from service.shadow import CandidateDecisions, candidate_fields


@dataclass
class Decisions:
    """The guard's answer for one request's images, from the bundle that decided."""

    bundle: ServedBundle
    labels: list[int]
    confidences: list[float]
    scores: list[float]
    flagged: list[bool]  # score < tau, whatever the mode
    rejected: list[bool]  # flagged and in enforce mode
    expert_scores: list[float] | None = None  # each signal's part of the score (full response policy only)
    feature_scores: list[float] | None = None  # None: the bundle has no feature signal


def withheld(decisions: Decisions, settings: ServiceSettings) -> list[bool]:
    """Which images' label and confidence the answer leaves out (rejected, unless reveal_rejected)."""
    hide = settings.mode == "enforce" and not settings.reveal_rejected
    return [rejected and hide for rejected in decisions.rejected]


def attach_signal_parts(decisions: Decisions, scores: GuardScores) -> None:
    """Keep each signal's score for the answer (the full response policy shows them)."""
    decisions.expert_scores = scores.expert_score.tolist()
    if decisions.bundle.guard.feature_detector is not None:
        decisions.feature_scores = scores.feature_score.tolist()


def signal_parts(decisions: Decisions, index: int) -> dict:
    """The image's score per signal: the expert's (paper Eq. 3) and the feature signal's (on the
    same scale; null when the bundle has none). The decision score is the smaller of the two."""
    expert = decisions.expert_scores[index] if decisions.expert_scores is not None else decisions.scores[index]
    feature = decisions.feature_scores[index] if decisions.feature_scores is not None else None
    return {"expert": finite_or_none(expert), "features": None if feature is None else finite_or_none(feature)}


def predict_answer(decisions: Decisions, settings: ServiceSettings) -> Response:
    names = decisions.bundle.class_names
    show_scores = settings.response_policy == "full"
    predictions = []
    for index, (label, confidence, value, flag, rejected, hidden) in enumerate(zip(
            decisions.labels, decisions.confidences, decisions.scores, decisions.flagged, decisions.rejected,
            withheld(decisions, settings))):
        prediction = {
            "index": index, "label": None if hidden else label, "class_name": None if hidden else names[label],
            "confidence": None if hidden else confidence, "score": finite_or_none(value),
            "rejected": rejected, "flagged": flag,
        }
        if show_scores:
            prediction["signals"] = signal_parts(decisions, index)
        else:
            del prediction["score"]
        predictions.append(prediction)
    answer = {"bundle": decisions.bundle.bundle_id, "threshold": decisions.bundle.tau, "mode": settings.mode,
              "predictions": predictions}
    if not show_scores:
        del answer["threshold"]
    return JSONResponse(answer)


def audit_records(request_state, bundle: ServedBundle, scores: GuardScores, flagged: list[bool], chosen: list[int],
                  mode: str, candidate: CandidateDecisions | None = None) -> list[dict]:
    """The audit trail's records of a request's ``chosen`` images (those flagged by the live bundle or
    the candidate). With a candidate in shadow, each record says both decisions."""
    labels, values = scores.label.tolist(), scores.score.tolist()
    experts, auxiliaries = scores.expert_agreement.tolist(), scores.auxiliary_agreement.tolist()
    records = [{"request_id": request_state.request_id, "client_request_id": request_state.client_request_id,
                "index": i, "predicted_class": labels[i], "class_name": bundle.class_names[labels[i]],
                "score": finite_or_none(values[i]), "b": finite_or_none(experts[i]),
                "a": finite_or_none(auxiliaries[i]), "alpha": bundle.guard.alpha, "tau": bundle.tau,
                "mode": mode, "bundle": bundle.bundle_id}
               for i in chosen]
    if candidate is not None:
        for record in records:
            record["flagged"] = flagged[record["index"]]
            record["candidate"] = candidate_fields(candidate, record["index"])
    return records
