import math

import pytest
import torch
from scipy.stats import beta, binom

from defense.threshold import (ThresholdError, calibrate_threshold, conformal_rank, realized_fpr_range,
                               recommended_calibration_size, ucb_rank)


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_refused(bad):
    with pytest.raises(ThresholdError, match="1 of 3 calibration scores are not finite"):
        calibrate_threshold(torch.tensor([0.1, bad, 0.3]))


def test_a_threshold_on_a_tie_is_refused():
    # conformal k = floor(0.01 * 401) = 4: the 4th smallest is 0.5, and so is the 5th: a tie at tau
    scores = torch.cat([torch.tensor([0.1, 0.2, 0.3, 0.5, 0.5]), torch.linspace(1, 2, 395)])
    with pytest.raises(ThresholdError, match="shared by 2 of the 400"):
        calibrate_threshold(scores, fpr=0.01)
    # the same tie one rank further up does not touch tau (0.4 is the 4th smallest, alone)
    scores[3] = 0.4
    assert calibrate_threshold(scores, fpr=0.01).tau == pytest.approx(0.4)


def test_zero_scores_tied_at_tau_are_refused_not_a_silent_pass_all():
    # the failure the float32 score made: clean calibration images whose score rounded to 0 tie,
    # tau = 0, and "score < 0" then rejects nothing
    scores = torch.cat([torch.zeros(6), torch.linspace(0.5, 2, 394)])
    with pytest.raises(ThresholdError):
        calibrate_threshold(scores, fpr=0.01)


def test_fpr_range_is_the_beta_quantiles_of_the_kth_order_statistic():
    low, high = realized_fpr_range(400, 4, confidence=0.95)
    assert low == pytest.approx(beta.ppf(0.025, 4, 397)) and high == pytest.approx(beta.ppf(0.975, 4, 397))
    assert 0.0027 < low < 0.0028 and 0.0217 < high < 0.0218  # hand-checked against scipy
    threshold = calibrate_threshold(torch.linspace(0, 1, 400), fpr=0.01)
    assert threshold.fpr_range == pytest.approx((low, high))


def test_realized_fpr_falls_in_the_reported_range_at_its_confidence():
    generator = torch.Generator().manual_seed(1)
    n, trials = 800, 300
    inside = 0
    for _ in range(trials):
        threshold = calibrate_threshold(torch.randn(n, generator=generator), fpr=0.01)
        # the realized FPR on infinitely many fresh N(0, 1) scores is Phi(tau)
        realized = 0.5 * (1 + math.erf(threshold.tau / math.sqrt(2)))
        inside += threshold.fpr_range[0] <= realized <= threshold.fpr_range[1]
    assert 0.91 <= inside / trials <= 0.99  # 95% nominal, binomial slack for 300 trials


def test_advice_in_words_when_the_calibration_set_is_too_small():
    small = calibrate_threshold(torch.linspace(0, 1, 400), fpr=0.01, rule="ucb")
    assert small.k == 2
    assert any("400 calibration images can only promise a 1.00% target by rejecting about 0.50%" in a
               for a in small.advice)
    assert any("--calibration-data" in a for a in small.advice)
    wide = calibrate_threshold(torch.linspace(0, 1, 400), fpr=0.01, rule="conformal")
    assert any("anywhere in 0.27%-2.18%" in a for a in wide.advice)
    large = calibrate_threshold(torch.linspace(0, 1, 5000), fpr=0.01, rule="conformal")
    assert large.advice == [] and large.fpr_range[1] < 0.015


def test_recommended_calibration_size_meets_the_overshoot_bound():
    n = recommended_calibration_size(0.01)
    assert realized_fpr_range(n, conformal_rank(n, 0.01))[1] <= 0.015
    assert realized_fpr_range(n - 100, conformal_rank(n - 100, 0.01))[1] > 0.015
