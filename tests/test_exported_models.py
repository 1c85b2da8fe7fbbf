"""Models saved with torch.export (`--model file.pt2`, defense/models/exported.py): finetuned through
exported.module(), written back by re-exporting, and a bundle of them builds, evaluates and serves."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from badexpert.main import main
from cli_errors import run_error
from defense.bundle import load_bundle
from defense.models import create_model, parse_model_spec
from defense.models.exported import ExportedModel, load_exported, save_exported
from service.app import create_app
from service.settings import ServiceSettings
from synthetic import NUM_CLASSES, SIZE, add_trigger, make_images, train_backdoored, write_image_folder


def export(model: torch.nn.Module, path, dynamic: bool = True) -> None:
    example = torch.zeros(2, 3, SIZE, SIZE)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=shapes), str(path))


def test_an_exported_model_finetunes_and_re_exports_exactly(tmp_path):
    torch.manual_seed(0)
    original = create_model("tiny_cnn", NUM_CLASSES).eval()
    export(original, tmp_path / "model.pt2")
    spec = parse_model_spec(str(tmp_path / "model.pt2"), None)
    assert spec.kind == "exported"
    model = load_exported((tmp_path / "model.pt2").read_bytes(), "test")
    images = torch.randn(5, 3, SIZE, SIZE)
    assert torch.equal(model(images), original(images))
    assert model.train() is model and model.training and not model.eval().training  # modes switch without error
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model.train()(images), torch.tensor([0, 1, 2, 3, 0]))
    loss.backward()
    optimizer.step()
    finetuned = model.eval()(images).detach()
    assert not torch.allclose(finetuned, original(images))  # the weights moved
    save_exported(model, tmp_path / "finetuned.pt2", (SIZE, SIZE))
    reloaded = load_exported((tmp_path / "finetuned.pt2").read_bytes(), "test")
    assert isinstance(reloaded, ExportedModel) and torch.equal(reloaded(images), finetuned)
    assert reloaded(torch.randn(1, 3, SIZE, SIZE)).shape == (1, NUM_CLASSES)  # any batch size


def test_a_file_named_pt2_that_is_not_an_export_archive_is_refused(tmp_path, capsys):
    (tmp_path / "model.pt2").write_bytes(b"not a zip")
    with pytest.raises(Exception, match="not a torch.export archive"):
        parse_model_spec(str(tmp_path / "model.pt2"), None)


def test_a_pt2_model_builds_evaluates_and_serves(tmp_path):
    train_images, train_labels = make_images(320, seed=0)
    model = train_backdoored(train_images, train_labels, epochs=5, poison_fraction=0.15)
    export(model, tmp_path / "suspect.pt2")
    reserved_images, reserved_labels = make_images(160, seed=1)
    write_image_folder(tmp_path / "reserved", reserved_images, reserved_labels)
    argv = ["build", "--model", str(tmp_path / "suspect.pt2"), "--clean-data", str(tmp_path / "reserved"),
            "--out", str(tmp_path / "bundle"), "--input-size", "16", "16", "--mean", "0.5", "0.5", "0.5",
            "--std", "0.25", "0.25", "0.25", "--fpr", "0.05", "--calibration-fraction", "0.5", "--unlearn-lr", "3e-3",
            "--finetune-lr", "0.01", "--finetune-epochs", "2", "--finetune-milestones", "1", "--quiet",
            "--device", "cpu"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["architecture"] == {"kind": "exported", "name": "suspect.pt2", "num_classes": NUM_CLASSES}
    assert sorted(entry["path"] for entry in manifest["files"].values()) == [
        "auxiliary.pt2", "backdoor_expert.pt2", "model.pt2"]
    guard, _ = load_bundle(tmp_path / "bundle")
    images, labels = make_images(60, seed=2)
    expert, auxiliary, suspect = (guard.backdoor_expert(images.float()), guard.auxiliary_model(images.float()),
                                  guard.model(images.float()))
    assert not torch.allclose(expert, suspect) and not torch.allclose(auxiliary, suspect)  # both finetuned
    with torch.no_grad():
        assert torch.equal(suspect, model.eval()(images.float()))  # M itself is unchanged

    write_image_folder(tmp_path / "clean", images, labels)
    write_image_folder(tmp_path / "triggered", add_trigger(images), labels)
    assert main(["evaluate", str(tmp_path / "bundle"), "--clean", str(tmp_path / "clean"), "--triggered",
                 str(tmp_path / "triggered"), "--target-class", "0", "--report", str(tmp_path / "report"),
                 "--quiet", "--device", "cpu", "--bootstrap", "50"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["bundle"]["tau"] == guard.rejection_threshold and report["data"]["target_class"] == 0
    assert report["metrics"]["asr_without_guard"]["value"] > 0.5  # the exported model carries the backdoor
    assert report["metrics"]["auroc"]["value"] > 0.8  # and the bundle built from it sees it

    app = create_app(ServiceSettings(bundle=tmp_path / "bundle", device="cpu", max_batch_size=8))
    with TestClient(app) as client:
        while client.get("/readyz").status_code != 200:
            pass
        files = sorted((tmp_path / "clean").rglob("*.png"))[:3]
        answer = client.post("/predict", files=[("file", (f.name, f.read_bytes(), "image/png")) for f in files])
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
        offline = guard.score(torch.stack([guard.preprocessing.load(f) for f in files])).score
        served = torch.tensor([p["score"] for p in answer.json()["predictions"]], dtype=torch.float64)
        assert torch.allclose(served, offline.double(), rtol=1e-6, atol=1e-9)


def test_a_static_batch_export_gets_a_clear_error(tmp_path, capsys):
    export(create_model("tiny_cnn", NUM_CLASSES), tmp_path / "static.pt2", dynamic=False)
    images, labels = make_images(24, seed=1)
    write_image_folder(tmp_path / "clean", images, labels)
    message = run_error(capsys, ["build", "--model", str(tmp_path / "static.pt2"), "--clean-data", str(tmp_path / "clean"),
                                 "--out", str(tmp_path / "bundle"), "--input-size", "16", "16", "--quiet"])
    assert "--model" in message and "batch" in message
