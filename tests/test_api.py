"""The guard from Python (defense.Bundle: build, load, calibrate, score, decide): the same bundle as the command,
the inputs a Python user holds (nn.Module, tensors, PIL images, folders), and the same errors."""

import json

import pytest
import torch
from PIL import Image

import defense
from defense import Bundle
from badexpert.main import main
from cli_errors import run_error
from defense.models import create_model
from synthetic import NUM_CLASSES, make_images, write_image_folder
from test_build_cli import build_args, clean_dir, weights  # noqa: F401 (fixtures: a tiny model, 24 clean images)

FAST = {"unlearn_lr": 1e-3, "finetune_lr": 0.01, "finetune_epochs": 1}  # as test_build_cli.build_args gives them
# Fields that say when and how long, and the digests over them: all else must match.
RUN_FIELDS = {"created_at", "build_seconds", "bundle_id", "content_sha256", "signature"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in both builds, and steadier on a busy machine
    yield
    torch.set_num_threads(threads)


def without_seconds(value):
    """A record without its timings (the self-test's parts say how long they took)."""
    if isinstance(value, dict):
        return {key: without_seconds(item) for key, item in value.items() if not key.endswith("seconds")}
    if isinstance(value, list):
        return [without_seconds(item) for item in value]
    return value


def comparable(bundle_dir) -> dict:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return without_seconds({key: value for key, value in manifest.items() if key not in RUN_FIELDS})


def test_the_command_and_the_api_give_the_same_bundle(tmp_path, weights, clean_dir):
    argv = build_args(weights, clean_dir, tmp_path / "by-command", "--fpr", "0.05", "--canary-seed", "3")
    assert main(argv) == 0
    bundle = Bundle.build("tiny_cnn", clean_dir, weights=weights, out=tmp_path / "by-api", input_size=(16, 16),
                           progress=False, fpr=0.05, canary_seed=3, **FAST)
    assert bundle.path == tmp_path / "by-api" and bundle.bundle_id == bundle.manifest.bundle_id
    assert comparable(tmp_path / "by-command") == comparable(tmp_path / "by-api")  # the weights' sha256 included


def test_an_nn_module_and_tensors_in_memory_then_saved_and_loaded(tmp_path):
    model = create_model("tiny_cnn", NUM_CLASSES)
    images, labels = make_images(24, seed=1)
    bundle = Bundle.build(model, (images, labels), architecture="tiny_cnn", input_size=(16, 16), progress=False,
                           device="cpu", **FAST)
    assert bundle.manifest is None and bundle.path is None and bundle.bundle_id is None  # in memory only
    assert bundle.class_names == [str(c) for c in range(NUM_CLASSES)]
    test_images, _ = make_images(8, seed=2)
    before = bundle.score(test_images)

    saved = bundle.save(tmp_path / "guard")
    loaded = Bundle.load(tmp_path / "guard", device="cpu")
    assert loaded.bundle_id == saved.bundle_id and loaded.threshold == bundle.threshold
    assert torch.equal(loaded.score(test_images).score, before.score)
    decisions = loaded.decide(test_images)
    assert torch.equal(decisions.rejected, before.score < bundle.threshold)
    assert torch.equal(decisions.accepted, ~decisions.rejected)
    assert decisions.class_name == [loaded.class_names[int(label)] for label in decisions.label]


def test_score_takes_tensors_pil_images_files_and_folders(tmp_path, weights, clean_dir):
    bundle = Bundle.build("tiny_cnn", clean_dir, weights=weights, input_size=(16, 16), progress=False, **FAST)
    images, _ = make_images(3, seed=5)
    pictures = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    (tmp_path / "incoming").mkdir()
    for index, picture in enumerate(pictures):
        picture.save(tmp_path / "incoming" / f"{index}.png")
    files = sorted((tmp_path / "incoming").iterdir())
    expected = bundle.score(images).score
    for given in (pictures, files, tmp_path / "incoming", str(tmp_path / "incoming")):
        assert torch.equal(bundle.score(given).score, expected)
    for one in (images[0], pictures[0]):  # one (3, H, W) image, one PIL image: a batch of one
        assert torch.allclose(bundle.score(one).score, expected[:1], rtol=1e-5)


def test_calibrate_keeps_the_bundles_target_and_records_where_it_came_from(tmp_path, weights, clean_dir):
    built = Bundle.build("tiny_cnn", clean_dir, weights=weights, input_size=(16, 16), progress=False,
                          out=tmp_path / "guard", fpr=0.05, **FAST)
    more, _ = make_images(40, seed=3)
    (tmp_path / "more").mkdir()
    for index, image in enumerate(more):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "more" / f"{index}.png")
    recalibrated = built.calibrate(tmp_path / "more", out=tmp_path / "guard-2", progress=False)
    assert recalibrated.manifest.target_fpr == 0.05  # the bundle's own, not BuildConfig's default
    assert recalibrated.manifest.recalibrated_from == built.bundle_id
    assert recalibrated.manifest.calibration["n"] == 40
    with pytest.raises(defense.UserError, match="not saved"):
        Bundle.build("tiny_cnn", clean_dir, weights=weights, input_size=(16, 16), progress=False,
                     **FAST).calibrate(tmp_path / "more", out=tmp_path / "guard-3")


def test_errors_are_user_errors_with_the_commands_messages(tmp_path, weights, clean_dir, capsys):
    module = create_model("tiny_cnn", NUM_CLASSES)
    with pytest.raises(defense.UserError, match="needs architecture="):
        Bundle.build(module, clean_dir, input_size=(16, 16))
    with pytest.raises(defense.UserError, match="--architecture resnet18: does not fit the module's weights"):
        Bundle.build(module, clean_dir, architecture="resnet18", input_size=(16, 16))
    with pytest.raises(defense.UserError, match="expected uint8 pixels"):
        Bundle.build(module, (torch.rand(8, 3, 16, 16), torch.arange(8) % 4), architecture="tiny_cnn",
                      input_size=(16, 16))
    with pytest.raises(TypeError, match="unknown option 'finetune_epoch' \\(did you mean 'finetune_epochs'\\?\\)"):
        Bundle.build("tiny_cnn", clean_dir, weights=weights, finetune_epoch=3)
    with pytest.raises(defense.UserError, match=r"--fpr: must be in \(0, 1\), got 2"):  # argparse's check, for Python
        Bundle.build("tiny_cnn", clean_dir, weights=weights, fpr=2)
    with pytest.raises(defense.UserError) as raised:
        Bundle.build("tiny_cnn", tmp_path / "absent", weights=weights)
    err = run_error(capsys, build_args(weights, tmp_path / "absent", tmp_path / "out"))
    assert err == f"badexpert: error: {raised.value}"  # the same one line


def test_evaluate_on_tensors_and_on_folders_gives_the_same_metrics(tmp_path, weights, clean_dir):
    from synthetic import add_trigger

    bundle = Bundle.build("tiny_cnn", clean_dir, weights=weights, input_size=(16, 16), progress=False,
                          out=tmp_path / "guard", **FAST)
    images, labels = make_images(12, seed=4)
    triggered = add_trigger(images)
    write_image_folder(tmp_path / "test-clean", images, labels)
    write_image_folder(tmp_path / "test-triggered", triggered, labels)
    in_memory = bundle.evaluate((images, labels), (triggered, labels), target_class=0, bootstrap=20, progress=False)
    assert in_memory.report_dir is None and in_memory.document["plots"] == {}
    on_disk = bundle.evaluate(tmp_path / "test-clean", tmp_path / "test-triggered", target_class="class_0",
                              bootstrap=20, report_dir=tmp_path / "report", progress=False)
    assert in_memory.metrics == on_disk.metrics and in_memory.metrics.n_triggered == 9  # 3 are from class 0
    # the intervals differ: the folders give the images in another order to the (seeded) resampling
    assert all(on_disk.document["metrics"][name]["ci_low"] is not None for name in on_disk.document["metrics"])
    assert {"report.json", "report.md"} <= {path.name for path in (tmp_path / "report").iterdir()}
    assert json.loads((tmp_path / "report" / "report.json").read_text())["bundle"]["bundle_id"] == bundle.bundle_id
