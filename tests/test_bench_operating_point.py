"""The operating-point bench's own arithmetic (no CIFAR-10 needed)."""

import torch

from bench.operating_point import POOL_SIZE, float32_scores, split_test_set, ties
from defense.score import guard_scores


def test_calibration_pool_and_evaluation_images_are_disjoint_halves():
    pool, evaluation = split_test_set(10000, seed=0)
    assert len(pool) == POOL_SIZE == len(evaluation)
    assert set(pool.tolist()).isdisjoint(evaluation.tolist())
    assert torch.equal(split_test_set(10000, seed=0)[0], pool)  # seeded


def test_ties_counts_every_input_that_shares_its_score():
    assert ties(torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0])) == 5
    assert ties(torch.tensor([0.1, 0.2, 0.3])) == 0


def test_the_float32_formula_ties_saturated_experts_and_the_exact_one_does_not():
    """Experts with margins 20, 25 and 30 and three different auxiliaries: float32 gives 0, 0, 0."""
    expert = torch.zeros(3, 10)
    expert[:, 0] = torch.tensor([20.0, 25.0, 30.0])
    auxiliary = torch.zeros(3, 10)
    auxiliary[:, 0] = torch.tensor([-2.0, 0.0, 1.0])
    model = torch.zeros(3, 10)
    model[:, 0] = 5.0
    assert ties(float32_scores(model, expert, auxiliary, 0.5)) == 3
    assert ties(guard_scores(model, expert, auxiliary).score) == 0


def test_calibration_draws_measure_each_tau_on_the_evaluation_images():
    """Pool scores 1..10, n = 10 (every draw is the whole pool), conformal at 10%: k = floor(0.1 * 11)
    = 1, tau = 1. Clean evaluation scores 0.5, 1, 2, 3: only 0.5 < 1 is rejected, FPR 1/4. Triggered:
    0.2 (successful), 1.5 (successful), 0.1 (not successful): only 1.5 passes, ASR 1/3."""
    from bench.calibration_draws import draw_operating_points, summarize

    pool = torch.arange(1, 11, dtype=torch.float64)
    clean = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)
    triggered = torch.tensor([0.2, 1.5, 0.1], dtype=torch.float64)
    successful = torch.tensor([True, True, False])
    fprs, asrs, refused = draw_operating_points(pool, clean, triggered, successful, 3, n=10, fpr=0.1,
                                                rule="conformal", draws=5)
    assert refused == 0 and fprs.tolist() == [0.25] * 5 and asrs.tolist() == [1 / 3] * 5
    summary = summarize(fprs, asrs, refused, n=10, k=1, rule="conformal", n_eval=4, build_fpr=0.5)
    assert summary.fpr_mean == 0.25 and summary.asr_mean == summary.asr_p05 == summary.asr_p95 == 1 / 3
    assert summary.build_fpr_percentile == 1.0  # every draw rejects fewer clean inputs than the build's 0.5


def test_calibration_draws_count_a_tau_on_a_tie_as_refused():
    """Two pool scores tie at 0; every draw is the whole pool, k = floor(0.2 * 5) = 1, so tau = 0 sits
    on the tie and the draw is refused, as the build would refuse it."""
    from bench.calibration_draws import draw_operating_points

    pool = torch.tensor([0.0, 0.0, 5.0, 6.0], dtype=torch.float64)
    clean = torch.tensor([1.0, 2.0], dtype=torch.float64)
    fprs, asrs, refused = draw_operating_points(pool, clean, clean, torch.tensor([True, True]), 2, n=4, fpr=0.2,
                                                rule="conformal", draws=3)
    assert refused == 3 and len(fprs) == len(asrs) == 0


def test_a_bundle_is_resumed_only_when_built_from_the_same_weights_and_settings(monkeypatch, tmp_path):
    """bench.operating_point used to resume any bundle folder with a manifest, whatever it was built from."""
    import json

    import bench.operating_point as operating_point

    runs = []

    def fake_badexpert(argv):
        out = argv[argv.index("--out") + 1]
        runs.append(argv[:argv.index("--out")])
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "manifest.json").write_text(json.dumps({"bundle_id": f"b{len(runs)}"}))
        return 0

    monkeypatch.setattr(operating_point, "badexpert", fake_badexpert)
    bundle = tmp_path / "bundles" / "cal20"
    argv = ["build", "--weights", "w.safetensors", "--calibration-fraction", "0.2"]
    operating_point.build(bundle, argv, {"weights_sha256": "aa"})
    operating_point.build(bundle, argv, {"weights_sha256": "aa"})  # the same: resumed
    assert len(runs) == 1
    operating_point.build(bundle, argv, {"weights_sha256": "bb"})  # retrained weights at the same path
    operating_point.build(bundle, argv[:-1] + ["0.4"], {"weights_sha256": "bb"})  # other build settings
    assert len(runs) == 3
    operating_point.build_record(bundle).unlink()  # a bundle from before records were kept
    operating_point.build(bundle, argv[:-1] + ["0.4"], {"weights_sha256": "bb"})
    assert len(runs) == 4


def test_result_rows_are_keyed_by_more_than_the_bundle_id():
    from bench.attacks import ATTACKS
    from bench.operating_point import row_key

    blend = ATTACKS["blend"]()
    key = row_key("bundle", "aa", blend, 0, 5000)
    assert key == row_key("bundle", "aa", ATTACKS["blend"](), 0, 5000)
    assert len({key, row_key("bundle", "bb", blend, 0, 5000), row_key("bundle", "aa", ATTACKS["blend"](poison_rate=0.05), 0, 5000),
                row_key("bundle", "aa", blend, 1, 5000), row_key("bundle", "aa", blend, 0, 4000),
                row_key("other", "aa", blend, 0, 5000)}) == 6
