"""The Open Inference Protocol v2 (KServe v2 REST) routes (service/v2_routes.py): a live `badexpert
serve` and tritonclient's HTTP client, with images as a BYTES tensor (binary extension and JSON)
and as a UINT8 [N, H, W, 3] tensor, give the same decisions as POST /predict."""

from __future__ import annotations

import base64
import os
import subprocess

import httpx
import numpy as np
import pytest

from live_server import wait_until_ready
from test_service import badexpert_command, free_port, multipart, serving

tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is missing (pip install -e '.[test]')")

MODEL = "badexpert-guard"
KEY = "user-key-0123456789abcdef"


def assert_same_decisions(outputs: dict, predictions: list[dict]) -> None:
    assert len(outputs["label"]) == len(predictions)
    for index, prediction in enumerate(predictions):
        expected_label = -1 if prediction["label"] is None else prediction["label"]
        assert int(outputs["label"][index]) == expected_label
        assert bool(outputs["rejected"][index]) == prediction["rejected"]
        assert bool(outputs["flagged"][index]) == prediction["flagged"]
        assert abs(float(outputs["score"][index]) - prediction["score"]) <= 1e-9


@pytest.mark.integration
def test_tritonclient_gets_the_decisions_of_predict_for_bytes_and_uint8_tensors(tiny):
    from tritonclient.utils import InferenceServerException

    from defense.bundle import load_bundle

    port = free_port()
    process = subprocess.Popen(
        badexpert_command() + ["serve", str(tiny.strict), "--port", str(port), "--device", "cpu", "--no-access-log"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "BADEXPERT_API_KEYS": KEY},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    try:
        wait_until_ready(base, process, process.stdout.read)
        expected = httpx.post(base + "/predict", files=multipart(tiny.files), headers=auth).json()["predictions"]
        assert any(p["rejected"] for p in expected) and not all(p["rejected"] for p in expected)
        client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL, headers=auth)
        metadata = client.get_model_metadata(MODEL, headers=auth)
        assert {(i["name"], i["datatype"]) for i in metadata["inputs"]} == {("images", "BYTES"), ("pixels", "UINT8")}
        assert next(i for i in metadata["inputs"] if i["name"] == "pixels")["shape"] == [-1, 16, 16, 3]
        with pytest.raises(InferenceServerException):  # the v2 routes need the API key too
            client.get_model_metadata(MODEL)

        def infer(name, datatype, array, binary):
            tensor = tritonclient_http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=binary)
            result = client.infer(MODEL, [tensor], headers=dict(auth))  # tritonclient adds to the dict it gets
            return {output: result.as_numpy(output) for output in ("label", "confidence", "score", "rejected", "flagged")}

        encoded = np.array([path.read_bytes() for path in tiny.files], dtype=np.object_)
        assert_same_decisions(infer("images", "BYTES", encoded, True), expected)  # tritonclient's binary extension
        guard, _ = load_bundle(tiny.strict)
        pixels = np.stack([guard.preprocessing.load(path).permute(1, 2, 0).numpy() for path in tiny.files])
        assert pixels.shape == (len(tiny.files), 16, 16, 3) and pixels.dtype == np.uint8
        assert_same_decisions(infer("pixels", "UINT8", pixels, True), expected)
        assert_same_decisions(infer("pixels", "UINT8", pixels, False), expected)  # plain JSON integers

        # Plain JSON: BYTES elements as base64 strings (as in /predict's JSON body).
        body = {"id": "r1", "inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(tiny.files)],
                                        "data": [base64.b64encode(p.read_bytes()).decode() for p in tiny.files]}],
                "outputs": [{"name": "label"}, {"name": "score"}, {"name": "rejected"}, {"name": "flagged"}]}
        answer = httpx.post(f"{base}/v2/models/{MODEL}/infer", json=body, headers=auth).json()
        assert answer["id"] == "r1" and [o["name"] for o in answer["outputs"]] == ["label", "score", "rejected", "flagged"]
        assert_same_decisions({o["name"]: o["data"] for o in answer["outputs"]}, expected)
        assert answer["parameters"]["bundle"] == answer["model_version"] == metadata["versions"][0]
    finally:
        process.kill()
        process.wait()


def test_v2_requests_get_the_limits_and_errors_of_predict(tiny):
    png = tiny.files[0].read_bytes()

    def bytes_body(count, data=None):
        data = data if data is not None else [base64.b64encode(png).decode()] * count
        return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [count], "data": data}]}

    infer = f"/v2/models/{MODEL}/infer"
    with serving(tiny.bundle, max_images_per_request=2, max_image_bytes=len(png) + 10) as client:
        assert client.post(infer, json=bytes_body(2)).status_code == 200
        assert client.post(infer, json=bytes_body(3)).json()["error"] == "too_many_images"
        big = base64.b64encode(png + b"\0" * 64).decode()
        assert client.post(infer, json=bytes_body(1, [big])).json()["error"] == "image_too_large"
        assert client.post(infer, json=bytes_body(1, ["bm90IGFuIGltYWdl"])).status_code == 422  # undecodable
        header = b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":8}}]}'
        torn = client.post(infer, content=header + b"\x10\0\0\0abcd",
                           headers={"Inference-Header-Content-Length": str(len(header))})
        assert torn.status_code == 400 and torn.json()["error"] == "bad_tensor"
        wrong_shape = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 8, 8, 3], "data": [0] * 192}]}
        assert "expected [N, 16, 16, 3]" in client.post(infer, json=wrong_shape).json()["detail"]
        assert client.post(infer, json={"inputs": []}).json()["error"] == "bad_tensor"
        assert client.post(infer, content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
        assert client.post(infer, files=multipart(tiny.files[:1])).status_code == 415
        assert client.post("/v2/models/other/infer", json=bytes_body(1)).status_code == 404
        assert client.get("/v2/models/other").status_code == 404
    with serving(tiny.bundle, response_policy="decision_only", v2_model_name="guard-2") as client:
        answer = client.post("/v2/models/guard-2/infer", json=bytes_body(1)).json()
        assert "score" not in {o["name"] for o in answer["outputs"]} and "threshold" not in answer["parameters"]
        assert "score" not in {o["name"] for o in client.get("/v2/models/guard-2").json()["outputs"]}
