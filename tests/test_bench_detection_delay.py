"""bench.detection_delay: the simulated streams and the delay it reports (cheap: a few runs)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.detection_delay import delays, main, scenario_probabilities


def test_scenario_probabilities_split_clean_and_triggered_traffic():
    p = scenario_probabilities(classes=4, clean_fpr=0.02, burst=0.1, detect=0.9)
    # rejected per class: 0.9 * 0.02 / 4 = 0.0045, plus 0.1 * 0.9 on the target (class 0)
    assert p[:4] == pytest.approx([0.0945, 0.0045, 0.0045, 0.0045])
    # accepted: 0.9 * 0.98 / 4 = 0.2205, plus the 0.01 triggered inputs the guard missed
    assert p[4:] == pytest.approx([0.2305, 0.2205, 0.2205, 0.2205])
    assert p.sum() == pytest.approx(1.0)


def test_a_larger_burst_is_found_sooner_and_clean_traffic_is_quiet():
    rng = np.random.default_rng(0)
    clean = scenario_probabilities(10, 0.01, 0.0, 0.9)
    band = (0.0074, 0.0129)
    small = delays(rng, 1.0, clean, scenario_probabilities(10, 0.01, 0.05, 0.9), band, 10, runs=5, horizon=20_000)
    large = delays(rng, 1.0, clean, scenario_probabilities(10, 0.01, 0.2, 0.9), band, 10, runs=5, horizon=20_000)
    for name in ("above_band", "concentration"):
        assert small[name]["detected"] == large[name]["detected"] == 5
        assert large[name]["median"] < small[name]["median"]
        assert small[name]["false_alarms"] == large[name]["false_alarms"] == 0
    # No change at all: no condition holds within the horizon.
    quiet = delays(rng, 1.0, clean, clean, band, 10, runs=3, horizon=5_000)
    assert quiet["above_band"]["detected"] == quiet["concentration"]["detected"] == 0


def test_the_table_names_every_scenario(capsys):
    assert main(["--runs", "1", "--rates", "5", "--bursts", "0.2", "--horizon", "3000", "--drift-runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "FPR drift 1% -> 3%" in out and "burst 20% triggered" in out and "5 images/s" in out
    assert "clean + 5% triggered" in out and "shifted by 0.5 sd" in out
