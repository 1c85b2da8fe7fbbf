"""The BaDExpert score (paper Eq. 3, the "triangle" rule) as pure, vectorized tensor functions.

For an input x with y_hat = argmax M(x):
    b = softmax(B(x))[y_hat]     the backdoor expert agrees with M   -> backdoor-like
    a = softmax(M'(x))[y_hat]    the auxiliary model agrees with M   -> clean-like
    score = min( a / (alpha * max(b, 1e-8)),  (1 - b) / max(alpha - a, 1e-8) )
Low score means backdoor: reject x when score < tau.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_ALPHA = 0.5
EPSILON = 1e-8


def triangle_score(expert_agreement: torch.Tensor, auxiliary_agreement: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Score from b (the expert's probability of M's label) and a (the auxiliary's)."""
    b, a = expert_agreement, auxiliary_agreement
    first = a / (alpha * b.clamp_min(EPSILON))
    second = (1.0 - b) / (alpha - a).clamp_min(EPSILON)
    return torch.minimum(first, second)


@dataclass
class GuardScores:
    """Per-input outputs of the guard, all tensors of shape (N,)."""

    label: torch.Tensor  # y_hat, M's prediction
    confidence: torch.Tensor  # softmax(M(x))[y_hat]
    expert_agreement: torch.Tensor  # b
    auxiliary_agreement: torch.Tensor  # a
    score: torch.Tensor

    def cpu(self) -> "GuardScores":
        return GuardScores(*(tensor.cpu() for tensor in vars(self).values()))

    @staticmethod
    def cat(parts: list["GuardScores"]) -> "GuardScores":
        """The scores of consecutive batches, as one."""
        return GuardScores(*(torch.cat(column) for column in zip(*(vars(p).values() for p in parts))))


def guard_scores(
    model_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    auxiliary_logits: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
) -> GuardScores:
    """All of the guard's per-input numbers from the three models' logits (N, C)."""
    model_probs = model_logits.float().softmax(dim=1)
    confidence, label = model_probs.max(dim=1)
    index = label.unsqueeze(1)
    b = expert_logits.float().softmax(dim=1).gather(1, index).squeeze(1)
    a = auxiliary_logits.float().softmax(dim=1).gather(1, index).squeeze(1)
    return GuardScores(label, confidence, b, a, triangle_score(b, a, alpha))
