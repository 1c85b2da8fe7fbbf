import math

import pytest
import torch

from defense.score import guard_scores, rejected, rejects, triangle_score


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


# ---- exactness at the extremes: expert logit margins where a float32 softmax rounds b to 1 ----

def _margin_logits(margin: float, num_classes: int = 10, label: int = 3) -> torch.Tensor:
    logits = torch.zeros(1, num_classes)
    logits[0, label] = margin
    return logits


@pytest.mark.parametrize("margin", [0.0, 17.0, 20.0, 40.0, 100.0])
def test_score_is_exact_at_any_expert_margin(margin):
    """Expert logits: margin on M's label, 0 elsewhere (10 classes); auxiliary uniform (a = 0.1).
    By hand: b = e^m / (e^m + 9), 1 - b = 9 / (e^m + 9);
    first = a / (alpha b) = 0.2 (e^m + 9) / e^m, second = (1 - b) / (alpha - a) = 22.5 / (e^m + 9)."""
    out = guard_scores(_margin_logits(5.0), _margin_logits(margin), torch.zeros(1, 10), alpha=0.5)
    e = math.exp(margin)
    first, second = 0.2 * (e + 9) / e, 22.5 / (e + 9)
    assert out.score.dtype == torch.float64
    assert out.score.item() == pytest.approx(min(first, second), rel=1e-9)
    assert out.score.item() > 0  # never the 0 that float32 rounding gives from margin ~17 on
    assert out.auxiliary_agreement.item() == pytest.approx(0.1, rel=1e-12)


def test_hand_values_at_margins_17_20_40_100():
    # 22.5 / (e^m + 9), computed by hand: the second term wins from margin ~2 on
    expected = {17.0: 9.3149e-07, 20.0: 4.6376e-08, 40.0: 9.5588e-17, 100.0: 8.3702e-43}
    for margin, value in expected.items():
        score = guard_scores(_margin_logits(5.0), _margin_logits(margin), torch.zeros(1, 10)).score.item()
        assert score == pytest.approx(value, rel=1e-4)


def test_saturated_expert_still_orders_inputs_by_the_auxiliary():
    """At margin 20, float32 gives b == 1.0 and score 0 for every a: ties. Exact scores keep the order:
    the more the auxiliary agrees with M, the higher (cleaner) the score."""
    expert = _margin_logits(20.0).repeat(3, 1)
    auxiliary = torch.zeros(3, 10)
    auxiliary[:, 3] = torch.tensor([-3.0, 0.0, 1.0])  # a rises, still below alpha
    model = _margin_logits(5.0).repeat(3, 1)
    assert float(expert.float().softmax(1)[0, 3]) == 1.0  # the float32 rounding this guards against
    scores = guard_scores(model, expert, auxiliary).score
    assert (scores > 0).all() and scores[0] < scores[1] < scores[2]
    assert len(set(scores.tolist())) == 3


def test_non_finite_logits_give_a_nan_score_that_is_rejected():
    model = torch.tensor([[2.0, 0.0], [float("nan"), 0.0], [2.0, 0.0]])
    expert = torch.tensor([[0.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]])
    auxiliary = torch.zeros(3, 2)
    scores = guard_scores(model, expert, auxiliary).score
    assert math.isfinite(scores[0]) and math.isnan(scores[1]) and math.isnan(scores[2])
    assert rejects(scores, tau=0.0).tolist() == [False, True, True]


def test_rejects_is_strictly_below_tau_and_fails_closed_on_nan_and_inf():
    scores = torch.tensor([0.5, 0.49999, 0.50001, float("nan"), float("inf")], dtype=torch.float64)
    assert rejects(scores, 0.5).tolist() == [False, True, False, True, True]  # a score at tau is accepted


def test_the_list_form_of_the_rule_decides_as_the_tensor_form():
    tau = 0.1 + 0.2  # 0.30000000000000004: a tau that is not a short decimal
    values = [tau, math.nextafter(tau, 0.0), math.nextafter(tau, 1.0), -1e300, 2e8, 0.0, -0.0, float("nan"),
              float("inf"), float("-inf")]
    expected = [False, True, False, True, False, True, True, True, True, True]
    assert rejected(values, tau) == expected
    assert rejects(torch.tensor(values, dtype=torch.float64), tau).tolist() == expected
    assert rejected([], tau) == []


def test_guard_rejects_uses_its_threshold():
    from defense.guard import Guard
    from defense.preprocessing import Preprocessing

    layer = torch.nn.Flatten()
    guard = Guard(layer, layer, layer, Preprocessing.from_preset("cifar"), rejection_threshold=0.3)
    assert guard.rejects(torch.tensor([0.3, 0.2, float("nan")])).tolist() == [False, True, True]
