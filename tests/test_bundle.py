import json

import pytest
import torch

from defense.bundle import load_bundle, read_manifest, save_bundle
from defense.errors import BundleIntegrityError, UserError
from defense.guard import Guard
from defense.models import ModelSpec, create_model
from synthetic import PREPROCESSING, make_images, manifest_fields


def _guard() -> Guard:
    torch.manual_seed(0)
    models = [create_model("tiny_cnn", 4).eval() for _ in range(3)]
    return Guard(*models, preprocessing=PREPROCESSING, rejection_threshold=0.5)


def test_round_trip_gives_the_same_scores_and_settings(tmp_path):
    guard = _guard()
    manifest = save_bundle(tmp_path / "bundle", guard, ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    loaded, loaded_manifest = load_bundle(tmp_path / "bundle")
    images, _ = make_images(12, seed=3)
    before, after = guard.score(images), loaded.score(images)
    assert torch.allclose(before.score, after.score) and torch.equal(before.label, after.label)
    assert loaded.preprocessing == PREPROCESSING and loaded.rejection_threshold == 0.5
    assert loaded_manifest.bundle_id == manifest.bundle_id
    files = json.loads((tmp_path / "bundle" / "manifest.json").read_text())["files"]
    assert {f["path"] for f in files.values()} == {"model.safetensors", "backdoor_expert.safetensors", "auxiliary.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in files.values())


def test_a_tampered_weight_file_is_refused(tmp_path):
    save_bundle(tmp_path / "bundle", _guard(), ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    path = tmp_path / "bundle" / "backdoor_expert.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="backdoor_expert.safetensors does not match its sha256"):
        load_bundle(tmp_path / "bundle")


def test_a_missing_weight_file_or_manifest_is_refused(tmp_path):
    save_bundle(tmp_path / "bundle", _guard(), ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    (tmp_path / "bundle" / "auxiliary.safetensors").unlink()
    with pytest.raises(BundleIntegrityError, match="auxiliary.safetensors is missing"):
        load_bundle(tmp_path / "bundle")
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path)


def test_an_existing_folder_is_not_overwritten_by_default(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "precious.txt").write_text("keep")
    with pytest.raises(UserError, match="exists and is not empty"):
        save_bundle(tmp_path / "bundle", _guard(), ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    assert (tmp_path / "bundle" / "precious.txt").read_text() == "keep"


def test_torchscript_models_are_bundled_as_torchscript(tmp_path):
    guard = _guard()
    scripted = [torch.jit.script(m) for m in (guard.model, guard.backdoor_expert, guard.auxiliary_model)]
    torch.jit.save(scripted[0], str(tmp_path / "user.ts"))
    ts_guard = Guard(*scripted, preprocessing=PREPROCESSING, rejection_threshold=0.5)
    save_bundle(tmp_path / "bundle", ts_guard, ModelSpec("torchscript", str(tmp_path / "user.ts"), 4), manifest_fields())
    assert (tmp_path / "bundle" / "backdoor_expert.pt").is_file()
    loaded, manifest = load_bundle(tmp_path / "bundle")
    assert manifest.architecture["kind"] == "torchscript"
    images, _ = make_images(6, seed=4)
    assert torch.allclose(loaded.score(images).score, guard.score(images).score, atol=1e-6)


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_a_weight_file_outside_the_bundle_folder_is_refused(tmp_path, where):
    """The manifest names plain file names only: a path that leaves the folder is refused even when
    the file it points to exists and matches its sha256 (so without the check it would load)."""
    save_bundle(tmp_path / "bundle", _guard(), ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    original = tmp_path / "bundle" / "auxiliary.safetensors"
    target = {"parent": tmp_path / "auxiliary.safetensors", "absolute": tmp_path / "elsewhere" / "aux.safetensors",
              "subfolder": tmp_path / "bundle" / "sub" / "auxiliary.safetensors"}[where]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(original.read_bytes())
    named = {"parent": "../auxiliary.safetensors", "absolute": str(target), "subfolder": "sub/auxiliary.safetensors"}[where]
    manifest_path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["auxiliary_model"]["path"] = named
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="is not a plain file name") as error:
        load_bundle(tmp_path / "bundle")
    assert repr(named) in str(error.value)
    # The same manifest with the plain name loads: the refusal was about the path alone.
    manifest["files"]["auxiliary_model"]["path"] = "auxiliary.safetensors"
    manifest_path.write_text(json.dumps(manifest))
    load_bundle(tmp_path / "bundle")
