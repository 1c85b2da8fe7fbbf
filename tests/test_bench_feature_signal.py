"""bench.feature_signal's bookkeeping: the layer subsets and the rules computed from cached parts
match the library's own fused score (synthetic parts, no data needed)."""

from __future__ import annotations

import math

import pytest
import torch

from bench.feature_signal import PARTS, layer_subsets, rule_scores
from defense.feature_signal import FeatureDetector


def test_layer_subsets_split_stage_ends_from_the_classifiers_input():
    names = ["a:input", "b:input", "c", "d", "e", "fc:input"]
    subsets = layer_subsets(names, default_stages=4)
    assert subsets == {"default": [1, 2, 3, 4, 5], "stages": [0, 1, 2, 3, 4], "penultimate": [5], "last2": [4, 5]}
    assert layer_subsets(["a", "b"]) == {"default": [0, 1], "stages": [0, 1]}  # no classifier input: no head subsets


def synthetic_parts(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    parts = {"layer_center": torch.tensor([1.0, 2.0], dtype=torch.float64),
             "layer_spread": torch.tensor([0.5, 2.0], dtype=torch.float64)}
    for name in PARTS:
        parts[f"{name}.expert_log"] = torch.randn(50, generator=generator, dtype=torch.float64) + 3
        parts[f"{name}.distances"] = torch.rand(50, 2, generator=generator, dtype=torch.float64) * 4
    return parts


def test_the_rules_from_parts_are_the_products_fused_score():
    parts = synthetic_parts()
    expert, fused = rule_scores(parts, "expert", None), rule_scores(parts, "fused", [0, 1])
    features = rule_scores(parts, "features", [0, 1])
    for name in PARTS:
        assert torch.allclose(expert[name], parts[f"{name}.expert_log"].exp())
        assert torch.allclose(fused[name], torch.minimum(expert[name], features[name]))
    # the product's detector, given the same reference statistics, scores the same
    raw = ((parts["select.distances"] - parts["layer_center"]) / parts["layer_spread"]).mean(1)
    q = lambda values, level: float(torch.quantile(values, level))  # noqa: E731
    normalizer = torch.tensor([q(raw, 0.5), q(raw, 0.9) - q(raw, 0.5), q(parts["select.expert_log"], 0.5),
                               q(parts["select.expert_log"], 0.5) - q(parts["select.expert_log"], 0.1)], dtype=torch.float64)
    detector = FeatureDetector(["a", "b"], [torch.zeros(1, 1)] * 2, [torch.eye(1)] * 2, parts["layer_center"],
                               parts["layer_spread"], normalizer)
    anomaly = ((((parts["clean.distances"] - parts["layer_center"]) / parts["layer_spread"]).mean(1)
                - normalizer[0]) / normalizer[1])
    product = detector.decision_log_score(parts["clean.expert_log"], detector.feature_log_score(anomaly)).exp()
    assert torch.allclose(product, fused["clean"], rtol=1e-12)


def test_a_smaller_feature_weight_lets_the_feature_signal_reject_less():
    parts = synthetic_parts(1)
    full, half = rule_scores(parts, "features", [0, 1]), rule_scores(parts, "features", [0, 1], feature_weight=0.5)
    log_full, log_half = full["clean"].log(), half["clean"].log()
    center = float(torch.quantile(parts["select.expert_log"], 0.5))
    assert torch.allclose(log_half - center, (log_full - center) / 2)  # half the anomaly, half the distance from the center
    assert not math.isnan(float(log_half.sum()))


def test_knn_distance_is_the_kth_nearest_cosine_distance_within_the_label():
    from bench.feature_statistics import knn_distance
    fit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    fit_labels = torch.tensor([0, 0, 0, 1])
    query, labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1])
    # label 0: cosine distances 0, 1, 1 - 1/sqrt(2); the 2nd nearest is 1 - 1/sqrt(2)
    got = knn_distance(query, labels, fit, fit_labels, k=2)
    assert got[0].item() == pytest.approx(1 - 2 ** -0.5)
    assert got[1].item() == pytest.approx(2.0)  # label 1 has one fitted row, opposite: its distance


def test_ted_rank_counts_the_rows_closer_than_the_nearest_of_the_same_label():
    from bench.feature_statistics import nearest_same_class_rank
    fit = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # standardized by mean 1.5, std 1.29...
    fit_labels = torch.tensor([0, 0, 1, 1])
    rank = nearest_same_class_rank(torch.tensor([[0.1], [0.1]]), torch.tensor([0, 1]), fit, fit_labels)
    scale = float(fit.std())
    assert math.floor(rank[0].item()) == 0 and math.floor(rank[1].item()) == 2  # two label-0 rows come first
    d = 1.9 / scale  # the nearest label-1 row, in standardized units
    assert rank[1].item() == pytest.approx(2 + d / (1 + d))
