"""The guard server (service/): HTTP API, batching, metrics, audit log, bad input, shadow mode,
overload, readiness, a real `badexpert serve` process, and no train/serve skew.

Everything runs on the CPU against tiny bundles built once per session (a few seconds).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from defense.build import BuildConfig, build_guard
from defense.bundle import load_bundle, save_bundle
from badexpert.main import main as badexpert_main
from defense.data import ImageSet
from defense.models import create_model
from defense.models.loading import ModelSpec
from defense.preprocessing import Preprocessing
from service.app import create_app
from service.batcher import MicroBatcher, Overloaded, ShuttingDown
from service.metrics import score_buckets
from service.schemas import PredictResponse
from service.settings import ServiceSettings
from live_server import wait_until_ready
from synthetic import fit, threshold_at

CLASS_NAMES = ["red", "green", "blue"]
SIZE = 16


@dataclass
class Tiny:
    bundle: Path  # calibrated tau (a low-FPR threshold: on these samples, likely nothing is flagged)
    strict: Path  # the same models with tau set between the samples' scores: some are flagged
    strict_tau: float
    files: list[Path]  # sample image files: PNG, JPEG, odd sizes, grey, RGBA, an EXIF-rotated JPEG
    scores: torch.Tensor  # offline scores of `files`: the bundle's guard on Preprocessing.load(file)
    labels: torch.Tensor
    confidences: torch.Tensor


def synthetic_images(count_per_class: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label in range(len(CLASS_NAMES)):
        # Faint colour cues under heavy noise: the tiny models stay unsure, so scores spread out and
        # move with every pixel (a saturated model would score ~2 whatever the preprocessing).
        base = torch.full((count_per_class, 3, SIZE, SIZE), 100.0)
        base[:, label] = 140.0
        noise = torch.randint(-80, 80, base.shape, generator=generator).float()
        images.append((base + noise).clamp(0, 255).to(torch.uint8))
        labels.append(torch.full((count_per_class,), label))
    return torch.cat(images), torch.cat(labels)


def write_samples(folder: Path, generator: torch.Generator) -> list[Path]:
    folder.mkdir()
    images, _ = synthetic_images(3, generator)
    files = []
    for index, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()
        path = folder / f"sample_{index}.png"
        picture = Image.fromarray(array)
        if index == 1:
            picture = picture.resize((28, 20))  # resized by the preprocessing
        if index == 2:
            picture = picture.convert("L")  # grey: converted to RGB
        if index == 3:
            picture = picture.convert("RGBA")
        if index in (4, 5):
            path = path.with_suffix(".jpg")
            exif = Image.Exif()
            if index == 5:
                exif[0x0112] = 6  # EXIF orientation: rotate on load
                picture = picture.resize((SIZE, SIZE + 8))
            picture.save(path, quality=90, exif=exif)
        else:
            picture.save(path)
        files.append(path)
    return files


# The `tiny` fixture (session-scoped, in tests/conftest.py: shared with tests/test_fuzz_openapi.py)
# is build_tiny() below, built once per session.


def build_tiny(root: Path) -> Tiny:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    preprocessing = Preprocessing(input_size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images, labels = synthetic_images(40, generator)
    model = create_model("tiny_cnn", num_classes=3)
    normalizer = preprocessing.normalizer()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    fit(model, images, labels, normalizer, optimizer, epochs=2, batch_size=20, generator=generator)
    clean = ImageSet(images, labels, CLASS_NAMES, [Path(f"{i}.png") for i in range(len(labels))])
    config = BuildConfig(calibration_fraction=0.5, fpr=0.1, threshold_rule="conformal", unlearn_lr=5e-3,
                         unlearn_batch_size=32, finetune_lr=0.01, finetune_epochs=2, finetune_milestones=(1,),
                         finetune_batch_size=32, progress=False, device="cpu")
    result = build_guard(model.eval(), clean, preprocessing, 3, config, log=lambda *args: None)
    spec = ModelSpec("registry", "tiny_cnn", 3)
    save_bundle(root / "bundle", result.guard, spec, result.manifest_fields)

    files = write_samples(root / "samples", generator)
    guard, _ = load_bundle(root / "bundle", "cpu")
    offline = guard.score(torch.stack([guard.preprocessing.load(path) for path in files]))
    assert offline.score.max() > 1.5 * offline.score.min(), "the fixture's scores must spread out"
    ordered = offline.score.sort().values
    # strict: a threshold between two samples' scores that flags more of them than the calibrated one
    live_flagged = int((offline.score < guard.rejection_threshold).sum())
    middle = min(len(ordered) - 1, max(len(ordered) // 2, live_flagged + max(1, (len(ordered) - live_flagged) // 2)))
    assert ordered[middle - 1] < ordered[middle], "the samples need distinct scores"
    strict_tau = float((ordered[middle - 1] + ordered[middle]) / 2)
    guard.rejection_threshold = strict_tau
    fields = threshold_at(copy.deepcopy(result.manifest_fields), strict_tau, offline.score)
    save_bundle(root / "strict", guard, spec, fields)
    return Tiny(root / "bundle", root / "strict", strict_tau, files, offline.score, offline.label, offline.confidence)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("BADEXPERT_"):
            monkeypatch.delenv(name)


def settings(bundle: Path, **overrides) -> ServiceSettings:
    values = {"bundle": bundle, "device": "cpu", "max_batch_size": 8, "max_wait_ms": 1.0, **overrides}
    return ServiceSettings(**values)


def wait_ready(client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout} s: {client.get('/readyz').json()}")


@contextmanager
def serving(bundle: Path, **overrides):
    app = create_app(settings(bundle, **overrides))
    with TestClient(app) as client:
        wait_ready(client)
        yield client


def multipart(paths) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def metrics(client) -> dict[tuple[str, frozenset], float]:
    text = client.get("/metrics").text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(snapshot, name: str, **labels) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


# ----- predictions --------------------------------------------------------------------------------


def test_served_scores_equal_offline_scores_for_both_body_forms(tiny):
    """No train/serve skew: the server's scores are guard.score on Preprocessing.load of the same files."""
    with serving(tiny.bundle) as client:
        by_multipart = client.post("/predict", files=multipart(tiny.files))
        images = [b64(path) for path in tiny.files]
        images[0] = "data:image/png;base64," + images[0]
        by_json = client.post("/predict", json={"images": images})
        one_by_one = [client.post("/predict", files=multipart([path])).json()["predictions"][0]["score"]
                      for path in tiny.files]
    for response in (by_multipart, by_json):
        assert response.status_code == 200, response.text
        body = PredictResponse.model_validate(response.json())
        assert body.mode == "enforce" and len(body.predictions) == len(tiny.files)
        assert [p.index for p in body.predictions] == list(range(len(tiny.files)))
        served = torch.tensor([p.score for p in body.predictions], dtype=torch.float64)
        assert torch.allclose(served, tiny.scores.double(), rtol=1e-5, atol=1e-5), (served, tiny.scores)
        for prediction, label, confidence in zip(body.predictions, tiny.labels, tiny.confidences):
            if not prediction.rejected:
                assert prediction.label == int(label) and prediction.class_name == CLASS_NAMES[int(label)]
                assert prediction.confidence == pytest.approx(float(confidence), abs=1e-5)
    assert torch.allclose(torch.tensor(one_by_one, dtype=torch.float64), tiny.scores.double(), rtol=1e-5, atol=1e-5)


def test_rejection_semantics(tiny):
    expected = tiny.scores < tiny.strict_tau
    assert 0 < int(expected.sum()) < len(tiny.files)
    with serving(tiny.strict) as client:
        body = client.post("/predict", files=multipart(tiny.files)).json()
    assert body["threshold"] == pytest.approx(tiny.strict_tau)
    for prediction, flagged, label in zip(body["predictions"], expected.tolist(), tiny.labels.tolist()):
        assert prediction["rejected"] is flagged and prediction["flagged"] is flagged
        assert isinstance(prediction["score"], float)
        if flagged:  # the guard does not hand out the backdoor's answer
            assert prediction["label"] is None and prediction["class_name"] is None and prediction["confidence"] is None
        else:
            assert prediction["label"] == label and prediction["class_name"] == CLASS_NAMES[label]
    with serving(tiny.strict, reveal_rejected=True) as client:
        revealed = client.post("/predict", files=multipart(tiny.files)).json()["predictions"]
    assert [p["rejected"] for p in revealed] == expected.tolist()
    assert [p["label"] for p in revealed] == tiny.labels.tolist()


def test_shadow_mode_rejects_nothing_but_flags_counts_and_audits(tiny, tmp_path):
    expected = tiny.scores < tiny.strict_tau
    audit = tmp_path / "audit.jsonl"
    with serving(tiny.strict, mode="shadow", audit_log=audit) as client:
        before = metrics(client)
        body = client.post("/predict", files=multipart(tiny.files)).json()
        after = metrics(client)
    assert body["mode"] == "shadow"
    assert [p["rejected"] for p in body["predictions"]] == [False] * len(tiny.files)
    assert [p["flagged"] for p in body["predictions"]] == expected.tolist()
    assert [p["label"] for p in body["predictions"]] == tiny.labels.tolist()
    flagged = int(expected.sum())
    assert value(after, "badexpert_inputs_total", decision="rejected") - value(before, "badexpert_inputs_total", decision="rejected") == flagged
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [line["index"] for line in lines] == expected.nonzero().flatten().tolist()
    assert all(line["mode"] == "shadow" for line in lines)
    assert value(after, "badexpert_bundle_info", bundle_id=body["bundle"], tau=repr(tiny.strict_tau),
                 target_fpr="0.1", mode="shadow") == 1.0


def test_concurrent_requests_are_coalesced_and_a_large_request_is_one_batch(tiny):
    async def scenario():
        app = create_app(settings(tiny.bundle, max_batch_size=4, max_wait_ms=2000))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard") as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
                batcher = app.state.service.batcher
                infer, calls = batcher._infer, []

                def slow_first_forward(images, *bundle):  # the four singles queue up while the first forward runs
                    calls.append(len(images))
                    deadline = time.monotonic() + 10
                    while len(calls) == 1 and batcher.queued_images < 4 and time.monotonic() < deadline:
                        time.sleep(0.005)
                    return infer(images, *bundle)

                batcher._infer = slow_first_forward
                started = time.monotonic()
                first = asyncio.create_task(client.post("/predict", files=multipart(tiny.files[4:5])))
                while not calls:
                    await asyncio.sleep(0.005)
                singles = await asyncio.gather(*(client.post("/predict", files=multipart([path]))
                                                 for path in tiny.files[:4]))
                await first
                waited = time.monotonic() - started
                large = await client.post("/predict", files=multipart(tiny.files))  # 9 images > max_batch_size 4
                return singles, large, waited, calls, metrics_text(await client.get("/metrics"))

    def metrics_text(response):
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(response.text) for s in f.samples}

    singles, large, waited, calls, snapshot = asyncio.run(scenario())
    assert all(response.status_code == 200 for response in singles) and large.status_code == 200
    assert waited < 2.0, "neither the idle server's first request nor a full batch waits for max_wait_ms"
    assert calls == [1, 4, len(tiny.files)]  # the first alone at once, the four queued behind it as one batch
    assert value(snapshot, "badexpert_batch_size_count") == 3
    assert value(snapshot, "badexpert_batch_size_sum") == 1 + 4 + len(tiny.files)
    assert value(snapshot, "badexpert_batch_size_bucket", le="4.0") == 2
    served = torch.tensor([r.json()["predictions"][0]["score"] for r in singles] +
                          [p["score"] for p in large.json()["predictions"]], dtype=torch.float64)
    offline = torch.cat([tiny.scores[:4], tiny.scores]).double()
    assert torch.allclose(served, offline, rtol=1e-5, atol=1e-5)


def test_a_lone_request_on_an_idle_server_does_not_wait_for_max_wait_ms(tiny):
    with serving(tiny.bundle, max_wait_ms=3000) as client:
        started = time.monotonic()
        assert client.post("/predict", files=multipart(tiny.files[:1])).status_code == 200
        assert time.monotonic() - started < 2.0


# ----- metrics ------------------------------------------------------------------------------------


def test_metrics_exist_from_startup_and_move_by_exact_amounts(tiny):
    expected = (tiny.scores < tiny.strict_tau).tolist()
    with serving(tiny.strict) as client:
        bundle_id = client.get("/v1/info").json()["bundle_id"]
        before = metrics(client)
        for decision in ("accepted", "rejected"):  # both series exist before any input
            assert ("badexpert_inputs_total", frozenset({("decision", decision)})) in before
        for name in ("badexpert_overload_total", "badexpert_queue_depth", "badexpert_score_count",
                     "badexpert_batch_size_count", "badexpert_request_duration_seconds_count"):
            assert (name, frozenset()) in before, name
        assert value(before, "badexpert_bundle_info", bundle_id=bundle_id,
                     tau=repr(tiny.strict_tau), target_fpr="0.1", mode="enforce") == 1.0
        for label, name in enumerate(CLASS_NAMES):
            assert ("badexpert_rejected_by_class_total",
                    frozenset({("predicted_class", str(label)), ("class_name", name)})) in before
        client.post("/predict", files=multipart(tiny.files))
        client.post("/predict", content=b"nonsense", headers={"content-type": "text/plain"})
        after = metrics(client)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    rejected = sum(expected)
    assert delta("badexpert_inputs_total", decision="rejected") == rejected
    assert delta("badexpert_inputs_total", decision="accepted") == len(expected) - rejected
    for label, name in enumerate(CLASS_NAMES):
        count = sum(1 for flag, y in zip(expected, tiny.labels.tolist()) if flag and y == label)
        assert delta("badexpert_rejected_by_class_total", predicted_class=str(label), class_name=name) == count
    assert delta("badexpert_score_count") == len(expected)
    assert delta("badexpert_score_sum") == pytest.approx(float(tiny.scores.double().sum()), rel=1e-5)
    below_tau = [bound for (name, labels), _ in after.items() if name == "badexpert_score_bucket"
                 for key, bound in labels if key == "le" and bound != "+Inf" and float(bound) == tiny.strict_tau]
    assert below_tau, "tau is a bucket bound"
    assert delta("badexpert_score_bucket", le=below_tau[0]) == sum(1 for s in tiny.scores.tolist() if s <= tiny.strict_tau)
    assert delta("badexpert_batch_size_count") == 1 and delta("badexpert_batch_size_sum") == len(expected)
    assert delta("badexpert_request_duration_seconds_count") == 2
    assert delta("badexpert_http_requests_total", status="415") == 1
    assert delta("badexpert_http_requests_total", status="200") == 2  # the POST and the first scrape
    assert delta("badexpert_overload_total") == 0
    assert value(after, "badexpert_queue_depth") == 0


def test_score_buckets_are_dense_around_tau():
    tau = 0.37
    bounds = score_buckets(tau)
    assert tau in bounds and bounds == sorted(set(bounds)) and bounds[0] == 0.0
    assert sum(1 for b in bounds if 0.8 * tau <= b <= 1.25 * tau) >= 10
    assert sum(1 for b in bounds if b > 3 * tau) <= 4
    for odd in (0.0, -1.0, math.nan, math.inf):
        assert score_buckets(odd) == sorted(set(score_buckets(odd)))


# ----- bad input ----------------------------------------------------------------------------------


def noise_png(width: int, height: int) -> bytes:
    generator = torch.Generator().manual_seed(width * 1000 + height)
    array = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_input_gets_4xx_json_and_the_server_stays_up(tiny):
    big_bytes = noise_png(90, 90)  # ~24 KB of incompressible pixels
    many_pixels = noise_png(120, 100)  # 12,000 pixels, small file
    assert len(big_bytes) > 20_000 and len(many_pixels) < 50_000
    good = tiny.files[0].read_bytes()
    png = lambda data: ("file", ("x.png", data, "image/png"))  # noqa: E731
    cases = [
        # (name, request kwargs, status, error code)
        ("json: empty list", {"json": {"images": []}}, 400, "no_image"),
        ("multipart: no part named file", {"files": [("other", ("x.png", good, "image/png"))]}, 400, "no_image"),
        ("multipart: undecodable", {"files": [png(good), png(b"this is not an image")]}, 422, "undecodable_image"),
        ("json: undecodable", {"json": {"images": [base64.b64encode(b"GIF89a broken").decode()]}}, 422, "undecodable_image"),
        ("json: truncated png", {"json": {"images": [base64.b64encode(good[: len(good) // 2]).decode()]}}, 422, "undecodable_image"),
        ("text/plain", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        ("no content type", {"content": b"hello"}, 415, "unsupported_media_type"),
        ("form-urlencoded", {"data": {"file": "x"}}, 415, "unsupported_media_type"),
        ("multipart: too many bytes", {"files": [png(big_bytes)]}, 413, "image_too_large"),
        ("json: too many bytes", {"json": {"images": [base64.b64encode(big_bytes).decode()]}}, 413, "image_too_large"),
        ("multipart: too many pixels", {"files": [png(many_pixels)]}, 413, "image_too_large"),
        ("json: too many pixels", {"json": {"images": [base64.b64encode(many_pixels).decode()]}}, 413, "image_too_large"),
        ("multipart: too many images", {"files": [png(good)] * 4}, 413, "too_many_images"),
        ("json: too many images", {"json": {"images": [base64.b64encode(good).decode()] * 4}}, 413, "too_many_images"),
        ("request over the byte limit", {"content": b"{" + b" " * 70_000 + b"}",
                                         "headers": {"content-type": "application/json"}}, 413, "request_too_large"),
        ("chunked body over the byte limit", {"content": iter([b" " * 40_000] * 2),
                                              "headers": {"content-type": "application/json"}}, 413, "request_too_large"),
        ("malformed json", {"content": b'{"images": [', "headers": {"content-type": "application/json"}}, 422, "malformed_json"),
        ("empty json body", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "malformed_json"),
        ("json: not an object", {"json": ["abc"]}, 422, "malformed_json"),
        ("json: images not a list", {"json": {"images": "abc"}}, 422, "malformed_json"),
        ("json: image not a string", {"json": {"images": [123]}}, 422, "malformed_json"),
        ("json: malformed base64", {"json": {"images": ["%%%not base64%%%"]}}, 422, "malformed_base64"),
        ("json: bad data url", {"json": {"images": ["data:image/png," + base64.b64encode(good).decode()]}}, 422, "malformed_base64"),
        ("multipart: no boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 422, "malformed_body"),
    ]
    with serving(tiny.bundle, max_image_bytes=20_000, max_request_bytes=60_000, max_pixels=10_000,
                 max_images_per_request=3) as client:
        for name, kwargs, status, code in cases:
            response = client.post("/predict", **kwargs)
            assert response.status_code == status, (name, response.status_code, response.text)
            body = response.json()
            assert body["error"] == code and body["detail"], (name, body)
        assert client.post("/predict", files=[png(good), png(b"junk")]).json()["index"] == 1
        assert client.post("/predict", files=multipart(tiny.files[:3])).status_code == 200
        assert client.get("/nope").status_code == 404 and client.get("/predict").status_code == 405
        after = metrics(client)
    assert value(after, "badexpert_http_requests_total", status="500") == 0
    assert value(after, "badexpert_inputs_total", decision="accepted") + \
        value(after, "badexpert_inputs_total", decision="rejected") == 3  # only the good request was scored


def test_content_length_is_checked_before_the_body_is_read(tiny):
    async def scenario():
        app = create_app(settings(tiny.bundle, max_request_bytes=1000, max_image_bytes=1000))
        async with app.router.lifespan_context(app):
            while app.state.service.state != "ready":
                await asyncio.sleep(0.01)
            received = []

            async def receive():  # a client that announces 10 MB and would send them slowly
                received.append(1)
                await asyncio.sleep(0.01)
                return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

            messages = []

            async def send(message):
                messages.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
                     "root_path": "", "server": ("guard", 80), "client": ("127.0.0.1", 1),
                     "headers": [(b"content-type", b"application/json"), (b"content-length", b"10000000")]}
            await app(scope, receive, send)
            return received, messages

    received, messages = asyncio.run(scenario())
    assert messages[0]["status"] == 413 and not received


# ----- overload, shutdown, readiness --------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after_at_once(tiny):
    entered, release = threading.Event(), threading.Event()

    async def scenario():
        app = create_app(settings(tiny.bundle, max_batch_size=1, max_queue=1, max_images_per_request=1,
                                  retry_after_s=7))
        service = app.state.service
        armed = []
        real_infer = service.infer

        def gated_infer(images, *bundle):
            if armed:
                entered.set()
                release.wait(30)
            return real_infer(images, *bundle)

        service.infer = gated_infer
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://guard") as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
                armed.append(True)
                try:
                    first = asyncio.create_task(client.post("/predict", files=multipart(tiny.files[:1])))
                    while not entered.is_set():  # the first request is in the model
                        await asyncio.sleep(0.01)
                    second = asyncio.create_task(client.post("/predict", files=multipart(tiny.files[1:2])))
                    while service.batcher.queued_images < 1:  # the second waits in the queue
                        await asyncio.sleep(0.01)
                    during = await client.get("/metrics")
                    started = time.monotonic()
                    third = await client.post("/predict", files=multipart(tiny.files[2:3]))
                    refused_in = time.monotonic() - started
                finally:
                    release.set()
                answers = [await first, await second]
                after = await client.get("/metrics")
                return answers, third, refused_in, during.text, after.text

    def parse(text):
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    answers, third, refused_in, during, after = asyncio.run(scenario())
    assert third.status_code == 503 and third.headers["retry-after"] == "7"
    assert third.json()["error"] == "overloaded" and refused_in < 1.0
    assert [a.status_code for a in answers] == [200, 200]
    during, after = parse(during), parse(after)
    assert value(during, "badexpert_queue_depth") == 1
    assert value(after, "badexpert_overload_total") == 1
    assert value(after, "badexpert_http_requests_total", status="503") - \
        value(during, "badexpert_http_requests_total", status="503") == 1  # (earlier 503s: /readyz while loading)
    assert value(after, "badexpert_inputs_total", decision="accepted") + \
        value(after, "badexpert_inputs_total", decision="rejected") == 2  # the refused image was never scored


def test_batcher_close_finishes_queued_work_and_refuses_new_work():
    calls = []

    def infer(images, *context):  # context: the group and the cores
        calls.append(len(images))
        time.sleep(0.05)
        from defense.score import guard_scores
        logits = images.float().flatten(1)[:, :3]
        return guard_scores(logits, logits, logits)

    async def scenario():
        batcher = MicroBatcher(infer, max_batch_size=2, max_wait_ms=0, max_queue=10)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(torch.full((1, 3, 2, 2), i, dtype=torch.uint8))) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        with pytest.raises(ShuttingDown):
            await batcher.submit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert len(results) == 5 and sum(calls) == 5 and max(calls) <= 2
    assert [int(r.label.numel()) for r in results] == [1] * 5

    async def overload():
        batcher = MicroBatcher(infer, max_batch_size=1, max_wait_ms=0, max_queue=1)
        batcher.start()
        first = asyncio.create_task(batcher.submit(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)))
        with pytest.raises(Overloaded):
            await batcher.submit(torch.zeros(2, 3, 2, 2, dtype=torch.uint8))
        await first
        await batcher.close()

    asyncio.run(overload())


def test_readiness_before_during_and_after_loading(tiny, tmp_path):
    app = create_app(settings(tiny.bundle))
    gate = threading.Event()
    service = app.state.service
    real_load = service.load

    def gated_load():
        gate.wait(30)
        real_load()

    service.load = gated_load
    raw = TestClient(app)  # not entered: the lifespan has not run, nothing is loaded
    assert raw.get("/healthz").status_code == 200
    assert raw.get("/readyz").status_code == 503
    with TestClient(app) as client:
        try:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            assert client.get("/healthz").json() == {"status": "ok"}
            refused = client.post("/predict", files=multipart(tiny.files[:1]))
            assert refused.status_code == 503 and refused.json()["error"] == "not_ready" and "retry-after" in refused.headers
            assert client.get("/v1/info").status_code == 503
        finally:
            gate.set()
        wait_ready(client)
        assert client.get("/readyz").json()["ready"] is True
        info = client.get("/v1/info").json()
        assert info["class_names"] == CLASS_NAMES and info["input_size"] == [SIZE, SIZE]
        assert info["threshold"] == pytest.approx(float(load_bundle(tiny.bundle)[1].rejection_threshold))
        assert info["target_fpr"] == 0.1 and info["mode"] == "enforce" and "torch" in info["versions"]["server"]
        assert info["self_test"]["mode"] == "report" and "canary" in info["self_test"]["summary"]
        assert "does not measure the unknown backdoor" in info["self_test"]["promise"]
        assert client.post("/predict", files=multipart(tiny.files[:1])).status_code == 200

    # A bundle whose weights do not match their hashes never becomes ready.
    broken = tmp_path / "broken"
    shutil.copytree(tiny.bundle, broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with TestClient(create_app(settings(broken))) as client:
        deadline = time.monotonic() + 30
        while client.get("/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed" and "sha256" in ready.json()["detail"]
        assert client.get("/healthz").status_code == 503
        assert client.post("/predict", files=multipart(tiny.files[:1])).status_code == 503


def test_openapi_documents_both_body_forms(tiny):
    with serving(tiny.bundle) as client:
        assert client.get("/docs").status_code == 200
        spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    assert "PredictResponse" in json.dumps(spec["paths"]["/predict"]["post"]["responses"]["200"])


def test_openapi_documents_every_status_the_endpoints_send(tiny):
    # Found by tests/test_fuzz_openapi.py: with API keys, /v1/info (and /metrics with protect_metrics)
    # answered an undocumented 401; /healthz answers 503 once loading failed.
    with serving(tiny.bundle) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"200", "401", "503"} <= set(paths["/v1/info"]["get"]["responses"])
    assert {"200", "401"} <= set(paths["/metrics"]["get"]["responses"])
    assert {"200", "503"} <= set(paths["/healthz"]["get"]["responses"])
    assert {"200", "401", "413", "422", "503"} <= set(paths["/predict"]["post"]["responses"])


# ----- audit log ----------------------------------------------------------------------------------


def test_audit_log_and_quarantine_are_on_disk_before_the_response(tiny, tmp_path, monkeypatch):
    expected = (tiny.scores < tiny.strict_tau).tolist()
    audit, quarantine = tmp_path / "logs" / "audit.jsonl", tmp_path / "quarantine"
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with serving(tiny.strict, audit_log=audit, quarantine_dir=quarantine) as client:
        response = client.post("/predict", files=multipart(tiny.files), headers={"X-Request-ID": "req-42"})
        server_id = response.headers["x-request-id"]  # the server's own id; the client's is kept beside it
        assert server_id != "req-42" and response.headers["x-client-request-id"] == "req-42"
        lines = [json.loads(line) for line in audit.read_text().splitlines()]  # read before the server stops
        assert str(audit.resolve()) in synced
        other = client.post("/predict", files=multipart(tiny.files))
    flagged = [i for i, flag in enumerate(expected) if flag]
    assert [line["index"] for line in lines] == flagged
    for line, index in zip(lines, flagged):
        data = tiny.files[index].read_bytes()
        assert line["request_id"] == server_id and line["client_request_id"] == "req-42"
        assert 0 <= line["b"] <= 1 and 0 <= line["a"] <= 1 and line["quarantined"] == "original"
        assert line["sha256"] == hashlib.sha256(data).hexdigest()
        assert line["predicted_class"] == int(tiny.labels[index]) and line["class_name"] == CLASS_NAMES[line["predicted_class"]]
        assert line["score"] == pytest.approx(float(tiny.scores[index]), rel=1e-5, abs=1e-5)
        assert line["tau"] == pytest.approx(tiny.strict_tau) and line["mode"] == "enforce"
        assert datetime.fromisoformat(line["time"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
        assert (quarantine / line["quarantine_file"]).read_bytes() == data
    assert len(audit.read_text().splitlines()) == 2 * len(flagged)  # the second request appended its own lines
    generated = other.headers["x-request-id"]
    assert generated != server_id and json.loads(audit.read_text().splitlines()[-1])["request_id"] == generated
    assert sorted(p.name for p in quarantine.iterdir()) == sorted({line["sha256"] for line in lines})


# ----- the command line ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def badexpert_command() -> list[str]:
    """This checkout's command: an installed ``badexpert`` script may run another checkout's code
    (an editable install made elsewhere). tests/test_layout.py checks the script's entry point."""
    return [sys.executable, "-m", "badexpert"]


def test_real_badexpert_serve_process(tiny, tmp_path):
    port = free_port()
    environment = {**os.environ, "BADEXPERT_MAX_IMAGES_PER_REQUEST": "2", "BADEXPERT_MODE": "shadow"}
    process = subprocess.Popen(
        badexpert_command() + ["serve", str(tiny.strict), "--port", str(port), "--device", "cpu", "--mode", "enforce",
                               "--audit-log", str(tmp_path / "audit.jsonl"), "--no-access-log"],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, process.stdout.read)
        assert httpx.get(base + "/healthz").json() == {"status": "ok"}
        response = httpx.post(base + "/predict", files=multipart(tiny.files[:2]))
        assert response.status_code == 200
        body = response.json()
        assert body["mode"] == "enforce"  # the flag wins over BADEXPERT_MODE
        served = torch.tensor([p["score"] for p in body["predictions"]], dtype=torch.float64)
        assert torch.allclose(served, tiny.scores[:2].double(), rtol=1e-5, atol=1e-5)
        assert [p["rejected"] for p in body["predictions"]] == (tiny.scores[:2] < tiny.strict_tau).tolist()
        too_many = httpx.post(base + "/predict", files=multipart(tiny.files[:3]))  # BADEXPERT_MAX_IMAGES_PER_REQUEST=2
        assert too_many.status_code == 413
        text = httpx.get(base + "/metrics").text
        assert 'badexpert_inputs_total{decision="accepted"}' in text and "badexpert_bundle_info{" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_command_line_errors(tmp_path, capsys, monkeypatch):
    assert badexpert_main(["serve", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert badexpert_main(["serve"]) == 2
    assert "BADEXPERT_BUNDLE" in capsys.readouterr().err
    monkeypatch.setenv("BADEXPERT_MAX_BATCH_SIZE", "many")
    assert badexpert_main(["serve", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("badexpert: error: --max-batch-size / BADEXPERT_MAX_BATCH_SIZE") and "\n" not in error
    monkeypatch.delenv("BADEXPERT_MAX_BATCH_SIZE")
    assert badexpert_main(["serve", str(tmp_path), "--verify-key", str(tmp_path / "nope.pem")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("badexpert: error: --verify-key / BADEXPERT_VERIFY_KEY") and "nope.pem" in error
    monkeypatch.setenv("BADEXPERT_API_KEYS", "short")
    assert badexpert_main(["serve", str(tmp_path)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


# ----- hardening (issue 15): bundle trust, readiness, access, audit, bounded work ---------------------


def edited_copy(source: Path, target: Path, change, redigest: bool = True) -> Path:
    """A copy of a bundle whose manifest was edited (with its digest recomputed, as an attacker who
    read the code would)."""
    from defense.bundle_trust import content_digest

    shutil.copytree(source, target)
    document = json.loads((target / "manifest.json").read_text())
    change(document)
    if redigest:
        digest = content_digest(document)
        document["content_sha256"], document["bundle_id"] = digest, digest[:16]
    (target / "manifest.json").write_text(json.dumps(document))
    return target


def wait_settled(client, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while client.get("/readyz").json()["status"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.02)
    return client.get("/readyz")


def test_a_nan_threshold_never_reaches_ready(tiny, tmp_path):
    bare = edited_copy(tiny.bundle, tmp_path / "bare", lambda d: d.update(rejection_threshold=math.nan), redigest=False)
    quoted = edited_copy(tiny.bundle, tmp_path / "quoted", lambda d: d.update(rejection_threshold="NaN"))
    for bundle, reason in ((bare, "not valid JSON"), (quoted, "not a finite number")):
        with TestClient(create_app(settings(bundle))) as client:
            ready = wait_settled(client)
            assert ready.status_code == 503 and ready.json()["status"] == "failed" and reason in ready.json()["detail"]
            refused = client.post("/predict", files=multipart(tiny.files[:1]))
            assert refused.status_code == 503 and refused.json()["error"] == "not_ready"
            assert client.get("/v1/info").status_code == 503
            assert value(metrics(client), "badexpert_http_requests_total", status="500") == 0


def test_an_edited_or_unsigned_bundle_is_refused_by_serve(tiny, tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    edited = edited_copy(tiny.bundle, tmp_path / "edited", lambda d: d.update(rejection_threshold=-1.0), redigest=False)
    assert badexpert_main(["serve", str(edited), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert "manifest.json does not match its digest" in error and "\n" not in error

    private = Ed25519PrivateKey.generate()
    (tmp_path / "verify.pem").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    guard, _ = load_bundle(tiny.bundle)
    signed_fields = json.loads((tiny.bundle / "manifest.json").read_text())
    fields = {key: signed_fields[key] for key in ("created_at", "class_names", "num_classes", "target_fpr", "threshold",
                                                  "calibration", "accuracy_on_selection", "backdoor_expert",
                                                  "auxiliary_model", "settings", "build_seconds")}
    save_bundle(tmp_path / "signed", guard, ModelSpec("registry", "tiny_cnn", 3), fields, sign_key=private)
    with serving(tmp_path / "signed", verify_key=tmp_path / "verify.pem") as client:
        assert client.post("/predict", files=multipart(tiny.files[:1])).status_code == 200
    with TestClient(create_app(settings(tiny.bundle, verify_key=tmp_path / "verify.pem"))) as client:
        ready = wait_settled(client)
        assert ready.status_code == 503 and "not signed" in ready.json()["detail"]
    factory = edited_copy(tiny.bundle, tmp_path / "factory", lambda d: d["architecture"].update(kind="factory",
                                                                                                  name="os:getpid"))
    with TestClient(create_app(settings(factory))) as client:
        ready = wait_settled(client)
        assert ready.status_code == 503 and "BADEXPERT_ALLOW_FACTORY_MODULES" in ready.json()["detail"]


def test_a_full_or_failing_disk_gives_503_and_not_ready(tiny, tmp_path, monkeypatch):
    import errno

    import service.audit

    audit = tmp_path / "audit.jsonl"
    with serving(tiny.strict, audit_log=audit) as client:
        service_ = client.app.state.service
        flagged_file = tiny.files[int(tiny.scores.argmin())]
        clean_file = tiny.files[int(tiny.scores.argmax())]
        assert client.post("/predict", files=multipart([flagged_file])).status_code == 200
        size = audit.stat().st_size
        real_fsync = os.fsync

        def full_disk(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full_disk)  # the bytes were written, then the disk refused
        refused = client.post("/predict", files=multipart([flagged_file]))
        assert refused.status_code == 503 and refused.json()["error"] == "audit_unavailable"
        assert audit.stat().st_size == size, "the failed write left a torn line"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "audit_unavailable"
        assert "No space left" in ready.json()["detail"]
        assert client.post("/predict", files=multipart([clean_file])).json()["error"] == "not_ready"
        monkeypatch.setattr(os, "fsync", real_fsync)
        monkeypatch.setattr(service.audit, "FAILURE_RETRY_S", 0.0)
        wait_ready(client, timeout=5)
        assert client.post("/predict", files=multipart([flagged_file])).status_code == 200
        # Too little free space: not ready before anything fails.
        service_.audit.min_free_bytes = 1 << 62
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "bytes free" in ready.json()["detail"]
        assert client.post("/predict", files=multipart([clean_file])).status_code == 503
        assert value(metrics(client), "badexpert_http_requests_total", status="500") == 0
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(lines) == 2


def test_duplicate_client_ids_keep_distinct_records(tiny, tmp_path):
    audit = tmp_path / "audit.jsonl"
    with serving(tiny.strict, audit_log=audit) as client:
        for _ in range(2):
            assert client.post("/predict", files=multipart(tiny.files), headers={"X-Request-ID": "same"}).status_code == 200
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    flagged = int((tiny.scores < tiny.strict_tau).sum())
    assert len(lines) == 2 * flagged and all(line["client_request_id"] == "same" for line in lines)
    assert len({(line["request_id"], line["index"]) for line in lines}) == len(lines)
    assert len({line["request_id"] for line in lines}) == 2


def test_api_keys_are_enforced_and_health_probes_stay_open(tiny):
    keys = "first-key-0123456789,second-key-0123456789"
    with serving(tiny.bundle, api_keys=keys) as client:
        post = lambda **headers: client.post("/predict", files=multipart(tiny.files[:1]), headers=headers)  # noqa: E731
        missing = post()
        assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert post(authorization="Bearer wrong-key-0123456789").status_code == 401
        assert post(authorization="Basic Zmlyc3Qta2V5LTAxMjM0NTY3ODk=").status_code == 401
        assert post(authorization="Bearer first-key-0123456789").status_code == 200
        assert post(**{"x-api-key": "second-key-0123456789"}).status_code == 200
        assert client.get("/v1/info").status_code == 401
        assert client.get("/v1/info", headers={"x-api-key": "first-key-0123456789"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 401  # protect_metrics is on by default
        assert client.get("/docs").status_code == 200
    with serving(tiny.bundle, api_keys=keys, protect_metrics=False) as client:  # a network policy guards it instead
        assert client.get("/metrics").status_code == 200
    with serving(tiny.bundle, api_keys=keys, protect_docs=True) as client:
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"x-api-key": "first-key-0123456789"}).status_code == 200, path
    with pytest.raises(ValueError, match="at least 16 characters"):
        settings(tiny.bundle, api_keys="short")


def test_decision_only_policy_leaks_no_score(tiny):
    with serving(tiny.strict, response_policy="decision_only") as client:
        response = client.post("/predict", files=multipart(tiny.files))
        info = client.get("/v1/info")
    body = response.json()
    assert response.status_code == 200 and "threshold" not in body
    assert all("score" not in p for p in body["predictions"])
    assert [p["flagged"] for p in body["predictions"]] == (tiny.scores < tiny.strict_tau).tolist()
    assert not {"alpha", "threshold", "calibration"} & set(info.json())
    assert info.json()["response_policy"] == "decision_only"
    tau_text = repr(tiny.strict_tau)[:8]
    assert tau_text not in response.text and tau_text not in info.text


def test_audit_chain_detects_deleted_and_edited_lines(tiny, tmp_path, capsys):
    audit = tmp_path / "audit.jsonl"
    audit.write_text('{"written": "before chaining"}\n')
    with serving(tiny.strict, audit_log=audit, audit_chain=True) as client:
        for _ in range(3):
            client.post("/predict", files=multipart(tiny.files))
    lines = audit.read_text().splitlines(keepends=True)
    assert len(lines) >= 4 and all("prev" in json.loads(line) for line in lines[1:])
    assert badexpert_main(["audit", "verify", str(audit)]) == 0
    out = capsys.readouterr().out
    assert "chain intact from line 2" in out
    head = out.strip().split()[-1]
    assert badexpert_main(["audit", "verify", str(audit), "--head", head]) == 0
    capsys.readouterr()

    def broken(text: str, *extra) -> str:
        changed = tmp_path / "changed.jsonl"
        changed.write_text(text)
        assert badexpert_main(["audit", "verify", str(changed), *extra]) == 1
        return capsys.readouterr().err

    assert "line 3: the chain breaks here" in broken("".join(lines[:2] + lines[3:]))  # a line deleted
    edited = json.loads(lines[2])
    edited["score"] = 123.0
    assert "line 4: the chain breaks here" in broken("".join(lines[:2] + [json.dumps(edited) + "\n"] + lines[3:]))
    assert "lines at the end were removed" in broken("".join(lines[:-1]), "--head", head)  # the tail cut
    assert "no chained line" in broken(lines[0])
    assert badexpert_main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2


def padded_png(data: bytes, padding: int) -> bytes:
    """The same picture with a private ancillary chunk of ``padding`` bytes before IEND."""
    import struct
    import zlib

    chunk_type, payload = b"prVt", b"\0" * padding
    chunk = struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk + data[end:]


def test_quarantine_caps_keep_the_resized_image_and_count_what_was_not_kept(tiny, tmp_path):
    audit, quarantine = tmp_path / "audit.jsonl", tmp_path / "quarantine"
    flagged_pngs = [path for path, score in zip(tiny.files, tiny.scores.tolist())
                    if score < tiny.strict_tau and path.suffix == ".png"]
    assert flagged_pngs, "the fixture needs a flagged PNG sample"
    padded = padded_png(flagged_pngs[0].read_bytes(), 40_000)  # a flagged image padded as an attacker would
    with serving(tiny.strict, audit_log=audit, quarantine_dir=quarantine, quarantine_max_image_bytes=5_000,
                 max_image_bytes=60_000) as client:
        response = client.post("/predict", files=[("file", ("x.png", padded, "image/png"))])
        assert response.json()["predictions"][0]["flagged"]
        snapshot = metrics(client)
    [line] = [json.loads(line) for line in audit.read_text().splitlines()]
    assert line["quarantined"] == "resized" and line["size"] == len(padded)
    assert line["sha256"] == hashlib.sha256(padded).hexdigest()
    stored = quarantine / line["quarantine_file"]
    assert Image.open(stored).size == (SIZE, SIZE) and stored.stat().st_size <= 5_000
    assert value(snapshot, "badexpert_quarantine_skipped_total", reason="original_over_image_cap") == 1

    with serving(tiny.strict, audit_log=tmp_path / "audit2.jsonl", quarantine_dir=tmp_path / "q2",
                 quarantine_max_bytes=0) as client:
        client.post("/predict", files=multipart(tiny.files))
        snapshot = metrics(client)
    lines = [json.loads(line) for line in (tmp_path / "audit2.jsonl").read_text().splitlines()]
    assert lines and all(line["quarantined"] == "none" and line["quarantine_file"] is None for line in lines)
    assert value(snapshot, "badexpert_quarantine_skipped_total", reason="quarantine_full") == len(lines)
    assert not list((tmp_path / "q2").iterdir())


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    chunks = []
    for name, data in parts:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x"\r\n\r\n'.encode())
        chunks.append(data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_parts_part_headers_and_image_formats_are_bounded(tiny):
    good = tiny.files[0].read_bytes()
    many, headers = multipart_body([("junk", b"x")] * 5000 + [("file", good)])
    long_header, long_headers = multipart_body([("file", good)])
    long_header = long_header.replace(b'filename="x"', b'filename="' + b"y" * 20_000 + b'"')
    tiff = io.BytesIO()
    Image.open(tiny.files[0]).save(tiff, format="TIFF")
    with serving(tiny.bundle) as client:
        started = time.monotonic()
        refused = client.post("/predict", content=many, headers=headers)
        assert refused.status_code == 413 and refused.json()["error"] == "too_many_parts"
        assert time.monotonic() - started < 1.0
        refused = client.post("/predict", content=long_header, headers=long_headers)
        assert refused.status_code == 413 and refused.json()["error"] == "part_header_too_large"
        refused = client.post("/predict", content=long_header.replace(b"y" * 20_000, b"y" * 2_000), headers=long_headers)
        assert refused.status_code == 200  # 2,000 bytes of part headers: within the default 8,192
        refused = client.post("/predict", files=[("file", ("x.tif", tiff.getvalue(), "image/tiff"))])
        assert refused.status_code == 422 and "formats accepted: PNG, JPEG" in refused.json()["detail"]
        assert client.head("/readyz").status_code == 200 and client.head("/healthz").status_code == 200
    with serving(tiny.bundle, image_formats="PNG,TIFF", max_part_header_bytes=1000) as client:
        assert client.post("/predict", files=[("file", ("x.tif", tiff.getvalue(), "image/tiff"))]).status_code == 200
        refused = client.post("/predict", content=long_header.replace(b"y" * 20_000, b"y" * 2_000), headers=long_headers)
        assert refused.status_code == 413 and "over 1000 bytes" in refused.json()["detail"]
    with pytest.raises(ValueError, match="unknown format 'NOPE'"):
        settings(tiny.bundle, image_formats="PNG,NOPE")


async def _ready(app):
    while app.state.service.state != "ready":
        await asyncio.sleep(0.01)


def _scope(length: int | None, content_type: bytes = b"application/json") -> dict:
    headers = [(b"content-type", content_type)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
            "server": ("guard", 80), "client": ("127.0.0.1", 1), "headers": headers}


async def _call(app, scope, receive) -> tuple[int, dict, float]:
    messages = []

    async def send(message):
        messages.append(message)

    started = time.monotonic()
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return messages[0]["status"], json.loads(body), time.monotonic() - started


def test_a_stalled_body_times_out_and_bytes_in_flight_are_capped(tiny):
    async def scenario():
        app = create_app(settings(tiny.bundle, body_timeout_s=0.3, max_bytes_in_flight=100_000,
                                  max_request_bytes=60_000, max_image_bytes=60_000))
        async with app.router.lifespan_context(app):
            await _ready(app)
            stalled = asyncio.Event()

            async def stalling_receive():  # sends most of its body, then nothing
                if not stalled.is_set():
                    stalled.set()
                    return {"type": "http.request", "body": b'{"images": [' + b" " * 59_000, "more_body": True}
                await asyncio.sleep(3600)

            timed_out = asyncio.create_task(_call(app, _scope(60_000), stalling_receive))
            await stalled.wait()
            # The stalled request holds 59,012 of the 100,000 bytes: a second such request gets 503 at once.
            reads = []

            async def counting_receive():
                reads.append(1)
                return {"type": "http.request", "body": b"{}", "more_body": False}

            second = await _call(app, _scope(60_000), counting_receive)
            first = await timed_out
            after = await _call(app, _scope(2), counting_receive)  # the budget was given back
            return first, second, after, reads, app.state.service.body_budget.held

    first, second, after, reads, held = asyncio.run(scenario())
    assert first[0] == 408 and first[1]["error"] == "body_timeout" and first[2] < 2.0
    assert second[0] == 503 and second[1]["error"] == "overloaded" and second[2] < 0.5
    assert after[0] == 422 and len(reads) == 1 and held == 0  # only the last request's body was read


def test_admission_comes_before_the_body_is_read_when_the_decode_backlog_is_full(tiny):
    gate = threading.Event()

    async def scenario():
        app = create_app(settings(tiny.bundle, max_decode_backlog=1, decode_threads=1, inline_decode_bytes=0))
        service = app.state.service
        real_prepare = service.prepare

        def gated_prepare(*args):
            gate.wait(30)
            return real_prepare(*args)

        service.prepare = gated_prepare
        async with app.router.lifespan_context(app):
            await _ready(app)
            body = json.dumps({"images": [b64(tiny.files[0])]}).encode()

            async def receive():
                return {"type": "http.request", "body": body, "more_body": False}

            blocked = asyncio.create_task(_call(app, _scope(len(body)), receive))
            while service.decode_backlog < 1:
                await asyncio.sleep(0.01)
            reads = []

            async def counting_receive():
                reads.append(1)
                return await receive()

            refused = await _call(app, _scope(len(body)), counting_receive)
            gate.set()
            return await blocked, refused, reads

    try:
        done, refused, reads = asyncio.run(scenario())
    finally:
        gate.set()
    assert done[0] == 200
    assert refused[0] == 503 and "decode backlog" in refused[1]["detail"] and refused[2] < 0.5 and not reads


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """One request on a fresh socket; the status and the response body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(head + body)
        data = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                header, _, rest = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in header.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(rest) >= length:
                    break
    header, _, rest = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), rest


@pytest.mark.integration
def test_real_server_is_not_starved_by_stalled_uploads_or_many_parts_and_stays_bounded(tiny, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        badexpert_command() + ["serve", str(tiny.bundle), "--port", str(port), "--device", "cpu", "--no-access-log",
                               "--torch-threads", "1", "--body-timeout-s", "4", "--max-request-bytes", "8000000",
                               "--max-image-bytes", "8000000", "--max-bytes-in-flight", "40000000",
                               "--max-header-bytes", "8192"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    sockets = []
    try:
        wait_until_ready(base, process, process.stdout.read)
        files = multipart(tiny.files[:1])

        def normal_request() -> float:
            started = time.monotonic()
            assert httpx.post(base + "/predict", files=files, timeout=30).status_code == 200
            return time.monotonic() - started

        baseline = min(normal_request() for _ in range(3))
        rss_before = rss_bytes(process.pid)

        # 1. The HTTP layer's own refusals carry the JSON error body.
        status, body = raw_request(port, b"NOT A REQUEST\r\n\r\n")
        assert status == 400 and json.loads(body)["error"] == "bad_http_request"
        status, body = raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        assert status == 431 and json.loads(body)["error"] == "headers_too_large"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:  # headers arriving in pieces
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            try:
                for _ in range(30):
                    connection.sendall(b"X-Piece: " + b"a" * 1000 + b"\r\n")
                    time.sleep(0.005)
            except (BrokenPipeError, ConnectionResetError):  # the server answered and closed: expected
                pass
            reply = connection.recv(65536)
        assert reply.startswith(b"HTTP/1.1 400") and b'"bad_http_request"' in reply

        # 2. 200 stalled uploads (headers and 1 KB of a 5 MB body) and 6 partial 5 MB bodies (3 MB sent).
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000000\r\n\r\n")
        for index in range(206):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(head + b'{"images": ["' + b"A" * (3_000_000 if index < 6 else 1000))
            sockets.append(connection)
        time.sleep(0.5)
        during_stall = normal_request()

        # 3. Two requests of 90,000 tiny multipart parts each (7 MB; refused at part 65), then a normal request.
        many, many_headers = multipart_body([("junk", b"x")] * 90_000)
        head_many = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {many_headers['content-type']}\r\n"
                     f"Content-Length: {len(many)}\r\n\r\n").encode()
        results = []
        workers = [threading.Thread(target=lambda: results.append(raw_request(port, head_many, many)))
                   for _ in range(2)]
        for worker in workers:
            worker.start()
        during_parts = normal_request()
        for worker in workers:
            worker.join(30)
        assert [status for status, _ in results] == [413, 413]
        assert all(json.loads(body)["error"] == "too_many_parts" for _, body in results)
        rss_during = rss_bytes(process.pid)

        # 4. After the body timeout the stalled uploads got 408 (or a closed connection) and were let go.
        time.sleep(4.5)
        answered = 0
        for connection in sockets:
            connection.settimeout(2)
            try:
                data = connection.recv(65536)
            except OSError:
                data = b""
            answered += data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 503")
        assert answered == len(sockets), f"{len(sockets) - answered} stalled uploads were not answered"
        after = normal_request()
        text = httpx.get(base + "/metrics").text
        assert 'badexpert_http_requests_total{status="500"}' not in text
        print(f"normal request: baseline {baseline:.3f} s, during 206 stalled uploads {during_stall:.3f} s, "
              f"during 2 x 90k-part requests {during_parts:.3f} s, after {after:.3f} s; "
              f"RSS {rss_before / 2**20:.0f} MB -> {rss_during / 2**20:.0f} MB")
        assert during_stall < baseline + 1.0 and during_parts < baseline + 1.0 and after < baseline + 1.0
        assert rss_during - rss_before < 150 * 2**20, "RSS grew by more than 150 MB"
    finally:
        for connection in sockets:
            connection.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


CORPUS = Path(__file__).parent / "corpus"


def test_the_corpus_of_bad_images_and_bodies_gets_its_documented_statuses(tiny):
    cases = json.loads((CORPUS / "cases.json").read_text())
    assert len(cases) >= 20
    with serving(tiny.bundle) as client:
        for case in cases:
            data = (CORPUS / case["file"]).read_bytes()
            if case["send"] == "multipart_file":
                response = client.post("/predict", files=[("file", (case["file"], data, "application/octet-stream"))])
            else:
                response = client.post("/predict", content=data, headers={"content-type": case["content_type"]})
            assert response.status_code == case["status"], (case["file"], response.status_code, response.text)
            body = response.json()
            if case["error"] is not None:
                assert body["error"] == case["error"] and body["detail"], (case["file"], body)
        assert value(metrics(client), "badexpert_http_requests_total", status="500") == 0


def test_a_torn_last_audit_line_is_removed_at_startup_and_the_chain_continues(tiny, tmp_path, capsys):
    audit = tmp_path / "audit.jsonl"
    with serving(tiny.strict, audit_log=audit, audit_chain=True) as client:
        client.post("/predict", files=multipart(tiny.files))
    whole = audit.read_bytes()
    audit.write_bytes(whole + b'{"time":"2026-01-01T00:00:00Z","request_id":"cut sh')  # a write cut short by a crash
    with serving(tiny.strict, audit_log=audit, audit_chain=True) as client:
        client.post("/predict", files=multipart(tiny.files))
    text = audit.read_bytes()
    assert text.startswith(whole) and b"cut sh" not in text and len(text.splitlines()) == 2 * len(whole.splitlines())
    assert badexpert_main(["audit", "verify", str(audit)]) == 0


def test_a_score_exactly_at_the_threshold_is_served_as_accepted_and_one_ulp_above_rejected(tiny, tmp_path):
    """The one decision rule on the request path: tau is itself a calibration score, so equality
    happens; an image whose score is tau passes, and the same image fails a tau one ulp higher."""
    import math

    guard, manifest = load_bundle(tiny.bundle, "cpu")
    image = tiny.files[0]
    with serving(tiny.bundle) as client:
        served = client.post("/predict", files=multipart([image])).json()["predictions"][0]["score"]
    spec = ModelSpec("registry", "tiny_cnn", 3)
    fields = {key: value for key, value in manifest.model_dump().items()}
    for name, tau in (("at", served), ("above", math.nextafter(served, math.inf))):
        guard.rejection_threshold = tau
        save_bundle(tmp_path / name, guard, spec, threshold_at(fields, tau, tiny.scores))
        with serving(tmp_path / name) as client:
            prediction = client.post("/predict", files=multipart([image])).json()["predictions"][0]
        assert prediction["score"] == served
        assert prediction["rejected"] is (name == "above"), name
