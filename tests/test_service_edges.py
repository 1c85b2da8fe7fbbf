"""The server's edges as an attacker or a careless operator finds them (issue 28): no score oracle
under decision_only, /metrics behind keys, key lists that hold no key, admin paths and symlinks,
a tampered threshold, bodies that would stall the event loop, 16-bit images, capped error bodies,
slow headers."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from pydantic import ValidationError

from defense.bundle import load_bundle, read_manifest
from defense.bundle_trust import content_digest
from defense.errors import BundleIntegrityError
from service.settings import ServiceSettings
from test_service import clean_environment, metrics, multipart, serving, settings  # noqa: F401 (fixture)

KEY, ADMIN_KEY, METRICS_KEY = "user-key-0123456789", "admin-key-0123456789", "metrics-key-0123456789"


# ----- decision_only leaks no score, /metrics included --------------------------------------------


def test_decision_only_metrics_cannot_recover_one_requests_score(tiny):
    with serving(tiny.strict, response_policy="decision_only") as client:
        before = metrics(client)
        response = client.post("/predict", files=multipart(tiny.files[:1]))
        after = metrics(client)
        text = client.get("/metrics").text
    assert response.status_code == 200 and "score" not in response.json()["predictions"][0]
    score, tau = float(tiny.scores[0]), tiny.strict_tau
    assert "badexpert_score" not in text and "tau=" not in text and repr(tau)[:8] not in text
    # No series moved by the score (the histogram's _sum did: it was the score itself), nor by anything
    # near it; the counts that moved are the decision's, which the response gives anyway.
    for key in set(before) | set(after):
        change = after.get(key, 0.0) - before.get(key, 0.0)
        assert not math.isclose(change, score, rel_tol=1e-3), key
        assert not any(math.isclose(value, tau, rel_tol=1e-6) for value in (after.get(key, 0.0),)), key


def test_full_policy_still_exports_the_score_histogram_and_tau(tiny):
    with serving(tiny.strict) as client:
        client.post("/predict", files=multipart(tiny.files[:1]))
        text = client.get("/metrics").text
    assert "badexpert_score_bucket" in text and f'tau="{tiny.strict_tau!r}"' in text


def test_metrics_need_a_key_by_default_and_a_metrics_key_keeps_api_keys_out(tiny):
    with serving(tiny.bundle, api_keys=KEY, metrics_api_keys=METRICS_KEY) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"x-api-key": KEY}).status_code == 401  # a client's key
        assert client.get("/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"}).status_code == 200
        assert client.post("/predict", files=multipart(tiny.files[:1]),
                           headers={"x-api-key": METRICS_KEY}).status_code == 401  # and not the other way round
    with serving(tiny.bundle, metrics_api_keys=METRICS_KEY) as client:  # metrics key alone: only /metrics closed
        assert client.get("/metrics").status_code == 401
        assert client.post("/predict", files=multipart(tiny.files[:1])).status_code == 200


# ----- key lists --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [" , ", ",", " ", ",,\t,"])
@pytest.mark.parametrize("name", ["api_keys", "admin_api_keys", "metrics_api_keys"])
def test_a_key_list_of_separators_only_is_refused_at_start(tmp_path, name, value):
    with pytest.raises(ValidationError, match=f"{name} is set but holds no key"):
        ServiceSettings(bundle=tmp_path, **{name: value})


def test_an_empty_key_variable_means_unset_as_compose_passes_it(tmp_path):
    assert ServiceSettings(bundle=tmp_path, api_keys="").api_key_list == []


def test_the_same_key_for_two_roles_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="api_keys and admin_api_keys share a key"):
        ServiceSettings(bundle=tmp_path, api_keys=f"{KEY},other-key-0123456789", admin_api_keys=f" {KEY} ",
                        admin_bundle_root=tmp_path)
    with pytest.raises(ValidationError, match="api_keys and metrics_api_keys share a key"):
        ServiceSettings(bundle=tmp_path, api_keys=KEY, metrics_api_keys=KEY)


def test_serve_refuses_a_separator_only_key_list_before_listening(tiny, capsys, monkeypatch):
    from cli.main import main

    monkeypatch.setenv("BADEXPERT_API_KEYS", " , ")
    assert main(["serve", str(tiny.bundle), "--port", "0"]) != 0
    assert "BADEXPERT_API_KEYS" in capsys.readouterr().err


# ----- admin paths -------------------------------------------------------------------------------


def admin_settings(root):
    return {"admin_bundle_root": root, "admin_api_keys": ADMIN_KEY}


ADMIN = {"x-api-key": ADMIN_KEY}


@pytest.mark.parametrize("path", ["a\x00b", "strict\x00", "x\ny", "\x7f"])
def test_an_admin_path_with_control_characters_is_a_400(tiny, path):
    with serving(tiny.bundle, **admin_settings(tiny.bundle.parent)) as client:
        for route in ("/v1/admin/bundle", "/v1/admin/shadow"):
            response = client.post(route, json={"path": path}, headers=ADMIN)
            assert response.status_code == 400, (route, response.text)
            assert response.json()["error"] == "bad_path"


def test_a_bundle_whose_files_link_outside_the_admin_root_is_refused(tiny, tmp_path):
    root = tmp_path / "root"
    (root / "linked").mkdir(parents=True)
    for entry in tiny.strict.iterdir():  # every file a symlink to a bundle outside the root
        (root / "linked" / entry.name).symlink_to(entry)
    shutil.copytree(tiny.strict, root / "copied")
    with serving(tiny.bundle, **admin_settings(root)) as client:
        for route in ("/v1/admin/bundle", "/v1/admin/shadow"):
            refused = client.post(route, json={"path": "linked"}, headers=ADMIN)
            assert refused.status_code == 403, refused.text
            assert "manifest.json" in refused.json()["detail"] or ".safetensors" in refused.json()["detail"]
        swapped = client.post("/v1/admin/bundle", json={"path": "copied"}, headers=ADMIN)
        assert swapped.status_code == 200, swapped.text


# ----- a threshold its own calibration record contradicts ------------------------------------------


def redigested_copy(source, target, tau):
    shutil.copytree(source, target)
    document = json.loads((target / "manifest.json").read_text())
    document["rejection_threshold"] = document["threshold"]["tau"] = tau
    document.pop("signature", None)
    digest = content_digest(document)
    document["content_sha256"], document["bundle_id"] = digest, digest[:16]
    (target / "manifest.json").write_text(json.dumps(document))
    return target


@pytest.mark.parametrize("tau", [-1.0, 1e308, 0.0])
def test_an_unsigned_bundle_whose_tau_its_calibration_contradicts_is_refused(tiny, tmp_path, tau):
    bundle = redigested_copy(tiny.bundle, tmp_path / "edited", tau)
    read_manifest(bundle)  # the digest holds: only the calibration record gives it away
    with pytest.raises(BundleIntegrityError, match="lies outside its own calibration scores.*unsigned"):
        load_bundle(bundle)


def test_a_signed_bundle_with_an_unusual_tau_loads_with_its_verify_key(tiny, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from defense.bundle import save_bundle
    from defense.models.loading import ModelSpec

    key = Ed25519PrivateKey.generate()
    guard, manifest = load_bundle(tiny.bundle)
    guard.rejection_threshold = 1e3  # far above every calibration score: an operator's deliberate choice
    fields = {**manifest.model_dump(), "threshold": {**manifest.threshold, "tau": 1e3}}
    save_bundle(tmp_path / "signed", guard, ModelSpec.from_dict(manifest.architecture), fields, sign_key=key)
    with pytest.raises(BundleIntegrityError, match="outside its own calibration"):
        load_bundle(tmp_path / "signed")
    loaded, _ = load_bundle(tmp_path / "signed", verify_key=key.public_key())
    assert loaded.rejection_threshold == 1e3


def test_every_build_and_calibrate_bundle_passes_the_check(tiny):
    from defense.bundle_trust import tau_outside_calibration

    assert tau_outside_calibration(read_manifest(tiny.bundle)) is None
    assert tau_outside_calibration(read_manifest(tiny.strict)) is None
