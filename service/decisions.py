"""The guard's decisions on one request's images (:class:`Decisions`), and the ``POST /predict``
answer made of them. The v2 protocol formats the same decisions as tensors (:mod:`service.v2_routes`)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response

from service.audit import finite_or_none
from service.served_bundle import ServedBundle
from service.settings import ServiceSettings


@dataclass
class Decisions:
    """The guard's answer for one request's images, from the bundle that decided."""

    bundle: ServedBundle
    labels: list[int]
    confidences: list[float]
    scores: list[float]
    flagged: list[bool]  # score < tau, whatever the mode
    rejected: list[bool]  # flagged and in enforce mode


def withheld(decisions: Decisions, settings: ServiceSettings) -> list[bool]:
    """Which images' label and confidence the answer leaves out (rejected, unless reveal_rejected)."""
    hide = settings.mode == "enforce" and not settings.reveal_rejected
    return [rejected and hide for rejected in decisions.rejected]


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
        if not show_scores:
            del prediction["score"]
        predictions.append(prediction)
    answer = {"bundle": decisions.bundle.bundle_id, "threshold": decisions.bundle.tau, "mode": settings.mode,
              "predictions": predictions}
    if not show_scores:
        del answer["threshold"]
    return JSONResponse(answer)
