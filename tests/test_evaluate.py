"""`badexpert evaluate` on a tiny guarded model: the report's numbers, the plots, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from defense.build import BuildConfig, build_guard
from defense.bundle import load_bundle, save_bundle
from badexpert.main import main
from cli_errors import run_error
from defense.data import ImageSet
from defense.bootstrap import bootstrap_metrics, weighted_auroc
from defense.models.loading import ModelSpec
from synthetic import NUM_CLASSES, PREPROCESSING, TARGET, add_trigger, make_images, train_backdoored

CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]


def write_folder(root, images, labels=None):
    """PNG files: root/<label>/<i>.png, or root/<i>.png when ``labels`` is None."""
    for index, image in enumerate(images):
        folder = root if labels is None else root / CLASS_NAMES[int(labels[index])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:04d}.png")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    train_images, train_labels = make_images(320, seed=0)
    model = train_backdoored(train_images, train_labels, epochs=5, poison_fraction=0.15)
    reserved_images, reserved_labels = make_images(160, seed=1)
    reserved = ImageSet(reserved_images, reserved_labels, CLASS_NAMES, [None] * len(reserved_labels))
    config = BuildConfig(unlearn_lr=3e-3, finetune_lr=0.01, finetune_epochs=2, finetune_milestones=(1,),
                         calibration_fraction=0.5, fpr=0.05, progress=False)
    result = build_guard(model, reserved, PREPROCESSING, NUM_CLASSES, config, log=lambda *a: None)
    save_bundle(root / "bundle", result.guard, ModelSpec("registry", "tiny_cnn", NUM_CLASSES), result.manifest_fields)
    test_images, test_labels = make_images(120, seed=2)
    triggered = add_trigger(test_images)
    write_folder(root / "clean", test_images, test_labels)
    write_folder(root / "triggered", triggered, test_labels)
    write_folder(root / "flat", triggered[test_labels != TARGET])
    return {"root": root, "bundle": root / "bundle", "clean": root / "clean", "triggered": root / "triggered",
            "flat": root / "flat", "images": test_images, "labels": test_labels, "triggered_images": triggered}


def evaluate(setup, report, *extra, triggered=None):
    return main(["evaluate", str(setup["bundle"]), "--clean", str(setup["clean"]),
                 "--triggered", str(triggered or setup["triggered"]), "--report", str(report), "--quiet",
                 "--device", "cpu", "--bootstrap", "100", *extra])


@pytest.fixture(scope="module")
def report_dir(setup):
    assert evaluate(setup, setup["root"] / "report", "--target-class", "0") == 0
    return setup["root"] / "report"


def test_report_matches_an_independent_computation(setup, report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    for name in ("report.md", "roc.png", "score_histogram.png", "confidence_plane.png"):
        path = report_dir / name
        assert path.is_file() and path.stat().st_size > 1000, name
    assert (report_dir / "roc.png").read_bytes()[:4] == b"\x89PNG"

    guard, manifest = load_bundle(setup["bundle"])
    clean, triggered = guard.score(setup["images"]), guard.score(setup["triggered_images"])
    labels, tau = setup["labels"], manifest.rejection_threshold
    correct = clean.label == labels
    counted = labels != TARGET
    successful = counted & (triggered.label == TARGET)
    assert successful.sum() > 20, "the tiny model's backdoor must work for this test to mean anything"
    truth = np.r_[np.zeros(int(correct.sum())), np.ones(int(successful.sum()))]
    expected = {
        "auroc": roc_auc_score(truth, -np.r_[clean.score[correct].numpy(), triggered.score[successful].numpy()]),
        "tpr": (triggered.score[successful] < tau).float().mean().item(),
        "fpr": (clean.score < tau).float().mean().item(),
        "clean_accuracy_without_guard": correct.float().mean().item(),
        "clean_accuracy_with_guard": (correct & (clean.score >= tau)).float().mean().item(),
        "asr_without_guard": successful.sum().item() / counted.sum().item(),
        "asr_with_guard": (successful & (triggered.score >= tau)).sum().item() / counted.sum().item(),
    }
    for name, value in expected.items():
        entry = report["metrics"][name]
        assert entry["value"] == pytest.approx(value, abs=1e-6), name
        assert entry["ci_low"] <= entry["value"] + 1e-9 and entry["value"] - 1e-9 <= entry["ci_high"], name
    assert report["data"]["target_class"] == 0 and report["data"]["triggered_layout"] == "by_source_class"
    assert report["counts"]["n_triggered_counted"] == int(counted.sum())
    assert report["counts"]["n_triggered_successful"] == int(successful.sum())
    assert report["bundle"]["tau"] == tau
    markdown = (report_dir / "report.md").read_text()
    assert "AUROC" in markdown and "![ROC curve](roc.png)" in markdown


def test_flat_folder_and_inferred_target(setup, tmp_path, capsys):
    assert evaluate(setup, tmp_path / "flat_report", triggered=setup["flat"]) == 0
    assert "target class inferred: 0" in capsys.readouterr().out
    report = json.loads((tmp_path / "flat_report" / "report.json").read_text())
    assert report["data"]["triggered_layout"] == "flat"
    assert report["data"]["target_class_from"].startswith("inferred")
    assert report["counts"]["n_triggered_counted"] == int((setup["labels"] != TARGET).sum())


def test_bootstrap_is_seeded(setup, report_dir, tmp_path):
    assert evaluate(setup, tmp_path / "again", "--target-class", "0") == 0
    first = json.loads((report_dir / "report.json").read_text())["metrics"]
    second = json.loads((tmp_path / "again" / "report.json").read_text())["metrics"]
    assert first == second


def test_weighted_auroc_equals_sklearn_and_brute_force():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(300, generator=generator) + 1.5
    triggered = torch.cat([torch.randn(200, generator=generator), clean[:20]])  # ties included
    ones = weighted_auroc(clean, triggered, torch.ones(1, 300), torch.ones(1, 220))
    truth = np.r_[np.zeros(300), np.ones(220)]
    assert float(ones[0]) == pytest.approx(roc_auc_score(truth, -np.r_[clean.numpy(), triggered.numpy()]), abs=1e-12)
    wc = torch.randint(0, 3, (4, 300), generator=generator).float()
    wt = torch.randint(0, 3, (4, 220), generator=generator).float()
    fast = weighted_auroc(clean, triggered, wc, wt)
    pair = (triggered[None, :] < clean[:, None]).double() + 0.5 * (triggered[None, :] == clean[:, None]).double()
    for row in range(4):
        slow = (wc[row].double()[:, None] * wt[row].double()[None, :] * pair).sum() / (wc[row].sum() * wt[row].sum())
        assert float(fast[row]) == pytest.approx(float(slow), abs=1e-12)


def test_bootstrap_distribution_is_centred_on_the_estimate():
    generator = torch.Generator().manual_seed(1)
    clean = torch.rand(500, generator=generator) + 0.2
    triggered = torch.rand(400, generator=generator)
    correct = torch.rand(500, generator=generator) < 0.9
    successful = torch.rand(400, generator=generator) < 0.8
    draws = bootstrap_metrics(0.5, clean, correct, triggered, torch.ones(400, dtype=torch.bool), successful, 300)
    assert all(len(v) == 300 for v in draws.values())
    assert float(draws["fpr"].mean()) == pytest.approx(float((clean < 0.5).float().mean()), abs=0.01)
    assert float(draws["asr_without_guard"].mean()) == pytest.approx(float(successful.float().mean()), abs=0.01)


def test_bad_inputs_exit_2(setup, tmp_path, capsys):
    base = ["evaluate", str(setup["bundle"]), "--report", str(tmp_path / "r"), "--quiet", "--device", "cpu"]
    clean, triggered = ["--clean", str(setup["clean"])], ["--triggered", str(setup["triggered"])]
    assert "--clean" in run_error(capsys, base + ["--clean", str(tmp_path / "nope")] + triggered)
    assert "--triggered" in run_error(capsys, base + clean + ["--triggered", str(tmp_path / "nope")])
    assert "--target-class dog" in run_error(capsys, base + clean + triggered + ["--target-class", "dog"])
    assert "out of range" in run_error(capsys, base + clean + triggered + ["--target-class", "7"])
    (tmp_path / "empty").mkdir()
    assert "no images" in run_error(capsys, base + clean + ["--triggered", str(tmp_path / "empty")])
    only_target = tmp_path / "only_target"
    write_folder(only_target, setup["triggered_images"][:4], torch.zeros(4, dtype=torch.long))
    err = run_error(capsys, base + clean + ["--triggered", str(only_target), "--target-class", "0"])
    assert "other source classes" in err
    stray = tmp_path / "stray"
    write_folder(stray, setup["triggered_images"][:4], torch.ones(4, dtype=torch.long))
    write_folder(stray / "zebra", setup["triggered_images"][:2])
    assert "'zebra' is not a class" in run_error(capsys, base + clean + ["--triggered", str(stray)])
    assert "not a class of the bundle" in run_error(capsys, base + ["--clean", str(stray)] + triggered)
    assert "no class sub-folders" in run_error(capsys, base + ["--clean", str(setup["flat"])] + triggered)
    assert "--bootstrap" in run_error(capsys, base + clean + triggered + ["--bootstrap", "-1"])
    err = run_error(capsys, ["evaluate", str(tmp_path / "no_bundle")] + clean + triggered + ["--report", str(tmp_path / "r")])
    assert "no_bundle" in err


def test_detection_metrics_with_per_input_targets_and_a_counted_mask():
    """All-to-all (each input has its own target) and source-specific counting, by hand."""
    from defense.evaluation import detection_metrics

    clean_scores = torch.tensor([0.9, 0.8, 0.05, 0.7])
    clean_predictions = torch.tensor([0, 1, 2, 0])
    clean_labels = torch.tensor([0, 1, 2, 3])  # the last one is wrong: excluded from AUROC and CA
    sources = torch.tensor([0, 1, 2, 3])
    targets = (sources + 1) % 4  # all-to-all
    predictions = torch.tensor([1, 2, 2, 0])  # inputs 0, 1 and 3 reach their target, input 2 does not
    triggered_scores = torch.tensor([0.01, 0.5, 0.02, 0.95])
    metrics = detection_metrics(0.1, clean_scores, clean_predictions, clean_labels, triggered_scores, predictions,
                                sources, targets, counted=torch.ones(4, dtype=torch.bool))
    assert metrics.n_triggered == 4 and metrics.n_triggered_successful == 3
    assert metrics.asr_without_guard == pytest.approx(3 / 4)
    assert metrics.asr_with_guard == pytest.approx(2 / 4)  # input 0 (0.01) is rejected; 1 and 3 pass
    assert metrics.tpr == pytest.approx(1 / 3)
    assert metrics.fpr == pytest.approx(1 / 4) and metrics.clean_accuracy_with_guard == pytest.approx(2 / 4)
    # Clean correct scores {0.9, 0.8, 0.05} vs. successful triggered {0.01, 0.5, 0.95}, low = positive:
    # pairs where the triggered score is lower: 0.01 < all 3, 0.5 < 2, 0.95 < none -> 5 of 9.
    assert metrics.auroc == pytest.approx(5 / 9)

    # Source-specific: only source 1 counts, with the all-to-one target 0.
    metrics = detection_metrics(0.1, clean_scores, clean_predictions, clean_labels, triggered_scores,
                                torch.tensor([0, 0, 0, 0]), sources, 0, counted=sources == 1)
    assert metrics.n_triggered == 1 and metrics.asr_without_guard == 1.0 and metrics.asr_with_guard == 1.0


def test_detection_metrics_accept_a_score_at_tau_and_reject_nan():
    from defense.evaluation import detection_metrics

    # two clean scores at tau and one NaN: "<=" would reject 2 of 4, "<" none, the rule exactly the NaN
    clean = torch.tensor([0.5, 0.5, float("nan"), 0.9], dtype=torch.float64)
    labels = torch.tensor([1, 1, 1, 1])
    triggered = torch.tensor([0.5, 0.1, float("nan")], dtype=torch.float64)
    sources = torch.tensor([1, 1, 1])
    metrics = detection_metrics(0.5, clean, labels, labels, triggered, torch.zeros(3, dtype=torch.long), sources,
                                target_class=0)
    assert metrics.fpr == pytest.approx(1 / 4)  # only the NaN clean score is rejected; 0.5 == tau passes
    assert metrics.asr_with_guard == pytest.approx(1 / 3)  # the triggered 0.5 passes; 0.1 and NaN are rejected
    assert metrics.tpr == pytest.approx(2 / 3)
