"""The feature signal (defense/features.py, defense/feature_signal.py, defense/feature_fit.py): its
math against hand-computed values, the automatic layer choice, a planted feature-space outlier
rejected where the expert's score lets it through, the engines, and the bundle's statistics file
covered by the digest (a tampered file or record is refused)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

from defense.bundle import FEATURE_FILE, load_bundle, save_bundle
from defense.engine import build_engine
from defense.errors import BundleIntegrityError
from defense.feature_fit import fit_guard_features
from defense.feature_signal import FeatureDetector, class_means, mahalanobis, reference_scale, whitening_factor
from defense.features import ActivationTap, find_feature_layers
from defense.guard import Guard
from defense.models import create_model
from defense.models.loading import ModelSpec
from synthetic import NUM_CLASSES, PREPROCESSING, make_images, manifest_fields


def test_mahalanobis_with_identity_whitening_is_the_squared_distance_to_the_label_mean():
    means = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    features = torch.tensor([[3.0, 4.0], [1.0, 2.0], [2.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    assert mahalanobis(features, labels, means.double(), torch.eye(2, dtype=torch.float64)).tolist() == [25.0, 0.0, 1.0]


def test_class_means_fall_back_to_the_overall_mean_for_an_empty_class():
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 6.0]])
    means = class_means(features, torch.tensor([0, 0, 2]), 3)
    assert means.tolist() == [[2.0, 0.0], [4 / 3, 2.0], [0.0, 6.0]]


def test_whitening_factor_inverts_the_shrunk_covariance():
    from sklearn.covariance import LedoitWolf

    generator = torch.Generator().manual_seed(0)
    residuals = torch.randn(500, 3, generator=generator, dtype=torch.float64) @ torch.tensor(
        [[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.3, 0.2]], dtype=torch.float64)
    factor = whitening_factor(residuals)
    covariance = torch.from_numpy(LedoitWolf(assume_centered=True).fit(residuals.numpy()).covariance_)
    product = covariance @ factor @ factor.T
    assert torch.allclose(product, torch.eye(3, dtype=torch.float64), atol=1e-4)


def test_reference_scale_is_the_median_and_its_distance_to_the_tail_quantile():
    values = torch.arange(1.0, 11.0)  # median 5.5, q90 9.1, q10 1.9 (linear interpolation)
    assert reference_scale(values, upper=True) == pytest.approx((5.5, 3.6))
    assert reference_scale(values, upper=False) == pytest.approx((5.5, 3.6))
    assert reference_scale(torch.tensor([1.0, 1.0, 1.0, math.nan]), upper=True) == (1.0, 1e-6)


def test_the_fused_rule_is_the_more_suspect_of_the_two_signals():
    detector = FeatureDetector(["a"], [torch.zeros(2, 1)], [torch.eye(1)], torch.zeros(1), torch.ones(1),
                               torch.tensor([0.0, 1.0, math.log(10.0), 2.0]), "fused")
    # log s_F = log 10 - 2 * anomaly
    assert detector.feature_log_score(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([math.log(10), math.log(10) - 2])
    expert = torch.tensor([1.0, 5.0]).log().double()
    feature = torch.tensor([3.0, 2.0]).log().double()
    assert detector.decision_log_score(expert, feature).exp().tolist() == pytest.approx([1.0, 2.0])
    detector.signals = "expert"
    assert detector.decision_log_score(expert, feature).exp().tolist() == pytest.approx([1.0, 5.0])


def test_the_layers_are_the_stage_ends_and_the_classifiers_input():
    example = torch.randn(2, 3, 32, 32)
    # each resolution's end is the input of the block that starts the next one: a boundary between blocks
    assert find_feature_layers(create_model("cifar_resnet_compact", 10), example) == [
        "stages.1:input", "stages.2:input", "stages", "linear:input"]
    assert find_feature_layers(create_model("cifar_resnet_compact", 10), example, max_stages=1) == [
        "stages", "linear:input"]
    # a global pool's 1x1 output is the classifier's input already
    assert find_feature_layers(create_model("tiny_cnn", 10), example) == ["3:input", "6:input", "8", "11:input"]
    assert find_feature_layers(create_model("cifar_mobilenet_v2_compact", 10), example)[:2] == [
        "features.4:input", "features.7:input"]  # between inverted-residual blocks, not inside one


def test_a_module_called_twice_is_never_chosen():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.act = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
            self.pool, self.head = nn.MaxPool2d(2), nn.Linear(4, 2)

        def forward(self, x):
            x = self.pool(self.act(self.conv(x)))
            return self.head(self.act(x).mean(dim=(2, 3)))  # self.act runs at two resolutions

    assert find_feature_layers(Shared(), torch.randn(2, 3, 8, 8)) == ["pool:input", "pool", "head:input"]


def test_the_tap_keeps_the_pooled_activations_of_the_latest_forward():
    model = create_model("cifar_resnet_compact", 10).eval()
    tap = ActivationTap(model, ["stages", "linear:input"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        model(images)
        stage, head = tap.take()
        expected = model.stages(torch.relu(model.bn1(model.conv1(images)))).mean(dim=(2, 3))
    assert stage.shape == (3, 64) and torch.allclose(stage, expected, atol=1e-5)
    assert torch.allclose(head, expected, atol=1e-5)  # the classifier reads the pooled last stage
    with pytest.raises(RuntimeError, match="did not run"):
        tap.take()  # taken: nothing until the next forward
    with pytest.raises(ValueError, match="no layer 'nope'"):
        ActivationTap(model, ["nope"])


@pytest.fixture(scope="module")
def trained_guard() -> Guard:
    """M trained on the synthetic classes; B and M' are copies of it, so the expert's score cannot
    tell anything apart and only the feature signal can."""
    from synthetic import fit

    images, labels = make_images(480, seed=0)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", NUM_CLASSES)
    model = fit(model, images, labels, PREPROCESSING.normalizer(), torch.optim.Adam(model.parameters(), lr=3e-3),
                6, 64, generator)
    copies = [create_model("tiny_cnn", NUM_CLASSES) for _ in range(2)]
    for copy in copies:
        copy.load_state_dict(model.state_dict())
    guard = Guard(model, *copies, preprocessing=PREPROCESSING, rejection_threshold=math.nan)
    fit_guard_features(guard, images[:320], images[320:], NUM_CLASSES, "fused")
    return guard


def planted_outliers(n: int = 16) -> torch.Tensor:
    """Images unlike any clean one: saturated stripes in place of the coloured square on noise."""
    images, _ = make_images(n, seed=7)
    images[:, :, ::2] = 255
    images[:, :, 1::2] = 0
    return images


def test_a_planted_feature_space_outlier_is_rejected_where_the_expert_lets_it_through(trained_guard):
    guard = trained_guard
    calibration, _ = make_images(200, seed=11)
    clean_scores = guard.score(calibration)
    guard.rejection_threshold = float(clean_scores.score.sort().values[1])  # 1% of 200 rejected
    outliers = guard.score(planted_outliers())
    expert_threshold = float(clean_scores.expert_score.sort().values[1])
    assert (outliers.expert_score >= expert_threshold).float().mean() > 0.5  # the expert's score alone passes most
    assert guard.rejects(outliers.score).all()  # the fused score rejects every one
    assert (outliers.score <= outliers.expert_score).all() and (outliers.score == outliers.feature_score).all()
    fresh, _ = make_images(200, seed=12)
    assert guard.rejects(guard.score(fresh).score).float().mean() <= 0.05


@pytest.mark.parametrize("name", ["jit", "fused"])
def test_the_engines_compute_the_feature_signal_in_the_same_pass(trained_guard, name):
    guard = trained_guard
    guard.rejection_threshold = 1.0
    batches = [make_images(n, seed=n)[0] for n in (2, 1, 5)]
    fallbacks = []
    engine = build_engine(guard, name, batches, on_fallback=fallbacks.append)
    assert engine.name == name and not fallbacks
    images = torch.cat([make_images(30, seed=3)[0], planted_outliers(6)])
    got, want = engine(images), guard.score_batch(images)
    assert torch.allclose(got.score, want.score, rtol=1e-5) and torch.allclose(got.feature_score, want.feature_score, rtol=1e-5)
    assert torch.isfinite(got.feature_score).all()


def test_the_merged_networks_compute_the_feature_signal_from_ms_share(trained_guard):
    """M and B merged beside M' (two cores) and the three merged (one core) read M's activations from M's
    channel group: the feature score is the eager guard's, outliers included. B and M' are moved off
    M's weights here, so that reading another model's group would show."""
    models = [create_model("tiny_cnn", NUM_CLASSES) for _ in range(3)]
    torch.manual_seed(1)
    for index, model in enumerate(models):
        model.load_state_dict(trained_guard.model.state_dict())
        with torch.no_grad():
            for parameter in model.parameters() if index else ():
                parameter.add_(0.05 * torch.randn_like(parameter))
    guard = Guard(*(model.eval() for model in models), preprocessing=PREPROCESSING, rejection_threshold=1.0,
                  feature_detector=trained_guard.feature_detector)
    batches = [make_images(n, seed=n)[0] for n in (2, 1, 5)]
    fallbacks = []
    engine = build_engine(guard, "jit", batches, on_fallback=fallbacks.append, parallel_up_to=8, merged_up_to=8,
                          time_merged=False)
    assert engine.pair_up_to == 8 and engine.merged_up_to == 8 and not fallbacks, fallbacks
    images = torch.cat([make_images(4, seed=5)[0], planted_outliers(4)])
    want = guard.score_batch(images)
    for got in (engine(images), engine(images, cores=1)):
        assert torch.allclose(got.score, want.score, rtol=1e-5)
        assert torch.allclose(got.feature_score, want.feature_score, rtol=1e-5)


def test_the_statistics_are_saved_and_covered_by_the_digest(trained_guard, tmp_path):
    guard = trained_guard
    guard.rejection_threshold = 0.5
    spec = ModelSpec(kind="registry", name="tiny_cnn", num_classes=NUM_CLASSES)
    save_bundle(tmp_path / "bundle", guard, spec, manifest_fields())
    loaded, manifest = load_bundle(tmp_path / "bundle")
    record = manifest.model_extra["feature_signal"]
    assert record["signals"] == "fused" and record["layers"] == guard.feature_detector.layers
    images = torch.cat([make_images(20, seed=4)[0], planted_outliers(4)])
    assert torch.equal(loaded.score(images).score, guard.score(images).score)

    statistics = tmp_path / "bundle" / FEATURE_FILE
    original = statistics.read_bytes()
    statistics.write_bytes(original[:-8] + bytes(8))  # the last means/whitening values zeroed
    with pytest.raises(BundleIntegrityError, match="feature statistics were changed"):
        load_bundle(tmp_path / "bundle")
    statistics.write_bytes(original)

    manifest_path = tmp_path / "bundle" / "manifest.json"
    document = json.loads(manifest_path.read_text())
    document["feature_signal"]["signals"] = "expert"  # an attacker switching the signal off
    manifest_path.write_text(json.dumps(document))
    with pytest.raises(BundleIntegrityError, match="does not match its digest"):
        load_bundle(tmp_path / "bundle")


def test_statistics_that_do_not_fit_their_layers_are_refused():
    with pytest.raises(ValueError, match="do not fit together"):
        FeatureDetector(["a"], [torch.zeros(2, 3)], [torch.eye(2)], torch.zeros(1), torch.ones(1),
                        torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="unexpectedly"):
        FeatureDetector.from_tensors(["a", "b"], "fused", {"means_0": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="positive spreads"):
        FeatureDetector(["a"], [torch.zeros(2, 1)], [torch.eye(1)], torch.zeros(1), torch.ones(1),
                        torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_a_model_without_readable_layers_keeps_the_experts_score_with_a_warning():
    from defense.build import BuildConfig, add_feature_signal
    from defense.data import ImageSet

    class Flat(nn.Module):  # no 4-D activation, no nn.Linear: nothing to read
        def forward(self, x):
            return x.flatten(1)[:, :NUM_CLASSES] * 1.0

    images, labels = make_images(40, seed=0)
    guard = Guard(Flat(), Flat(), Flat(), preprocessing=PREPROCESSING, rejection_threshold=math.nan)
    clean = ImageSet(images, labels, [], [None] * 40)
    warnings: list[str] = []
    assert add_feature_signal(guard, clean, clean, NUM_CLASSES, BuildConfig(), lambda *_: None, warnings) is None
    assert guard.feature_detector is None and "feature signal is off" in warnings[0]


def test_bad_signal_options_are_refused_with_the_option_named():
    from defense.build import BuildConfig, build_guard
    from defense.data import ImageSet
    from defense.errors import UserError

    images, labels = make_images(40, seed=0)
    clean = ImageSet(images, labels, [], [None] * 40)
    model = create_model("tiny_cnn", NUM_CLASSES)
    for config, message in ((BuildConfig(signals="both"), "--signals both"),
                            (BuildConfig(feature_stages=-1), "--feature-stages -1")):
        with pytest.raises(UserError, match=message):
            build_guard(model, clean, PREPROCESSING, NUM_CLASSES, config, log=lambda *_: None)
