"""A candidate bundle in shadow (service/shadow.py): it scores the same batches as the live bundle, only
the live bundle decides, its would-be decisions go to metrics and the audit log, and a promotion (admin
request or SIGUSR1) makes it live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from defense.bundle import read_manifest
from live_server import wait_until_ready
from test_service import badexpert_command, free_port, metrics, multipart, serving, value

ADMIN_KEY = "admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_candidate_in_shadow_never_decides_but_is_measured_audited_and_promoted(tiny, tmp_path):
    live_id, candidate_id = read_manifest(tiny.bundle).bundle_id, read_manifest(tiny.strict).bundle_id
    live_tau = read_manifest(tiny.bundle).rejection_threshold
    live_flags = (tiny.scores < live_tau).tolist()
    candidate_flags = (tiny.scores < tiny.strict_tau).tolist()
    assert live_flags != candidate_flags  # the fixture's strict threshold flags some the calibrated one accepts
    audit = tmp_path / "audit.jsonl"
    with serving(tiny.bundle, shadow_bundle=tiny.strict, audit_log=audit, admin_bundle_root=tiny.bundle.parent,
                 admin_api_keys=ADMIN_KEY) as client:
        info = client.get("/v1/info").json()
        assert info["bundle_id"] == live_id and info["candidate"]["bundle_id"] == candidate_id
        answer = client.post("/predict", files=multipart(tiny.files), headers={"X-Request-ID": "shadowed"}).json()
        assert answer["bundle"] == live_id
        assert [p["flagged"] for p in answer["predictions"]] == live_flags  # only the live bundle decides
        snapshot = metrics(client)
        count = len(tiny.files)
        for bundle, role, flags in ((live_id, "live", live_flags), (candidate_id, "candidate", candidate_flags)):
            assert value(snapshot, "badexpert_bundle_decisions_total", bundle=bundle, role=role,
                         decision="rejected") == sum(flags)
            assert value(snapshot, "badexpert_bundle_decisions_total", bundle=bundle, role=role,
                         decision="accepted") == count - sum(flags)
        assert value(snapshot, "badexpert_candidate_disagreements_total", live_bundle=live_id,
                     candidate_bundle=candidate_id) == sum(a != b for a, b in zip(live_flags, candidate_flags))
        assert value(snapshot, "badexpert_inputs_total", decision="rejected") == sum(live_flags)
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        assert sorted(line["index"] for line in lines) == [i for i in range(count) if live_flags[i] or candidate_flags[i]]
        for line in lines:
            assert line["bundle"] == live_id and line["flagged"] == live_flags[line["index"]]
            assert line["candidate"]["bundle"] == candidate_id and line["candidate"]["flagged"] == candidate_flags[line["index"]]
            assert line["candidate"]["score"] == pytest.approx(float(tiny.scores[line["index"]]), rel=1e-5)

        promoted = client.post("/v1/admin/promote", headers=ADMIN)
        assert promoted.status_code == 200 and promoted.json()["bundle_id"] == candidate_id
        assert promoted.json()["previous_bundle_id"] == live_id
        assert "candidate" not in client.get("/v1/info").json()
        answer = client.post("/predict", files=multipart(tiny.files)).json()
        assert answer["bundle"] == candidate_id and [p["flagged"] for p in answer["predictions"]] == candidate_flags
        assert client.post("/v1/admin/promote", headers=ADMIN).json()["error"] == "no_candidate"

        # A candidate set and removed by the admin endpoint.
        shadow = client.post("/v1/admin/shadow", json={"path": "bundle"}, headers=ADMIN)
        assert shadow.status_code == 200 and shadow.json()["candidate_bundle_id"] == live_id
        assert client.get("/v1/info").json()["candidate"]["bundle_id"] == live_id
        assert client.delete("/v1/admin/shadow", headers=ADMIN).json()["candidate_bundle_id"] is None
        assert "candidate" not in client.get("/v1/info").json()


@pytest.mark.integration
def test_sigusr1_promotes_the_candidate_of_a_live_server(tiny):
    port = free_port()
    process = subprocess.Popen(
        badexpert_command() + ["serve", str(tiny.bundle), "--shadow-bundle", str(tiny.strict), "--port", str(port),
                               "--device", "cpu", "--no-access-log"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, process.stdout.read)
        candidate_id = read_manifest(tiny.strict).bundle_id
        assert httpx.get(base + "/v1/info").json()["candidate"]["bundle_id"] == candidate_id
        process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/v1/info").json()["bundle_id"] != candidate_id:
            assert time.monotonic() < deadline, "SIGUSR1 did not promote the candidate"
            time.sleep(0.05)
        assert httpx.post(base + "/predict", files=multipart(tiny.files[:1])).json()["bundle"] == candidate_id
        assert 'badexpert_bundle_info{bundle_id="%s"' % candidate_id in httpx.get(base + "/metrics").text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
