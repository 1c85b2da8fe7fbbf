"""Detection metrics as the paper defines them (docs/method.md, section 6), from guard scores.

- AUROC: clean inputs that M classifies correctly vs. triggered inputs (source != target) that M
  sends to the target; low score means backdoor.
- CA: fraction of clean inputs accepted *and* correctly classified.
- ASR: fraction of triggered inputs (source != target) accepted and classified as the target.
- FPR: fraction of clean inputs rejected; TPR: fraction of counted triggered inputs rejected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from sklearn.metrics import roc_auc_score

from defense.score import rejects

METRIC_LABELS = {  # every metric of DetectionMetrics that the report shows, with its label
    "auroc": "AUROC",
    "tpr": "TPR at tau (triggered rejected)",
    "fpr": "FPR at tau (clean rejected)",
    "clean_accuracy_without_guard": "CA without guard",
    "clean_accuracy_with_guard": "CA with guard",
    "asr_without_guard": "ASR without guard",
    "asr_with_guard": "ASR with guard",
}


@dataclass
class DetectionMetrics:
    auroc: float
    tpr: float
    fpr: float
    clean_accuracy_without_guard: float
    clean_accuracy_with_guard: float
    asr_without_guard: float
    asr_with_guard: float
    n_clean: int
    n_triggered: int
    n_clean_correct: int
    n_triggered_successful: int

    def to_dict(self) -> dict:
        return asdict(self)


def backdoor_likeness(scores: torch.Tensor) -> torch.Tensor:
    """-score in float64, a NaN score (rejected) ranked as the most backdoor-like: what ROC curves rank."""
    return (-scores.double()).nan_to_num(nan=torch.finfo(torch.float64).max)  # finite: sklearn refuses inf


def auroc(clean_scores: torch.Tensor, triggered_scores: torch.Tensor) -> float:
    """Area under the ROC for telling triggered (positive) from clean inputs by a low score."""
    if len(clean_scores) == 0 or len(triggered_scores) == 0:
        return float("nan")
    truth = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(triggered_scores))])
    return float(roc_auc_score(truth.numpy(), backdoor_likeness(torch.cat([clean_scores, triggered_scores])).numpy()))


def detection_metrics(
    tau: float,
    clean_scores: torch.Tensor, clean_predictions: torch.Tensor, clean_labels: torch.Tensor,
    triggered_scores: torch.Tensor, triggered_predictions: torch.Tensor, triggered_sources: torch.Tensor,
    target_class: int | torch.Tensor,
    counted: torch.Tensor | None = None,
) -> DetectionMetrics:
    """``target_class``: the attack's target, or one target per triggered input (all-to-all).
    ``counted``: which triggered inputs count for ASR and AUROC; by default those whose source
    class is not the target (the paper's rule; a source-specific attack passes its source classes)."""
    clean_correct = clean_predictions == clean_labels
    if counted is None:
        counted = triggered_sources != target_class  # source class == target does not count (paper)
    successful = counted & (triggered_predictions == target_class)
    clean_rejected = rejects(clean_scores, tau)
    triggered_rejected = rejects(triggered_scores, tau)
    n_counted = int(counted.sum())
    return DetectionMetrics(
        auroc=auroc(clean_scores[clean_correct], triggered_scores[successful]),
        tpr=float(triggered_rejected[successful].float().mean()) if successful.any() else float("nan"),
        fpr=float(clean_rejected.float().mean()),
        clean_accuracy_without_guard=float(clean_correct.float().mean()),
        clean_accuracy_with_guard=float((clean_correct & ~clean_rejected).float().mean()),
        asr_without_guard=float(successful.sum()) / max(n_counted, 1),
        asr_with_guard=float((successful & ~triggered_rejected).sum()) / max(n_counted, 1),
        n_clean=len(clean_scores), n_triggered=n_counted,
        n_clean_correct=int(clean_correct.sum()), n_triggered_successful=int(successful.sum()),
    )


SIGNAL_COLUMNS = {"expert": "expert_score", "features": "feature_score", "fused": "score"}


def signal_breakdown(tau: float, clean_out, triggered_out, clean_correct: torch.Tensor,
                     successful: torch.Tensor) -> dict[str, dict]:
    """Each signal alone and the decision, on the AUROC's populations: AUROC, and the share of clean
    (all) and of successful triggered inputs it would reject at the bundle's tau (the signals share
    the expert score's scale, and the decision rejects what either rejects). Only ``expert`` for a
    bundle without the feature signal."""
    signals = SIGNAL_COLUMNS if torch.isfinite(clean_out.feature_score).any() else {"expert": "expert_score"}
    breakdown = {}
    for name, column in signals.items():
        clean, triggered = getattr(clean_out, column), getattr(triggered_out, column)
        breakdown[name] = {
            "auroc": auroc(clean[clean_correct], triggered[successful]),
            "fpr_at_tau": float(rejects(clean, tau).float().mean()) if len(clean) else float("nan"),
            "tpr_at_tau": float(rejects(triggered[successful], tau).float().mean()) if successful.any() else float("nan"),
        }
    return breakdown
