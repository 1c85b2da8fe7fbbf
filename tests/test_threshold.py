import pytest
import torch
from scipy.stats import binom

from defense.threshold import calibrate_threshold, conformal_rank, ucb_rank


def test_conformal_rank_is_floor_of_fpr_times_n_plus_one():
    assert conformal_rank(400, 0.01) == 4  # floor(4.01)
    assert conformal_rank(399, 0.01) == 4  # floor(4.00)
    assert conformal_rank(398, 0.01) == 3  # floor(3.99)
    assert conformal_rank(98, 0.01) == 0


def test_conformal_threshold_is_the_kth_smallest_score():
    scores = torch.arange(1, 401, dtype=torch.float32).flip(0)  # 400 ... 1
    threshold = calibrate_threshold(scores, fpr=0.01, rule="conformal")
    assert (threshold.n, threshold.k, threshold.tau) == (400, 4, 4.0)
    assert threshold.calibration_fpr == pytest.approx(3 / 400)  # scores 1, 2, 3 are below tau
    assert threshold.expected_fpr == pytest.approx(4 / 401)


def test_ucb_rank_bounds_the_fpr_with_confidence():
    # k = 2 for n = 400: P(Bin(400, .01) >= 2) = 0.910 >= 0.9, P(>= 3) = 0.763 < 0.9
    assert ucb_rank(400, 0.01, 0.1) == 2
    assert binom.sf(1, 400, 0.01) >= 0.9 > binom.sf(2, 400, 0.01)
    assert ucb_rank(100, 0.01, 0.1) == 0


def test_ucb_falls_back_with_a_warning_when_the_set_is_small():
    threshold = calibrate_threshold(torch.linspace(0, 1, 150), fpr=0.01, rule="ucb")
    assert threshold.rule == "conformal" and threshold.k == 1 and threshold.warning


def test_too_few_scores_reject_almost_nothing_and_say_so():
    threshold = calibrate_threshold(torch.linspace(0, 1, 50), fpr=0.01)
    assert threshold.k == 1 and threshold.tau == 0.0 and "too few" in threshold.warning


@pytest.mark.parametrize("rule,bound", [("conformal", "mean"), ("ucb", "quantile")])
def test_realized_fpr_on_fresh_scores_respects_the_target(rule, bound):
    """Synthetic exchangeable scores: calibrate on n, measure the rejection rate on fresh draws."""
    generator = torch.Generator().manual_seed(0)
    n, fpr, trials = 400, 0.01, 400
    calibration = torch.randn(trials, n, generator=generator)
    fresh = torch.randn(trials, 20000, generator=generator)
    realized = torch.empty(trials)
    for t in range(trials):
        tau = calibrate_threshold(calibration[t], fpr=fpr, rule=rule).tau
        realized[t] = (fresh[t] < tau).float().mean()
    if bound == "mean":
        assert realized.mean() <= fpr * 1.1  # E[FPR] = k / (n + 1) = 0.00998
    else:
        assert (realized > fpr).float().mean() <= 0.1 + 0.04  # P(FPR > target) <= delta, sampling slack
        assert realized.mean() < fpr


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError):
        calibrate_threshold(torch.tensor([0.1, float("nan")]))
