import math

import pytest
import torch

from defense.score import guard_scores, triangle_score


def test_first_term_wins_when_expert_agrees():
    # b = 0.9, a = 0.1, alpha = 0.5: first = 0.1 / (0.5 * 0.9) = 0.2222, second = 0.1 / 0.4 = 0.25
    score = triangle_score(torch.tensor([0.9]), torch.tensor([0.1]), alpha=0.5)
    assert score.item() == pytest.approx(0.1 / 0.45, rel=1e-6)


def test_minimum_of_the_two_terms():
    # b = 0.2, a = 0.3: first = 0.3 / 0.1 = 3.0, second = 0.8 / 0.2 = 4.0 -> 3.0
    assert triangle_score(torch.tensor([0.2]), torch.tensor([0.3])).item() == pytest.approx(3.0)
    # b = 0.6, a = 0.45: first = 0.45 / 0.3 = 1.5, second = 0.4 / 0.05 = 8.0 -> 1.5
    assert triangle_score(torch.tensor([0.6]), torch.tensor([0.45])).item() == pytest.approx(1.5)
    # b = 0.95, a = 0.49: first = 0.49 / 0.475 = 1.0316, second = 0.05 / 0.01 = 5.0
    assert triangle_score(torch.tensor([0.95]), torch.tensor([0.49])).item() == pytest.approx(0.49 / 0.475)
    # b = 0.99, a = 0.45: first = 0.909, second = 0.01 / 0.05 = 0.2 -> the second term
    assert triangle_score(torch.tensor([0.99]), torch.tensor([0.45])).item() == pytest.approx(0.2, rel=1e-5)


def test_clamps_keep_the_score_finite():
    # b = 0 -> first term uses 1e-8: a / (0.5e-8); a >= alpha -> second term uses 1e-8
    b = torch.tensor([0.0, 0.5, 1.0])
    a = torch.tensor([0.3, 0.7, 0.0])
    score = triangle_score(b, a)
    assert torch.isfinite(score).all()
    assert score[0].item() == pytest.approx(min(0.3 / (0.5 * 1e-8), 1.0 / 0.2))  # = 5.0
    assert score[1].item() == pytest.approx(min(0.7 / 0.25, 0.5 / 1e-8))  # = 2.8
    assert score[2].item() == pytest.approx(0.0)  # backdoor corner: b = 1, a = 0


def test_alpha_changes_both_terms():
    b, a = torch.tensor([0.5]), torch.tensor([0.2])
    # alpha = 0.8: first = 0.2 / 0.4 = 0.5, second = 0.5 / 0.6 = 0.8333 -> 0.5
    assert triangle_score(b, a, alpha=0.8).item() == pytest.approx(0.5)
    # alpha = 0.25: first = 0.2 / 0.125 = 1.6, second = 0.5 / 0.05 = 10 -> 1.6
    assert triangle_score(b, a, alpha=0.25).item() == pytest.approx(1.6)


def test_guard_scores_uses_the_models_prediction():
    model = torch.log(torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]))
    expert = torch.log(torch.tensor([[0.05, 0.9, 0.05], [0.2, 0.2, 0.6]]))
    auxiliary = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1]]))
    out = guard_scores(model, expert, auxiliary)
    assert out.label.tolist() == [1, 0]
    assert out.confidence.tolist() == pytest.approx([0.7, 0.6], rel=1e-5)
    assert out.expert_agreement.tolist() == pytest.approx([0.9, 0.2], rel=1e-5)
    assert out.auxiliary_agreement.tolist() == pytest.approx([0.1, 0.7], rel=1e-5)
    expected = [min(0.1 / 0.45, 0.1 / 0.4), min(0.7 / 0.1, 0.8 / 1e-8)]
    assert out.score.tolist() == pytest.approx(expected, rel=1e-5)
    assert not math.isnan(out.score.sum().item())
