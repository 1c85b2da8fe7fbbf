"""The live checks: the FPR band, the clean-score drift statistic and its window, the concentration
test, and their metrics on a registry (hand-computed values)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from service.drift import DriftWindow, UpperTail, drift_statistic
from service.live_checks import FprBand, above_band, below_band, concentrated, lower_limit, upper_limit
from service.monitoring import LiveMonitoring

QUANTILES = {"0.1": 0.05, "0.25": 0.2, "0.5": 1.0, "0.6": 2.0, "0.7": 3.0, "0.75": 3.5, "0.8": 4.0, "0.9": 5.0,
             "0.95": 6.0}
CHI2_6DF_999 = 22.457744484825323  # scipy.stats.chi2.isf(1e-3, 6), as printed in any chi-square table (22.458)


def manifest(quantiles=QUANTILES, target=0.01, fpr_range=(0.0074, 0.0129), expected=0.01, n=None):
    return SimpleNamespace(target_fpr=target, threshold={"tau": 0.1, "fpr_range": list(fpr_range),
                                                         "expected_fpr": expected},
                           calibration={"score_quantiles": quantiles, "n": n})


def test_upper_tail_bins_from_the_manifest_quantiles():
    tail = UpperTail.from_quantiles(QUANTILES)
    assert tail.edges == (1.0, 2.0, 3.0, 3.5, 4.0, 5.0, 6.0)
    # (0.6-0.5)/0.5, (0.7-0.6)/0.5, ..., (1-0.95)/0.5
    assert tail.shares == pytest.approx((0.2, 0.2, 0.1, 0.1, 0.2, 0.1, 0.1))
    assert [tail.bin_of(s) for s in (0.5, 1.0, 1.5, 2.0, 3.2, 5.5, 100.0, math.nan)] == [None, None, 0, 1, 2, 5, 6, None]
    assert tail.min_images == 50  # 5 expected in a bin of a tenth
    # Old builds (0.5, 0.75, 0.9 only): three bins; tied quantiles merge; no median: nothing to compare.
    old = UpperTail.from_quantiles({"0.25": 0.1, "0.5": 1.0, "0.75": 2.0, "0.9": 3.0})
    assert old.shares == pytest.approx((0.5, 0.3, 0.2))
    tied = UpperTail.from_quantiles({"0.5": 1.0, "0.75": 1.0, "0.9": 3.0})
    assert tied.edges == (1.0, 3.0) and tied.shares == pytest.approx((0.8, 0.2))
    assert UpperTail.from_quantiles({"0.25": 0.1, "0.75": 2.0}) is None
    assert UpperTail.from_quantiles(None) is None


def test_drift_statistic_is_chi_square_over_its_critical_value():
    shares = (0.2, 0.2, 0.1, 0.1, 0.2, 0.1, 0.1)
    assert drift_statistic([20, 20, 10, 10, 20, 10, 10], shares) == 0.0  # exactly the calibration shares
    # 100 images all in the first bin: (100-20)^2/20 + 2 * 20^2/20 ... = 320 + 20+10+10+20+10+10 = 400
    assert drift_statistic([100, 0, 0, 0, 0, 0, 0], shares) == pytest.approx(400 / CHI2_6DF_999)
    assert drift_statistic([0] * 7, shares) == 0.0
    # Against quantiles estimated from 300 calibration images above the median (two-sample):
    # 400 * 300 / (300 + 100) = 300.
    assert drift_statistic([100, 0, 0, 0, 0, 0, 0], shares, reference_images=300) == pytest.approx(300 / CHI2_6DF_999)
    assert UpperTail.from_quantiles(QUANTILES, calibration_images=600).reference_images == 300
    assert UpperTail.from_quantiles(QUANTILES).reference_images is None


def test_drift_window_slides_by_blocks_and_needs_enough_images():
    tail = UpperTail.from_quantiles(QUANTILES)
    window = DriftWindow(tail, window=200, blocks=4)  # blocks of 50 images
    window.add([0.5] * 60)  # below the median: counted as images, in no bin
    assert window.images == 60 and window.counts() == [0] * 7
    window.add([1.5] * 49)
    assert window.statistic() == 0.0  # 49 above the median < 50
    window.add([1.5])
    assert window.counts() == [50, 0, 0, 0, 0, 0, 0]
    # chi-square of 50 in the first bin: (50-10)^2/10 + (10+5+5+10+5+5) = 160 + 40 = 200
    assert window.statistic() == pytest.approx(200 / CHI2_6DF_999)
    # 200 more images: 40 fill the third block, the rest fill three more (the fourth keeps 10).
    # The window keeps the last 4 blocks, so the first three have left: 50 + 50 + 50 + 10 images,
    # of which bin 1 holds 50 + 10 and bin 5 holds 40 + 50 + 10.
    window.add([2.5] * 100 + [5.5] * 100)
    assert window.images == 160
    assert window.counts() == [0, 60, 0, 0, 0, 100, 0]
    # memory stays blocks x bins whatever the traffic
    window.add([3.7] * 10_000)
    assert len(window._blocks) == 4 and window.images == 160 and window.counts() == [0, 0, 0, 160, 0, 0, 0]


def test_band_tests_use_the_bundle_bounds():
    # 10,000 images at a high bound of 1.29%: limit 129 + 3.09 * sqrt(129 * 0.9871) = 129 + 34.87
    assert upper_limit(10_000, 0.0129) == pytest.approx(129 + 3.09 * math.sqrt(127.3359))
    assert above_band(164, 10_000, 0.0129) and not above_band(163, 10_000, 0.0129)
    # low 0.74%: 74 - 3.09 * sqrt(74 * 0.9926) = 74 - 26.45 = 47.55
    assert lower_limit(10_000, 0.0074) == pytest.approx(74 - 3.09 * math.sqrt(73.4524))
    assert below_band(47, 10_000, 0.0074) and not below_band(48, 10_000, 0.0074)
    # Too few images for the test: 500 images at 0.74% expect 3.7 rejections (< 10); none rejected is no alert.
    assert not below_band(0, 500, 0.0074) and not above_band(40, 500, 0.0129)
    # A bundle built for 5% is not above its band at 5% (the fixed 5% rule fired on it all day).
    assert not above_band(500, 10_000, 0.0561)


def test_concentration_compares_flagged_with_accepted_shares():
    # 40 flagged, 30 on a class holding 10% of accepted traffic: limit 4 + 3.09 * sqrt(3.6) = 9.86
    assert concentrated(30, 40, 0.1)
    # The same class holds 70% of accepted traffic: 30 of 40 is what clean rejections would give.
    assert not concentrated(30, 40, 0.7)
    # Not most of them, or too few flagged inputs.
    assert not concentrated(20, 40, 0.1) and not concentrated(15, 19, 0.1)


def test_fpr_band_from_manifest():
    band = FprBand.from_manifest(manifest())
    assert band.as_dict() == {"target": 0.01, "low": 0.0074, "expected": 0.01, "high": 0.0129}
    hand_made = SimpleNamespace(target_fpr=0.01, threshold={"tau": 0.5}, calibration={"n": 0, "k": 0})
    assert FprBand.from_manifest(hand_made) is None


def sample(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_live_monitoring_exports_band_counts_and_drift_per_bundle():
    registry = CollectorRegistry()
    monitoring = LiveMonitoring(registry, drift_window=100, drift_blocks=2)
    monitoring.follow("live", "bundle-a", manifest(n=480))
    monitoring.bind_classes(["cat", "dog"])
    monitoring.follow("candidate", "bundle-b", manifest(target=0.05, fpr_range=(0.045, 0.056), expected=0.05))
    assert sample(registry, "badexpert_fpr_band", bundle="bundle-a", role="live", bound="high") == 0.0129
    assert sample(registry, "badexpert_fpr_band", bundle="bundle-b", role="candidate", bound="target") == 0.05
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="bundle-a", role="live", decision="rejected") == 0

    # 60 images above the median, all in the first bin, 2 of them flagged (low scores), class 1 accepted.
    scores = [0.01, 0.02] + [1.5] * 60
    flagged = [True, True] + [False] * 60
    labels = [0, 0] + [1] * 60
    monitoring.record("live", "bundle-a", labels, scores, flagged, ["cat", "dog"])
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="bundle-a", role="live", decision="rejected") == 2
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="bundle-a", role="live", decision="accepted") == 60
    assert sample(registry, "badexpert_accepted_by_class_total", predicted_class="1", class_name="dog") == 60
    assert sample(registry, "badexpert_accepted_by_class_total", predicted_class="0", class_name="cat") == 0
    # chi-square of 60 in a bin of 0.2: (60-12)^2/12 + (12+6+6+12+6+6) = 192 + 48 = 240, two-sample
    # against 240 calibration images above the median: 240 * 240 / 300 = 192, rounded
    assert sample(registry, "badexpert_clean_score_drift", bundle="bundle-a", role="live") == round(192 / CHI2_6DF_999, 2)
    assert sample(registry, "badexpert_clean_score_drift", bundle="bundle-b", role="candidate") == 0.0

    # A hot swap: the old bundle's gauges go, the new one's come with a fresh window.
    monitoring.follow("live", "bundle-c", manifest(quantiles={}))
    assert sample(registry, "badexpert_fpr_band", bundle="bundle-a", role="live", bound="high") is None
    assert sample(registry, "badexpert_clean_score_drift", bundle="bundle-a", role="live") is None
    assert sample(registry, "badexpert_fpr_band", bundle="bundle-c", role="live", bound="low") == 0.0074
    assert sample(registry, "badexpert_clean_score_drift", bundle="bundle-c", role="live") is None  # no quantiles
    monitoring.follow("candidate", None)
    assert sample(registry, "badexpert_fpr_band", bundle="bundle-b", role="candidate", bound="target") is None


def test_decision_only_rounds_the_drift_gauge_coarser():
    registry = CollectorRegistry()
    monitoring = LiveMonitoring(registry, drift_window=100, drift_blocks=2, response_policy="decision_only")
    monitoring.follow("live", "bundle-a", manifest(n=480))
    monitoring.record("live", "bundle-a", [1] * 60, [1.5] * 60, [False] * 60, ["cat", "dog"])
    # 192 / 22.4577 = 8.549...: 8.5 under decision_only (8.55 with full responses)
    assert sample(registry, "badexpert_clean_score_drift", bundle="bundle-a", role="live") == 8.5


def test_the_summary_comes_from_the_bundle_and_is_covered_by_its_digest(tmp_path):
    """What the live checks read (band, calibration quantiles) is in the manifest, under its digest."""
    import json

    import torch

    from defense.bundle import load_bundle, save_bundle
    from defense.errors import BundleIntegrityError
    from defense.guard import Guard
    from defense.models import ModelSpec, create_model
    from synthetic import PREPROCESSING, manifest_fields

    torch.manual_seed(0)
    guard = Guard(*[create_model("tiny_cnn", 4).eval() for _ in range(3)], preprocessing=PREPROCESSING,
                  rejection_threshold=0.5)
    fields = manifest_fields()
    fields["threshold"].update(fpr_range=[0.0074, 0.0129], expected_fpr=0.01)
    fields["calibration"] = {"n": 5000, "k": 50, "score_quantiles": QUANTILES}
    save_bundle(tmp_path / "bundle", guard, ModelSpec("registry", "tiny_cnn", 4), fields)
    _, manifest = load_bundle(tmp_path / "bundle")
    assert FprBand.from_manifest(manifest).as_dict() == {"target": 0.01, "low": 0.0074, "expected": 0.01,
                                                         "high": 0.0129}
    tail = UpperTail.from_quantiles(manifest.calibration["score_quantiles"], manifest.calibration["n"])
    assert tail.edges == (1.0, 2.0, 3.0, 3.5, 4.0, 5.0, 6.0) and tail.reference_images == 2500

    path = tmp_path / "bundle" / "manifest.json"
    document = json.loads(path.read_text())
    document["calibration"]["score_quantiles"]["0.9"] = 50.0  # a summary that hides a drift
    path.write_text(json.dumps(document))
    with pytest.raises(BundleIntegrityError, match="does not match its digest"):
        load_bundle(tmp_path / "bundle")


def test_the_service_wiring_follows_lineups_and_records_both_roles():
    """follow_lineup / record_request, as GuardService calls them at each lineup change and request."""
    from service.metrics import ServiceMetrics
    from service.monitoring import follow_lineup, record_request
    from service.shadow import Lineup

    metrics = ServiceMetrics()
    monitoring = LiveMonitoring(metrics.registry, drift_window=100, drift_blocks=2)
    registry = metrics.registry
    live = SimpleNamespace(bundle_id="a", manifest=manifest(n=480), class_names=["cat", "dog"])
    candidate = SimpleNamespace(bundle_id="b", manifest=manifest(target=0.05, fpr_range=(0.045, 0.056), expected=0.05),
                                class_names=["cat", "dog"])
    metrics.bind_bundle("a", 0.1, 0.01, "enforce", live.class_names)
    follow_lineup(metrics, monitoring, Lineup(live, candidate))
    assert sample(registry, "badexpert_bundle_decisions_total", bundle="b", role="candidate", decision="rejected") == 0

    decisions = SimpleNamespace(labels=[0, 1, 1], scores=[0.01, 1.5, 2.5])
    shadow = SimpleNamespace(bundle=candidate, labels=[0, 1, 0], scores=[0.01, 0.02, 2.5], flagged=[True, True, False])
    record_request(metrics, monitoring, live, decisions, [True, False, False], shadow)
    assert sample(registry, "badexpert_inputs_total", decision="rejected") == 1
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="a", role="live", decision="accepted") == 2
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="b", role="candidate", decision="rejected") == 2
    assert sample(registry, "badexpert_candidate_disagreements_total", live_bundle="a", candidate_bundle="b") == 1
    assert sample(registry, "badexpert_accepted_by_class_total", predicted_class="1", class_name="dog") == 2
    assert sample(registry, "badexpert_rejected_by_class_total", predicted_class="0", class_name="cat") == 1

    # Promotion: the candidate is live, with its own band; the old live bundle's and the candidate role's go.
    follow_lineup(metrics, monitoring, Lineup(candidate))
    assert sample(registry, "badexpert_fpr_band", bundle="b", role="live", bound="high") == 0.056
    assert sample(registry, "badexpert_fpr_band", bundle="b", role="candidate", bound="high") is None
    assert sample(registry, "badexpert_fpr_band", bundle="a", role="live", bound="high") is None


def test_a_request_counts_on_the_series_found_at_follow_time_and_the_drift_is_computed_when_read():
    registry = CollectorRegistry()
    monitoring = LiveMonitoring(registry, drift_window=100, drift_blocks=2)
    monitoring.follow("live", "bundle-a", manifest(n=480))
    names = ["cat", "dog"]
    monitoring.bind_classes(names)
    for _ in range(3):  # the bound list itself: the series looked up at bind time
        monitoring.record("live", "bundle-a", [1] * 20, [1.5] * 20, [False] * 20, names)
    assert sample(registry, "badexpert_accepted_by_class_total", predicted_class="1", class_name="dog") == 60
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="bundle-a", role="live", decision="accepted") == 60
    # the same 60 images as in the test above: the same statistic, though no request computed it
    assert sample(registry, "badexpert_clean_score_drift", bundle="bundle-a", role="live") == round(192 / CHI2_6DF_999, 2)
    # other names (a request decided by a bundle whose names differ) and a bundle not followed still count
    monitoring.record("live", "bundle-a", [0], [1.5], [False], ["chat", "chien"])
    monitoring.record("candidate", "bundle-z", [0], [0.01], [True])
    assert sample(registry, "badexpert_accepted_by_class_total", predicted_class="0", class_name="chat") == 1
    assert sample(registry, "badexpert_bundle_inputs_total", bundle="bundle-z", role="candidate", decision="rejected") == 1
