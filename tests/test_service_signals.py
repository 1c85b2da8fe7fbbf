"""The server answers each signal's part of the score beside the decision score (/predict, the v2
protocol, /v1/info), and hides them with the decision_only policy."""

from __future__ import annotations

import pytest

from test_service import multipart, serving


def test_predictions_carry_each_signals_part_and_the_score_is_the_smaller(tiny):
    with serving(tiny.bundle) as client:
        body = client.post("/predict", files=multipart(tiny.files)).json()
        info = client.get("/v1/info").json()
    assert info["signals"]["rule"] == "fused" and info["signals"]["feature_layers"]
    for prediction in body["predictions"]:
        parts = prediction["signals"]
        assert set(parts) == {"expert", "features"}
        assert prediction["score"] == pytest.approx(min(parts["expert"], parts["features"]), rel=1e-12)


def test_decision_only_hides_the_signals_parts(tiny):
    with serving(tiny.bundle, response_policy="decision_only") as client:
        body = client.post("/predict", files=multipart(tiny.files)).json()
        info = client.get("/v1/info").json()
        metadata = client.get("/v2/models/badexpert-guard").json()
    assert all("signals" not in p and "score" not in p for p in body["predictions"])
    assert "signals" not in info
    assert not {"score", "expert_score", "feature_score"} & {o["name"] for o in metadata["outputs"]}
