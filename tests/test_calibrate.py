"""Calibration as a user runs it: `build --calibration-data` and `badexpert calibrate`."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from defense.bundle import load_bundle
from badexpert.main import main
from cli_errors import run_error
from defense.score import rejects
from defense.threshold import conformal_rank
from synthetic import PREPROCESSING, make_images, train_backdoored, write_image_folder

NORMALIZATION = ["--input-size", "16", "16", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]


def write_flat_folder(root, images: torch.Tensor) -> list:
    root.mkdir(parents=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(root / f"{index:04d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A backdoored tiny model, 200 labeled reserved images, and two disjoint unlabeled clean folders."""
    root = tmp_path_factory.mktemp("calibrate")
    train_images, train_labels = make_images(600, seed=0)
    save_file(train_backdoored(train_images, train_labels, epochs=6).state_dict(), root / "suspect.safetensors")
    reserved_images, reserved_labels = make_images(200, seed=1)
    write_image_folder(root / "reserved", reserved_images, reserved_labels)
    calibration_images, _ = make_images(300, seed=3)
    write_flat_folder(root / "unlabeled", calibration_images)
    more_images, more_labels = make_images(500, seed=4)
    write_image_folder(root / "more", more_images, more_labels)  # class folders: labels ignored
    argv = ["build", "--model", "tiny_cnn", "--weights", str(root / "suspect.safetensors"),
            "--clean-data", str(root / "reserved"), "--calibration-data", str(root / "unlabeled"),
            "--out", str(root / "bundle"), *NORMALIZATION, "--fpr", "0.05", "--unlearn-lr", "3e-3",
            "--finetune-lr", "0.01", "--finetune-epochs", "3", "--finetune-milestones", "2", "--quiet"]
    assert main(argv) == 0
    return {"root": root, "calibration_images": calibration_images, "more_images": more_images}


def independent_tau(bundle, images: torch.Tensor, fpr: float) -> float:
    """The k-th smallest score of the images (conformal k), recomputed here from the loaded guard."""
    guard, _ = load_bundle(bundle)
    scores = guard.score(images).score.sort().values
    return float(scores[conformal_rank(len(images), fpr) - 1])


def test_build_sets_tau_on_the_calibration_folder_alone(workspace):
    root = workspace["root"]
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    data = manifest["data"]
    assert data["calibration"]["source"] == "--calibration-data" and data["calibration"]["n"] == 300
    assert data["calibration"]["labels"] == "not used"
    # every labeled image goes to finetuning or to the rate choices: none is spent on tau
    assert data["finetuning"]["n"] + data["rate_selection"]["n"] == 200
    assert data["rate_selection"]["n"] == 20  # --selection-fraction 0.1, stratified over 4 classes
    assert manifest["calibration"]["n"] == 300 and manifest["threshold"]["k"] == conformal_rank(300, 0.05) == 15
    assert manifest["rejection_threshold"] == pytest.approx(
        independent_tau(root / "bundle", workspace["calibration_images"], 0.05), rel=1e-12)
    low, high = manifest["threshold"]["fpr_range"]
    assert manifest["threshold"]["expected_fpr"] == pytest.approx(15 / 301) and low < 15 / 301 < high


def test_calibrate_writes_a_new_bundle_with_tau_from_the_new_images(workspace, capsys):
    root = workspace["root"]
    before = (root / "bundle" / "manifest.json").read_bytes()
    argv = ["calibrate", str(root / "bundle"), "--clean", str(root / "more"), "--out", str(root / "recalibrated"),
            "--fpr", "0.02", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recalibrated from" in out and "k=10 of n=500" in out and "expected 2.00%" in out
    assert (root / "bundle" / "manifest.json").read_bytes() == before  # the old bundle is left as it was

    old = json.loads(before)
    new = json.loads((root / "recalibrated" / "manifest.json").read_text())
    assert new["bundle_id"] != old["bundle_id"] and new["recalibrated_from"] == old["bundle_id"]
    assert new["calibration_history"][-1]["threshold"]["tau"] == old["rejection_threshold"]
    assert new["files"] == old["files"]  # same models, byte for byte
    assert new["target_fpr"] == 0.02 and new["threshold"]["n"] == 500 and new["threshold"]["k"] == 10
    assert new["data"]["calibration"]["n"] == 500 and new["data"]["finetuning"] == old["data"]["finetuning"]
    expected_tau = independent_tau(root / "bundle", workspace["more_images"], 0.02)
    assert new["rejection_threshold"] == pytest.approx(expected_tau, rel=1e-12)

    guard, manifest = load_bundle(root / "recalibrated")  # what serve loads
    assert guard.rejection_threshold == manifest.rejection_threshold == new["rejection_threshold"]
    rejected = rejects(guard.score(workspace["more_images"]).score, guard.rejection_threshold)
    assert int(rejected.sum()) == 9  # k - 1 of the calibration images lie strictly below tau


def test_calibrate_refuses_bad_input_with_one_line(workspace, capsys, tmp_path):
    root = workspace["root"]
    bundle = str(root / "bundle")
    err = run_error(capsys, ["calibrate", bundle, "--clean", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert "--clean" in err and "none" in err
    err = run_error(capsys, ["calibrate", bundle, "--clean", str(root / "more"), "--out", bundle])
    assert "--out" in err and "new folder" in err
    (tmp_path / "empty").mkdir()
    err = run_error(capsys, ["calibrate", bundle, "--clean", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "no images" in err
    tampered = tmp_path / "tampered"
    shutil.copytree(root / "bundle", tampered)
    weights = tampered / "auxiliary.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    err = run_error(capsys, ["calibrate", str(tampered), "--clean", str(root / "more"), "--out", str(tmp_path / "o")])
    assert "auxiliary.safetensors" in err and not (tmp_path / "o").exists()


def test_duplicated_calibration_images_on_tau_are_refused(workspace, capsys, tmp_path):
    """Ten copies of one image: if their score is the k-th smallest, tau sits on a tie."""
    root = workspace["root"]
    guard, _ = load_bundle(root / "bundle")
    images = workspace["calibration_images"][:100]
    lowest = int(guard.score(images).score.argmin())
    write_flat_folder(tmp_path / "dupes", torch.cat([images, images[lowest:lowest + 1].repeat(9, 1, 1, 1)]))
    err = run_error(capsys, ["calibrate", str(root / "bundle"), "--clean", str(tmp_path / "dupes"),
                             "--out", str(tmp_path / "o"), "--fpr", "0.05", "--quiet"])
    assert "shared by 10 of the 109 calibration scores" in err and not (tmp_path / "o").exists()


def test_preprocessing_is_the_bundles(workspace):
    guard, _ = load_bundle(workspace["root"] / "bundle")
    assert guard.preprocessing == PREPROCESSING


def test_build_refuses_calibration_images_that_are_also_clean_data(workspace, capsys, tmp_path):
    root = workspace["root"]
    argv = ["build", "--model", "tiny_cnn", "--weights", str(root / "suspect.safetensors"),
            "--clean-data", str(root / "reserved"), "--calibration-data", str(root / "reserved" / "class_1"),
            "--out", str(tmp_path / "bundle"), *NORMALIZATION, "--unlearn-lr", "3e-3", "--finetune-lr", "0.01",
            "--quiet"]
    err = run_error(capsys, argv)
    assert "--calibration-data" in err and "50 of its images are also in --clean-data" in err
    assert not (tmp_path / "bundle").exists()


def test_calibrate_checks_and_signs_with_ed25519_keys(workspace, capsys, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    def write_keys(name):
        private = Ed25519PrivateKey.generate()
        (tmp_path / f"{name}.pem").write_bytes(private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{name}.pub").write_bytes(private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    write_keys("ours")
    write_keys("theirs")
    root = workspace["root"]
    # the source bundle is unsigned: with a verify key it is refused, and nothing is written
    err = run_error(capsys, ["calibrate", str(root / "bundle"), "--clean", str(root / "more"), "--out",
                             str(tmp_path / "refused"), "--verify-key", str(tmp_path / "ours.pub"), "--quiet"])
    assert "sign" in err and not (tmp_path / "refused").exists()
    assert main(["calibrate", str(root / "bundle"), "--clean", str(root / "more"), "--out", str(tmp_path / "signed"),
                 "--sign-key", str(tmp_path / "ours.pem"), "--quiet"]) == 0
    guard, manifest = load_bundle(tmp_path / "signed", verify_key=tmp_path / "ours.pub")
    assert manifest.recalibrated_from == json.loads((root / "bundle" / "manifest.json").read_text())["bundle_id"]
    with pytest.raises(Exception, match="sign"):
        load_bundle(tmp_path / "signed", verify_key=tmp_path / "theirs.pub")


def test_calibrate_keeps_the_bundles_target_and_rule_unless_given(workspace, capsys, tmp_path):
    """The bundle was built with --fpr 0.05: a recalibration without --fpr stays a 5% guard (it used to
    become a 1% one, BuildConfig's default), and its own recalibration keeps what it was given."""
    root = workspace["root"]
    assert main(["calibrate", str(root / "bundle"), "--clean", str(root / "more"), "--out", str(tmp_path / "kept"),
                 "--quiet"]) == 0
    kept = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert kept["target_fpr"] == 0.05 and kept["threshold"]["rule"] == "conformal"
    assert kept["threshold"]["k"] == conformal_rank(500, 0.05)
    assert main(["calibrate", str(root / "bundle"), "--clean", str(root / "more"), "--out", str(tmp_path / "ucb"),
                 "--fpr", "0.1", "--threshold-rule", "ucb", "--threshold-delta", "0.2", "--quiet"]) == 0
    assert main(["calibrate", str(tmp_path / "ucb"), "--clean", str(root / "unlabeled"), "--out",
                 str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["target_fpr"] == 0.1 and again["threshold"]["rule"] == "ucb" and again["threshold"]["delta"] == 0.2


def test_calibrate_refuses_a_copy_of_the_builds_own_images_by_content(workspace, capsys, tmp_path):
    root = workspace["root"]
    manifest = json.loads((root / "bundle" / "manifest.json").read_text())
    assert len(manifest["data"]["finetuning"]["content_sha256_16"]) == manifest["data"]["finetuning"]["n"]
    copies = tmp_path / "copies"
    copies.mkdir()
    for index, path in enumerate(sorted((root / "reserved").rglob("*.png"))[:30]):
        shutil.copy(path, copies / f"renamed_{index}.png")  # another folder, other names: same content
    for index, path in enumerate(sorted((root / "more").rglob("*.png"))[:100]):
        shutil.copy(path, copies / f"fresh_{index}.png")
    err = run_error(capsys, ["calibrate", str(root / "bundle"), "--clean", str(copies), "--out",
                             str(tmp_path / "o"), "--quiet"])
    assert "--clean" in err and "30 of its images have the content of images the build" in err
    assert not (tmp_path / "o").exists()


def test_a_bundle_without_content_digests_still_recalibrates_with_a_warning(workspace, capsys, tmp_path):
    from defense.bundle import save_bundle
    from defense.models.loading import ModelSpec

    root = workspace["root"]
    guard, manifest = load_bundle(root / "bundle")
    fields = manifest.model_dump()
    for step in ("finetuning", "rate_selection"):
        fields["data"][step].pop("content_sha256_16")  # as an earlier release wrote it
    save_bundle(tmp_path / "old", guard, ModelSpec.from_dict(manifest.architecture), fields)
    assert main(["calibrate", str(tmp_path / "old"), "--clean", str(root / "more"), "--out", str(tmp_path / "new"),
                 "--quiet"]) == 0
    assert "records no content digests of its finetuning and rate_selection images" in capsys.readouterr().out
