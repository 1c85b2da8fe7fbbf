import json
import shutil

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
    _reseal(manifest)  # a consistent digest: only the path check stands in the way
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="is not a plain file name") as error:
        load_bundle(tmp_path / "bundle")
    assert repr(named) in str(error.value)
    # The same manifest with the plain name loads: the refusal was about the path alone.
    manifest["files"]["auxiliary_model"]["path"] = "auxiliary.safetensors"
    _reseal(manifest)
    manifest_path.write_text(json.dumps(manifest))
    load_bundle(tmp_path / "bundle")


# ----- integrity of the manifest, signatures, validation (issue 15) --------------------------------

import base64  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from defense.bundle_trust import content_digest  # noqa: E402


def _bundle(tmp_path, name="bundle", **kwargs):
    save_bundle(tmp_path / name, _guard(), ModelSpec("registry", "tiny_cnn", 4), manifest_fields(), **kwargs)
    return tmp_path / name


def _edit_manifest(bundle, change, redigest=False):
    """Change the manifest as someone with write access would; with redigest, also recompute the
    bundle's own digest and id (what an attacker who read this code would do)."""
    path = bundle / "manifest.json"
    document = json.loads(path.read_text())
    change(document)
    if redigest:
        digest = content_digest(document)
        document["content_sha256"], document["bundle_id"] = digest, digest[:16]
    path.write_text(json.dumps(document))


def _reseal(document: dict) -> None:
    digest = content_digest(document)
    document["content_sha256"], document["bundle_id"] = digest, digest[:16]


def _keys(tmp_path):
    private = Ed25519PrivateKey.generate()
    sign = tmp_path / "sign.pem"
    sign.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    verify = tmp_path / "verify.pem"
    verify.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    return sign, verify


@pytest.mark.parametrize("change", [
    lambda d: d.update(rejection_threshold=-1.0),
    lambda d: d.update(alpha=0.9),
    lambda d: d["architecture"].update(kind="factory", name="os:getpid"),
    lambda d: d["class_names"].reverse(),
], ids=["threshold", "alpha", "architecture", "class-names"])
def test_an_edited_manifest_is_refused(tmp_path, change, monkeypatch):
    bundle = _bundle(tmp_path)
    _edit_manifest(bundle, change)
    called = []
    monkeypatch.setattr(os, "getpid", lambda: called.append(1) or 1)
    with pytest.raises(BundleIntegrityError, match="manifest.json does not match its digest"):
        load_bundle(bundle)
    with pytest.raises(BundleIntegrityError, match="does not match its digest"):
        read_manifest(bundle)
    assert not called


def test_the_bundle_id_covers_the_manifest(tmp_path):
    first = read_manifest(_bundle(tmp_path, "a"))
    guard = _guard()
    guard.rejection_threshold = 0.25  # same weights, another threshold
    save_bundle(tmp_path / "b", guard, ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    second = read_manifest(tmp_path / "b")
    assert first.files == second.files and first.bundle_id != second.bundle_id
    assert first.content_sha256.startswith(first.bundle_id) and len(first.content_sha256) == 64


def test_a_factory_architecture_is_imported_only_when_its_module_is_allowed(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path)
    _edit_manifest(bundle, lambda d: d["architecture"].update(kind="factory", name="os:getpid"), redigest=True)
    called = []
    monkeypatch.setattr(os, "getpid", lambda: called.append(1) or 1)
    with pytest.raises(BundleIntegrityError, match="factory 'os:getpid'.*--allow-factory-modules os"):
        load_bundle(bundle)
    assert not called
    with pytest.raises(UserError):  # allowed: imported and called, and its result is not a model
        load_bundle(bundle, allowed_factory_modules=["os"])
    assert called


@pytest.mark.parametrize("field,value,message", [
    ("rejection_threshold", float("nan"), "is not valid JSON"),  # bare NaN in the file
    ("rejection_threshold", "nan", "rejection_threshold 'nan' is not a finite number"),
    ("alpha", 0.0, r"alpha 0.0 is not in \(0, 1\]"),
    ("num_classes", 5, "class_names must be 5"),
    ("preprocessing", {"input_size": [8, 8], "mean": [0, 0, 0], "std": [0, 1, 1]}, "std"),
    ("preprocessing", {"input_size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": "lanczos"}, "exactly"),
])
def test_manifest_values_are_validated_even_with_a_consistent_digest(tmp_path, field, value, message):
    bundle = _bundle(tmp_path)
    _edit_manifest(bundle, lambda d: d.update({field: value}), redigest=not isinstance(value, float) or value == value)
    with pytest.raises(UserError, match=message):
        load_bundle(bundle)


def test_a_nan_threshold_is_never_written(tmp_path):
    guard = _guard()
    guard.rejection_threshold = float("nan")
    with pytest.raises(BundleIntegrityError, match="rejection_threshold nan is not a finite number"):
        save_bundle(tmp_path / "bundle", guard, ModelSpec("registry", "tiny_cnn", 4), manifest_fields())
    assert not (tmp_path / "bundle").exists()


def test_signed_bundles(tmp_path):
    sign, verify = _keys(tmp_path)
    bundle = _bundle(tmp_path, sign_key=sign)
    guard, manifest = load_bundle(bundle, verify_key=verify)
    assert manifest.signature.algorithm == "ed25519"
    load_bundle(bundle)  # without a key a signed bundle still loads (its digest is checked)

    unsigned = _bundle(tmp_path, "unsigned")
    with pytest.raises(BundleIntegrityError, match="not signed, and a verify key is set"):
        load_bundle(unsigned, verify_key=verify)
    other_sign, other_verify = _keys(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        load_bundle(bundle, verify_key=other_verify)

    # One changed byte in the manifest, digest recomputed: the signature no longer verifies.
    altered = tmp_path / "altered"
    shutil.copytree(bundle, altered)
    _edit_manifest(altered, lambda d: d.update(rejection_threshold=d["rejection_threshold"] + 1e-9), redigest=True)
    load_bundle(altered)  # self-consistent without a key ...
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        load_bundle(altered, verify_key=verify)  # ... refused with one
    # One changed byte in a weight file.
    weights = tmp_path / "weights"
    shutil.copytree(bundle, weights)
    data = bytearray((weights / "auxiliary.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (weights / "auxiliary.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="auxiliary.safetensors does not match its sha256"):
        load_bundle(weights, verify_key=verify)


def test_bad_key_files_are_one_line_user_errors(tmp_path):
    sign, verify = _keys(tmp_path)
    with pytest.raises(UserError, match="--sign-key .*verify.pem: not an unencrypted PEM private key"):
        _bundle(tmp_path, sign_key=verify)
    with pytest.raises(UserError, match="--verify-key .*sign.pem: not a PEM public key"):
        load_bundle(_bundle(tmp_path, "b"), verify_key=sign)
    with pytest.raises(UserError, match="no such file"):
        load_bundle(tmp_path / "b", verify_key=tmp_path / "missing.pem")


def test_each_weight_file_is_read_once_and_the_hashed_bytes_are_loaded(tmp_path, monkeypatch):
    bundle = _bundle(tmp_path)
    reads = []
    real_read_bytes = pathlib.Path.read_bytes
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: reads.append(self.name) or real_read_bytes(self))
    import safetensors.torch

    def no_reopen(*args, **kwargs):
        raise AssertionError("the weight file was opened again after hashing")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reopen)
    monkeypatch.setattr(safetensors.torch, "load_model", no_reopen)
    load_bundle(bundle)
    weight_reads = sorted(name for name in reads if name.endswith(".safetensors"))
    assert weight_reads == ["auxiliary.safetensors", "backdoor_expert.safetensors", "model.safetensors"]


def test_a_pickle_named_safetensors_is_refused_with_the_file_name(tmp_path):
    bundle = _bundle(tmp_path)
    pickled = tmp_path / "pickle.pt"
    torch.save({"weight": torch.zeros(2)}, pickled)
    data = pickled.read_bytes()
    (bundle / "model.safetensors").write_bytes(data)
    _edit_manifest(bundle, lambda d: d["files"]["model"].update(sha256=hashlib.sha256(data).hexdigest()), redigest=True)
    with pytest.raises(BundleIntegrityError, match="model.safetensors: not a readable safetensors file"):
        load_bundle(bundle)


def test_a_loaded_bundle_can_be_saved_again_with_its_own_fields(tmp_path):
    """What 'badexpert calibrate' does: load, change tau, save with the loaded manifest's fields."""
    sign, verify = _keys(tmp_path)
    guard, manifest = load_bundle(_bundle(tmp_path, sign_key=sign))
    guard.rejection_threshold = 0.125
    saved = save_bundle(tmp_path / "again", guard, ModelSpec.from_dict(manifest.architecture), manifest.model_dump(),
                        sign_key=sign)
    reloaded, reloaded_manifest = load_bundle(tmp_path / "again", verify_key=verify)
    assert reloaded.rejection_threshold == 0.125 and reloaded_manifest.bundle_id == saved.bundle_id != manifest.bundle_id
    assert reloaded_manifest.class_names == manifest.class_names
