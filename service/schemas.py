"""Request and response models of the HTTP API (they drive the OpenAPI page at /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class PredictJSONRequest(BaseModel):
    images: list[str] = Field(
        description="images as base64 strings; a 'data:image/...;base64,' prefix is allowed",
        examples=[["iVBORw0KGgoAAAANSUhEUgAA..."]],
    )


class Prediction(BaseModel):
    index: int = Field(description="position of the image in the request")
    label: int | None = Field(description="the model's class index; null when rejected (unless BADEXPERT_REVEAL_REJECTED)")
    class_name: str | None = Field(description="name of that class; null when rejected")
    confidence: float | None = Field(description="the model's softmax probability of that class; null when rejected")
    score: float | None = Field(None, description="BaDExpert score; low means backdoor-like. Null only if the models "
                                "gave a non-finite value, and then the input is flagged. Absent with the "
                                "decision_only response policy")
    signals: dict[str, float | None] | None = Field(
        None, description="the score of each signal: 'expert' (the backdoor expert's, paper Eq. 3) and 'features' "
                          "(distances of the model's hidden activations to clean images of the predicted class, on "
                          "the same scale; null when the bundle has no feature signal). The score is the smaller of "
                          "the two. Absent with the decision_only response policy")
    rejected: bool = Field(description="the guard refused this input (always false in shadow mode)")
    flagged: bool = Field(description="score < threshold: the guard's decision, whatever the mode "
                                      "(in shadow mode the would-be rejection)")


class PredictResponse(BaseModel):
    bundle: str = Field(description="id of the bundle that answered")
    threshold: float | None = Field(None, description="tau: inputs scoring below it are flagged (absent with the "
                                                      "decision_only response policy)")
    mode: Literal["enforce", "shadow"]
    predictions: list[Prediction] = Field(description="one per image, in request order")


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. no_image, undecodable_image, image_too_large")
    detail: str = Field(description="what went wrong, for a person")
    index: int | None = Field(None, description="the image at fault, where one is")


class HealthResponse(BaseModel):
    status: str


class ReadyResponse(BaseModel):
    ready: bool
    status: str = Field(description="loading, ready, failed or shutting_down")
    detail: str | None = None


class InfoResponse(BaseModel):
    bundle_id: str
    created_at: str
    architecture: dict
    class_names: list[str]
    num_classes: int
    input_size: list[int] = Field(description="[height, width]")
    mean: list[float]
    std: list[float]
    alpha: float | None = Field(None, description="absent with the decision_only response policy")
    threshold: float | None = Field(None, description="absent with the decision_only response policy")
    target_fpr: float
    calibration: dict | None = Field(None, description="rule, n, k and FPRs of the threshold (absent with the "
                                                        "decision_only response policy)")
    mode: Literal["enforce", "shadow"]
    device: str
    limits: dict
    batching: dict
    response_policy: Literal["full", "decision_only"] = "full"
    signals: dict | None = Field(None, description="what decides: 'rule' (expert, features or fused) and the feature "
                                                   "layers (absent with the decision_only response policy)")
    self_test: dict | None = Field(None, description="the build's canary self-test: AUROC and the share of canary-"
                                                     "triggered inputs that pass at tau, on canary backdoors implanted "
                                                     "in a copy of the model, with what that promises (null: none)")
    versions: dict = Field(description="'bundle': the versions that built the bundle; 'server': the versions serving it")


class BundleSwapRequest(BaseModel):
    path: str = Field(description="bundle folder to serve: under the server's admin_bundle_root (absolute, or "
                                  "relative to it)", examples=["bundles/2026-12-02"])


class BundleSwapResponse(BaseModel):
    bundle_id: str = Field(description="the bundle now serving")
    previous_bundle_id: str = Field(description="the bundle it replaced (requests in flight finish on it)")
    path: str = Field(description="the resolved folder it was loaded from")
    seconds: float = Field(description="time to load, verify and warm it up")


class ShadowResponse(BaseModel):
    live_bundle_id: str = Field(description="the bundle that decides")
    candidate_bundle_id: str | None = Field(description="the bundle in shadow (null: none)")
    seconds: float | None = Field(None, description="time to load, verify and warm up the candidate")
