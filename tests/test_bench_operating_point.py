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
