"""The BaDExpert score (paper Eq. 3, the "triangle" rule) and the rejection rule, as pure,
vectorized tensor functions.

For an input x with y_hat = argmax M(x):
    b = softmax(B(x))[y_hat]     the backdoor expert agrees with M   -> backdoor-like
    a = softmax(M'(x))[y_hat]    the auxiliary model agrees with M   -> clean-like
    score = min( a / (alpha * max(b, 1e-8)),  (1 - b) / max(alpha - a, 1e-8) )
Low score means backdoor: x is rejected unless score >= tau (a NaN score is rejected).

Exactness at the extremes: a float32 softmax rounds b to exactly 1.0 once the expert's logit
margin passes about 17, and then 1 - b = 0 and the score is 0 whatever a is, so clean and
backdoor inputs tie. Here both terms are computed from log-probabilities in float64, and
log(1 - b) is the log-sum-exp of the *other* classes' log-probabilities, which stays exact at any
margin (a margin of 100 gives 1 - b of about 1e-43, not 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_ALPHA = 0.5
EPSILON = 1e-8
_LOG_EPSILON = math.log(EPSILON)


def rejects(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """The guard's one decision rule: reject unless tau <= score < inf. A score exactly at tau is
    accepted (tau is itself a calibration score); a NaN or infinite score, which only broken
    model outputs give (the score is bounded by 2e8), is rejected: fail closed."""
    return ~(torch.isfinite(torch.as_tensor(scores)) & (scores >= tau))


def rejected(scores: list[float], tau: float) -> list[bool]:
    """:func:`rejects` for scores already in a list (a request's, on the server's event loop): the
    same rule on the same float64 values, without four tensor operations per request."""
    return [not (math.isfinite(score) and score >= tau) for score in scores]


def triangle_score(expert_agreement: torch.Tensor, auxiliary_agreement: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Score from b (the expert's probability of M's label) and a (the auxiliary's), in float64.

    For inputs given as probabilities (plots, tests). From logits, :func:`guard_scores` is exact
    where b is within float64 rounding of 1."""
    b, a = expert_agreement.double(), auxiliary_agreement.double()
    first = a / (alpha * b.clamp_min(EPSILON))
    second = (1.0 - b) / (alpha - a).clamp_min(EPSILON)
    return torch.minimum(first, second)


def agreement_logs(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) in float64, with p = softmax(logits)[label], for each row."""
    log_probs = logits.double().log_softmax(dim=1)
    index = label.unsqueeze(1)
    log_p = log_probs.gather(1, index).squeeze(1)
    others = log_probs.scatter(1, index, -math.inf)
    return log_p, others.logsumexp(dim=1)


def log_triangle_score(log_b: torch.Tensor, log_one_minus_b: torch.Tensor, log_a: torch.Tensor,
                       alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """log of :func:`triangle_score`, from log b, log(1 - b) and log a (float64)."""
    a = log_a.exp()
    log_first = log_a - math.log(alpha) - log_b.clamp_min(_LOG_EPSILON)
    log_second = log_one_minus_b - (alpha - a).clamp_min(EPSILON).log()
    return torch.minimum(log_first, log_second)


@dataclass
class GuardScores:
    """Per-input outputs of the guard, all tensors of shape (N,)."""

    label: torch.Tensor  # y_hat, M's prediction
    confidence: torch.Tensor  # softmax(M(x))[y_hat]
    expert_agreement: torch.Tensor  # b (float64)
    auxiliary_agreement: torch.Tensor  # a (float64)
    score: torch.Tensor  # float64: the decision score, compared with tau
    expert_score: torch.Tensor  # float64: the expert's score s (Eq. 3); equals score without the feature signal
    feature_score: torch.Tensor  # float64: the feature signal on s's scale (defense.feature_signal); NaN when off

    def cpu(self) -> "GuardScores":
        """The same scores, every tensor on the CPU."""
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
    log_b, log_one_minus_b = agreement_logs(expert_logits, label)
    log_a, _ = agreement_logs(auxiliary_logits, label)
    score = log_triangle_score(log_b, log_one_minus_b, log_a, alpha).exp()
    score = torch.where(torch.isfinite(confidence), score, math.nan)  # a broken M prediction is no pass
    return GuardScores(label, confidence, log_b.exp(), log_a.exp(), score, score, torch.full_like(score, math.nan))
