"""alpha, the score's one parameter, from `badexpert build --alpha` to the manifest, the loaded guard,
and the server's answers; and the default every real bundle gets (0.5, the paper's).

The expected scores are recomputed here from the three models' own logits (each model loaded from
its bundle file into a fresh network, the images normalized by hand) with the paper's Eq. 3
written out independently of defense/score.py:

    b = softmax(B(x))[y], a = softmax(M'(x))[y], y = argmax M(x)
    score = min(a / (alpha * b), (1 - b) / (alpha - a))      (the second term only while a < alpha)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from defense.build import BuildConfig
from defense.bundle import load_bundle
from badexpert.main import main
from defense.models import create_model
from service.app import create_app
from service.settings import ServiceSettings
from synthetic import NUM_CLASSES, SIZE, make_images, write_image_folder

MEAN, STD = 0.5, 0.25


def build(tmp_path: Path, name: str, *extra: str) -> Path:
    torch.manual_seed(0)
    weights = tmp_path / "model.safetensors"
    if not weights.exists():
        save_file(create_model("tiny_cnn", NUM_CLASSES).state_dict(), weights)
        images, labels = make_images(24, seed=1)
        write_image_folder(tmp_path / "clean", images, labels)
    out = tmp_path / name
    argv = ["build", "--model", "tiny_cnn", "--weights", str(weights), "--clean-data", str(tmp_path / "clean"),
            "--out", str(out), "--input-size", str(SIZE), str(SIZE), "--mean", *[str(MEAN)] * 3,
            "--std", *[str(STD)] * 3, "--quiet", "--unlearn-lr", "1e-2", "--finetune-lr", "0.05",
            "--finetune-epochs", "1", "--calibration-fraction", "0.5", *extra]
    assert main(argv) == 0
    return out


def expected_scores(bundle: Path, images: torch.Tensor, alpha: float) -> np.ndarray:
    """Eq. 3 in float64 from the logits of M, B and M' (loaded here, not through the guard)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    inputs = (images.double() / 255.0 - MEAN) / STD
    logits = {}
    for role in ("model", "backdoor_expert", "auxiliary_model"):
        network = create_model("tiny_cnn", NUM_CLASSES).double().eval()
        network.load_state_dict(load_file(bundle / manifest["files"][role]["path"]))
        with torch.no_grad():
            logits[role] = network(inputs).numpy()

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    y = logits["model"].argmax(1)
    rows = np.arange(len(y))
    b = softmax(logits["backdoor_expert"])[rows, y]
    a = softmax(logits["auxiliary_model"])[rows, y]
    first = a / (alpha * b)
    second = np.where(a < alpha, (1 - b) / np.maximum(alpha - a, 1e-300), np.inf)
    return np.minimum(first, second), a


def served_scores(bundle: Path, images: torch.Tensor, tmp_path: Path) -> tuple[list[float], dict]:
    files = []
    for index, image in enumerate(images):
        path = tmp_path / f"served_{index}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        files.append(("file", (path.name, path.read_bytes(), "image/png")))
    app = create_app(ServiceSettings(bundle=bundle, device="cpu", max_batch_size=64, max_wait_ms=1.0,
                                     max_images_per_request=64))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.02)
        info = client.get("/v1/info").json()
        response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    return [p["signals"]["expert"] for p in response.json()["predictions"]], info


@pytest.fixture(scope="module")
def images():
    test_images, _ = make_images(32, seed=7)
    return test_images


def check_bundle(bundle: Path, alpha: float, images: torch.Tensor, tmp_path: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["alpha"] == alpha and manifest["settings"]["alpha"] == alpha
    guard, loaded = load_bundle(bundle)
    assert guard.alpha == alpha and loaded.alpha == alpha

    expected, a = expected_scores(bundle, images, alpha)
    assert (a < alpha).sum() >= 4, "both terms of the minimum must be exercised"
    assert np.isfinite(expected).all()
    scores = guard.score(images)
    offline = scores.expert_score.double().numpy()  # alpha enters the expert's score; the decision is min(it, features)
    assert offline == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert torch.equal(scores.score, torch.minimum(scores.expert_score, scores.feature_score))
    served, info = served_scores(bundle, images, tmp_path)
    assert info["alpha"] == alpha
    assert served == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-6)
    # The same images scored with another alpha differ clearly: the check above can tell.
    other, _ = expected_scores(bundle, images, 0.5 if alpha != 0.5 else 0.3)
    assert np.abs(other - expected).max() > 0.05


def test_alpha_round_trip_from_build_to_served_scores(tmp_path, images):
    check_bundle(build(tmp_path, "alpha03", "--alpha", "0.3"), 0.3, images, tmp_path)


def test_default_alpha_is_one_half_everywhere(tmp_path, images):
    assert BuildConfig().alpha == 0.5
    check_bundle(build(tmp_path, "default"), 0.5, images, tmp_path)
