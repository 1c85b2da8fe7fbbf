"""Hot swap of the served bundle (service/bundle_reload.py): a real `badexpert serve` process, clients
posting continuously from threads, and swaps by SIGHUP (a re-pointed symlink) and by the admin
endpoint. No request fails; each client sees the old bundle, then the new one, with one switch
point; a corrupted candidate leaves the old bundle serving and is counted as a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from defense.bundle import read_manifest
from live_server import wait_until_ready
from test_service import badexpert_command, free_port, multipart

ADMIN_KEY = "admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def metric(base: str, name: str, **labels) -> float:
    text = httpx.get(base + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def bundle_info_id(base: str) -> str:
    text = httpx.get(base + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "badexpert_bundle_info":
                return sample.labels["bundle_id"]
    raise AssertionError("no badexpert_bundle_info")


def repoint(link: Path, target: Path) -> None:
    """Atomically switch the symlink ``link`` to ``target`` (a new link renamed over the old one)."""
    staging = link.with_name(link.name + ".new")
    if staging.is_symlink():
        staging.unlink()
    staging.symlink_to(target)
    os.replace(staging, link)


def corrupted_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    weights.write_bytes(bytes(data))
    return target


class Clients:
    """Threads posting the sample images continuously, each recording (status, bundle id, request id)."""

    def __init__(self, base: str, files: list[Path], count: int = 3):
        self.base, self.body = base, multipart(files)
        self.records: list[list[tuple[int, str | None, str]]] = [[] for _ in range(count)]
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.base, timeout=60) as client:
            number = 0
            while not self.stop.is_set():
                request_id = f"c{index}-{number}"
                number += 1
                try:
                    response = client.post("/predict", files=self.body, headers={"X-Request-ID": request_id})
                    bundle = response.json().get("bundle") if response.status_code == 200 else None
                    self.records[index].append((response.status_code, bundle, request_id))
                except httpx.HTTPError as error:
                    self.records[index].append((-1, repr(error), request_id))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until every client has ``count`` more responses than now."""
        targets = [len(records) + count for records in self.records]
        deadline = time.monotonic() + timeout
        while any(len(records) < target for records, target in zip(self.records, targets)):
            assert time.monotonic() < deadline, "the clients made no progress"
            time.sleep(0.02)


def assert_one_switch(clients: Clients, old: str, new: str) -> None:
    for records in clients.records:
        assert records and all(status == 200 for status, _, _ in records), [r for r in records if r[0] != 200][:3]
        bundles = [bundle for _, bundle, _ in records]
        switch = bundles.index(new) if new in bundles else len(bundles)
        assert switch > 0 and set(bundles[:switch]) == {old}, bundles
        assert bundles[switch:] and set(bundles[switch:]) == {new}, bundles  # one switch point, old then new


def wait_for_bundle(base: str, bundle_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(base + "/v1/info").json()["bundle_id"] != bundle_id:
        assert time.monotonic() < deadline, f"the server did not switch to {bundle_id}"
        time.sleep(0.05)


@pytest.mark.integration
def test_hot_swap_by_sighup_and_admin_drops_no_request_and_refuses_a_corrupted_candidate(tiny, tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    first, second = shutil.copytree(tiny.bundle, bundles / "first"), shutil.copytree(tiny.strict, bundles / "second")
    broken = corrupted_copy(tiny.bundle, bundles / "broken")
    first_id, second_id = read_manifest(first).bundle_id, read_manifest(second).bundle_id
    assert first_id != second_id
    current = bundles / "current"
    current.symlink_to(first)
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "BADEXPERT_ADMIN_API_KEYS": ADMIN_KEY}
    process = subprocess.Popen(
        badexpert_command() + ["serve", str(current), "--port", str(port), "--device", "cpu", "--no-access-log",
                               "--torch-threads", "1", "--max-wait-ms", "2", "--audit-log", str(audit),
                               "--admin-bundle-root", str(bundles)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, process.stdout.read)
        assert httpx.get(base + "/v1/info").json()["bundle_id"] == first_id

        # 1. SIGHUP after re-pointing the symlink, with clients posting all along.
        with Clients(base, tiny.files) as clients:
            clients.wait_for(3)
            repoint(current, second)
            process.send_signal(signal.SIGHUP)
            wait_for_bundle(base, second_id)
            clients.wait_for(3)
        assert_one_switch(clients, first_id, second_id)
        assert metric(base, "badexpert_bundle_reloads_total", outcome="success") == 1
        assert bundle_info_id(base) == second_id
        # The audit log names the bundle that decided each flagged image (the strict one flags some).
        decided = {request_id: bundle for records in clients.records for _, bundle, request_id in records}
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        assert any(line["bundle"] == second_id for line in lines)
        assert all(line["bundle"] == decided[line["client_request_id"]] for line in lines)

        # 2. Corrupted candidates, by SIGHUP and by the admin endpoint: the running bundle keeps serving.
        repoint(current, broken)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while metric(base, "badexpert_bundle_reloads_total", outcome="failure") < 1:
            assert time.monotonic() < deadline, "the failed reload was not counted"
            time.sleep(0.05)
        refused = httpx.post(base + "/v1/admin/bundle", json={"path": "broken"}, headers=ADMIN, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"] == "bundle_rejected"
        assert "sha256" in refused.json()["detail"] and second_id in refused.json()["detail"]
        assert metric(base, "badexpert_bundle_reloads_total", outcome="failure") == 2
        assert httpx.get(base + "/v1/info").json()["bundle_id"] == second_id == bundle_info_id(base)
        assert httpx.post(base + "/predict", files=multipart(tiny.files[:1])).json()["bundle"] == second_id

        # 3. The admin endpoint: a key, and a folder under admin_bundle_root, are required.
        assert httpx.post(base + "/v1/admin/bundle", json={"path": "first"}).status_code == 401
        outside = httpx.post(base + "/v1/admin/bundle", json={"path": str(tiny.bundle)}, headers=ADMIN)
        assert outside.status_code == 403 and outside.json()["error"] == "path_not_allowed"
        escaping = httpx.post(base + "/v1/admin/bundle", json={"path": "../../"}, headers=ADMIN)
        assert escaping.status_code == 403

        # 4. An admin swap back to the first bundle, with clients posting all along.
        with Clients(base, tiny.files) as clients:
            clients.wait_for(3)
            swapped = httpx.post(base + "/v1/admin/bundle", json={"path": "first"}, headers=ADMIN, timeout=60)
            assert swapped.status_code == 200, swapped.text
            assert swapped.json()["bundle_id"] == first_id and swapped.json()["previous_bundle_id"] == second_id
            clients.wait_for(3)
        assert_one_switch(clients, second_id, first_id)
        assert metric(base, "badexpert_bundle_reloads_total", outcome="success") == 2
        assert httpx.get(base + "/v1/info").json()["bundle_id"] == first_id == bundle_info_id(base)

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        output = process.stdout.read()
        assert "failed; the running bundle keeps serving" in output and "does not match its sha256" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_admin_endpoints_are_off_by_default_and_need_an_admin_key(tiny):
    from pydantic import ValidationError

    from service.settings import ServiceSettings
    from test_service import serving

    with serving(tiny.bundle) as client:  # no admin_bundle_root: no admin endpoint
        assert client.post("/v1/admin/bundle", json={"path": str(tiny.strict)}).status_code == 404
    with pytest.raises(ValidationError, match="admin_bundle_root needs admin_api_keys"):
        ServiceSettings(bundle=tiny.bundle, admin_bundle_root=tiny.bundle.parent)
    with serving(tiny.bundle, admin_bundle_root=tiny.bundle.parent, admin_api_keys=ADMIN_KEY,
                 api_keys="user-key-0123456789abcdef") as client:
        user = {"Authorization": "Bearer user-key-0123456789abcdef"}
        assert client.post("/v1/admin/bundle", json={"path": "strict"}, headers=user).status_code == 401
        malformed = client.post("/v1/admin/bundle", json={"folder": "strict"}, headers=ADMIN)
        assert malformed.status_code == 422 and malformed.json()["error"] == "malformed_json"
        assert client.post("/predict", files=multipart(tiny.files[:1]), headers=ADMIN).status_code == 401
        swapped = client.post("/v1/admin/bundle", json={"path": "strict"}, headers=ADMIN)
        assert swapped.status_code == 200 and swapped.json()["path"] == str(tiny.strict.resolve())
        assert client.post("/predict", files=multipart(tiny.files[:1]), headers=user).json()["bundle"] == \
            swapped.json()["bundle_id"]


def test_one_reload_at_a_time(tiny):
    import asyncio

    from service.app import create_app
    from test_service import settings

    gate = threading.Event()

    async def scenario():
        app = create_app(settings(tiny.bundle, admin_bundle_root=tiny.bundle.parent, admin_api_keys=ADMIN_KEY))
        service = app.state.service
        real = service.load_candidate

        def gated(folder):
            gate.wait(30)
            return real(folder)

        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://guard", timeout=60) as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
                service.load_candidate = gated
                first = asyncio.create_task(client.post("/v1/admin/bundle", json={"path": "strict"}, headers=ADMIN))
                while not service.reloader.busy:
                    await asyncio.sleep(0.01)
                second = await client.post("/v1/admin/bundle", json={"path": "strict"}, headers=ADMIN)
                served = await client.post("/predict", files=multipart(tiny.files[:1]))  # still serving meanwhile
                gate.set()
                return await first, second, served, (await client.get("/metrics")).text

    first, second, served, text = asyncio.run(scenario())
    assert first.status_code == 200 and second.status_code == 409 and second.json()["error"] == "reload_in_progress"
    assert served.status_code == 200 and served.json()["bundle"] == first.json()["previous_bundle_id"]
    assert 'badexpert_bundle_reloads_total{outcome="busy"} 1.0' in text
    assert 'badexpert_bundle_reloads_total{outcome="success"} 1.0' in text


def test_a_candidate_refused_by_the_startup_checks_leaves_the_old_bundle_serving(tiny, tmp_path):
    """Unsigned (with a verify key) and a non-allowlisted factory architecture: the same checks as at startup."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from defense.bundle import load_bundle, save_bundle
    from defense.models.loading import ModelSpec
    from test_service import edited_copy, serving

    private = Ed25519PrivateKey.generate()
    (tmp_path / "verify.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    root = tmp_path / "bundles"
    guard, _ = load_bundle(tiny.bundle)
    document = json.loads((tiny.bundle / "manifest.json").read_text())
    fields = {key: document[key] for key in ("created_at", "class_names", "num_classes", "target_fpr", "threshold",
                                             "calibration", "accuracy_on_selection", "backdoor_expert",
                                             "auxiliary_model", "settings", "build_seconds")}
    save_bundle(root / "signed", guard, ModelSpec("registry", "tiny_cnn", 3), fields, sign_key=private)
    shutil.copytree(tiny.strict, root / "unsigned")
    edited_copy(tiny.bundle, root / "factory", lambda d: d["architecture"].update(kind="factory", name="os:getpid"))
    servers = ((root / "signed", {"verify_key": tmp_path / "verify.pem"}, "unsigned", "not signed"),
               (tiny.bundle, {}, "factory", "BADEXPERT_ALLOW_FACTORY_MODULES"))
    for bundle, options, candidate, reason in servers:
        with serving(bundle, admin_bundle_root=root, admin_api_keys=ADMIN_KEY, **options) as client:
            running = client.get("/v1/info").json()["bundle_id"]
            refused = client.post("/v1/admin/bundle", json={"path": candidate}, headers=ADMIN)
            assert refused.status_code == 422 and reason in refused.json()["detail"], refused.json()
            assert client.post("/predict", files=multipart(tiny.files[:1])).json()["bundle"] == running
            assert 'badexpert_bundle_reloads_total{outcome="failure"} 1.0' in client.get("/metrics").text
            assert client.get("/v1/info").json()["bundle_id"] == running
