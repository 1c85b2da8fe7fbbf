"""`badexpert build` as a user runs it: bad input exits 2 with one line, and a real build works."""

import json

import pytest
import torch
from safetensors.torch import save_file

from defense.bundle import load_bundle
from badexpert.main import main
from cli_errors import run_error
from defense.evaluation import detection_metrics
from defense.models import create_model
from synthetic import NUM_CLASSES, add_trigger, make_images, train_backdoored, write_image_folder


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(create_model("tiny_cnn", NUM_CLASSES).state_dict(), path)
    return path


@pytest.fixture
def clean_dir(tmp_path):
    images, labels = make_images(24, seed=1)
    write_image_folder(tmp_path / "clean", images, labels)
    return tmp_path / "clean"


def build_args(weights, clean_dir, out, *extra):
    return ["build", "--model", "tiny_cnn", "--weights", str(weights), "--clean-data", str(clean_dir),
            "--out", str(out), "--input-size", "16", "16", "--quiet", "--unlearn-lr", "1e-3",
            "--finetune-lr", "0.01", "--finetune-epochs", "1", *extra]


def test_missing_weights_file(capsys, tmp_path, clean_dir):
    err = run_error(capsys, build_args(tmp_path / "nope.safetensors", clean_dir, tmp_path / "out"))
    assert "--weights" in err and "nope.safetensors" in err


def test_weights_that_do_not_fit(capsys, tmp_path, clean_dir):
    save_file(create_model("tiny_cnn", 7).state_dict(), tmp_path / "seven.safetensors")
    err = run_error(capsys, build_args(tmp_path / "seven.safetensors", clean_dir, tmp_path / "out"))
    assert "seven.safetensors" in err and "does not fit" in err


def test_unknown_architecture(capsys, tmp_path, weights, clean_dir):
    argv = build_args(weights, clean_dir, tmp_path / "out")
    argv[argv.index("tiny_cnn")] = "resnet19"
    assert "unknown architecture 'resnet19'" in run_error(capsys, argv)


def test_folder_with_one_class(capsys, tmp_path, weights):
    images, _ = make_images(5, seed=0)
    write_image_folder(tmp_path / "one", images, torch.zeros(5, dtype=torch.long))
    assert "only one class" in run_error(capsys, build_args(weights, tmp_path / "one", tmp_path / "out"))


def test_folder_without_images(capsys, tmp_path, weights):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "a" / "readme.txt").write_text("no images here")
    err = run_error(capsys, build_args(weights, tmp_path / "empty", tmp_path / "out"))
    assert "--clean-data" in err and "no class sub-folders with images" in err


def test_missing_folder(capsys, tmp_path, weights):
    assert "no such folder" in run_error(capsys, build_args(weights, tmp_path / "absent", tmp_path / "out"))


def test_undecodable_image(capsys, tmp_path, weights, clean_dir):
    (clean_dir / "class_1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    err = run_error(capsys, build_args(weights, clean_dir, tmp_path / "out"))
    assert "broken.png" in err and "cannot decode" in err


def test_fewer_images_than_classes(capsys, tmp_path, weights):
    images, labels = make_images(4, seed=0)
    write_image_folder(tmp_path / "few", images[:3], labels[:3])
    err = run_error(capsys, build_args(weights, tmp_path / "few", tmp_path / "out", "--num-classes", "4",
                                       "--class-names", str(_names(tmp_path))))
    assert "3 images for 4 classes" in err


def _names(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(f"class_{i}" for i in range(NUM_CLASSES)) + "\n")
    return path


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("build", "evaluate", "demo"):
        assert command in out


def test_end_to_end_build_detects_the_backdoor(tmp_path):
    """Tiny CNN with a patch backdoor; the real CLI with automatic learning rates; held-out data."""
    train_images, train_labels = make_images(600, seed=0)
    model = train_backdoored(train_images, train_labels, epochs=6)
    save_file(model.state_dict(), tmp_path / "suspect.safetensors")
    reserved_images, reserved_labels = make_images(240, seed=1)
    write_image_folder(tmp_path / "reserved", reserved_images, reserved_labels)

    argv = ["build", "--model", "tiny_cnn", "--weights", str(tmp_path / "suspect.safetensors"),
            "--clean-data", str(tmp_path / "reserved"), "--out", str(tmp_path / "bundle"),
            "--input-size", "16", "16", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25",
            "--fpr", "0.05", "--calibration-fraction", "0.5", "--finetune-epochs", "5",
            "--finetune-milestones", "2", "4", "--quiet"]
    assert main(argv) == 0

    guard, manifest = load_bundle(tmp_path / "bundle")
    test_images, test_labels = make_images(200, seed=2)
    clean, triggered = guard.score(test_images), guard.score(add_trigger(test_images))
    metrics = detection_metrics(guard.rejection_threshold, clean.score, clean.label, test_labels,
                                triggered.score, triggered.label, test_labels, target_class=0)
    assert metrics.asr_without_guard > 0.9  # the backdoor is real
    assert metrics.auroc >= 0.95
    assert metrics.asr_with_guard < 0.2
    saved = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert saved["backdoor_expert"]["chosen_by"] == "auto" and saved["backdoor_expert"]["search"]
    assert saved["calibration"]["n"] == 120 and saved["threshold"]["k"] >= 1
    assert saved["accuracy_on_selection"]["backdoor_expert"] <= 0.5 * saved["accuracy_on_selection"]["model"]
    # 240 clean images: fewer than the build recommends, and the manifest says so
    assert any(w.startswith("240 clean images: with fewer than about 1000") for w in saved["warnings"])


def test_build_signs_with_sign_key_and_a_bad_key_fails_before_training(capsys, tmp_path, weights, clean_dir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    (tmp_path / "not-a-key.pem").write_text("hello\n")
    err = run_error(capsys, build_args(weights, clean_dir, tmp_path / "out", "--sign-key", str(tmp_path / "not-a-key.pem")))
    assert "--sign-key" in err and "not-a-key.pem" in err and not (tmp_path / "out").exists()
    private = Ed25519PrivateKey.generate()
    (tmp_path / "sign.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert main(build_args(weights, clean_dir, tmp_path / "out", "--sign-key", str(tmp_path / "sign.pem"))) == 0
    _, manifest = load_bundle(tmp_path / "out", verify_key=private.public_key())
    assert manifest.signature is not None


def test_expert_labels_derangement_is_drawn_at_random_or_from_its_seed_and_recorded(tmp_path, weights, clean_dir):
    from defense.finetune import mislabeling

    assert main(build_args(weights, clean_dir, tmp_path / "shift")) == 0
    assert main(build_args(weights, clean_dir, tmp_path / "deranged", "--expert-labels", "derangement",
                                  "--expert-labels-seed", "3")) == 0
    assert main(build_args(weights, clean_dir, tmp_path / "random", "--expert-labels", "derangement")) == 0
    shift = json.loads((tmp_path / "shift" / "manifest.json").read_text())["backdoor_expert"]
    deranged = json.loads((tmp_path / "deranged" / "manifest.json").read_text())["backdoor_expert"]
    assert shift["mislabeling"] == "shift" and shift["wrong_label_of"] == [(c + 1) % NUM_CLASSES for c in range(NUM_CLASSES)]
    assert deranged["mislabeling"] == "derangement"
    assert deranged["wrong_label_of"] == mislabeling(NUM_CLASSES, "derangement", 3).tolist()
    assert deranged["wrong_label_of"] != shift["wrong_label_of"] or NUM_CLASSES == 2
    load_bundle(tmp_path / "deranged")  # the manifest with the new fields verifies and loads
    drawn = json.loads((tmp_path / "random" / "manifest.json").read_text())["backdoor_expert"]["wrong_label_of"]
    assert sorted(drawn) == list(range(NUM_CLASSES)) and all(drawn[c] != c for c in range(NUM_CLASSES))


def test_self_test_options_are_named(capsys, tmp_path, weights, clean_dir):
    for bad in (["--self-test", "maybe"], ["--canary-seed", "x"]):  # argparse's own: exit 2, the option named
        with pytest.raises(SystemExit) as exit_info:
            main(build_args(weights, clean_dir, tmp_path / "out", *bad))
        assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err
    err = run_error(capsys, build_args(weights, clean_dir, tmp_path / "out", "--self-test", "choose"))
    assert "--self-test choose" in err and "--unlearn-lr 0.001" in err
