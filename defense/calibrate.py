"""Setting the rejection threshold from clean images: the calibration step of ``badexpert build``
and the ``badexpert calibrate`` command, which re-sets tau of an existing bundle from more clean
images (labels ignored) without retraining: scoring only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

import torch

from defense.errors import UserError
from defense.guard import Guard
from defense.score import GuardScores
from defense.threshold import Threshold, calibrate_threshold

# The calibration scores' summary kept in the manifest (covered by its digest). The levels from the
# median up are the reference of the server's clean-score drift statistic (service/drift.py).
QUANTILES = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.95)


def score_batches(guard: Guard, batches: Iterable[torch.Tensor], batch_size: int = 256) -> GuardScores:
    """The guard's scores of every image in an iterable of uint8 batches (N, 3, H, W)."""
    parts = [guard.score(batch, batch_size) for batch in batches if len(batch)]
    if not parts:
        raise UserError("no calibration images to score")
    return GuardScores.cat(parts)


def require_finite(scores: GuardScores, where: str) -> None:
    """Refuse to calibrate on non-finite outputs: such a bundle would fail on every input."""
    for name, tensor in (("model", scores.confidence), ("backdoor expert", scores.expert_agreement),
                         ("auxiliary model", scores.auxiliary_agreement), ("score", scores.score)):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise UserError(f"the {name} gives non-finite outputs on {bad} of {len(tensor)} of {where}; "
                            "refusing to write a bundle")


def image_record(paths: list[Path], source: str, labels: str) -> dict:
    """Which images a step used: their count, where they came from, and a digest of their names."""
    names = sorted(str(path) for path in paths)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return {"source": source, "n": len(paths), "labels": labels, "paths_sha256": digest}


def calibration_record(threshold: Threshold, scores: torch.Tensor, images: dict, n_finetune: int | None,
                       labels: bool) -> dict:
    quantiles = torch.quantile(scores.double(), torch.tensor(QUANTILES, dtype=torch.double))
    return {
        "n": threshold.n, "k": threshold.k, "realized_fpr": threshold.calibration_fpr,
        "expected_fpr": threshold.expected_fpr, "fpr_range": list(threshold.fpr_range),
        "n_finetune": n_finetune, "labels": labels, "images": images,
        "score_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)},
    }




def recalibrated_fields(manifest, threshold: Threshold, scores: torch.Tensor, images: dict) -> dict:
    """The manifest fields of a bundle recalibrated from ``manifest``: same models, new tau."""
    from defense.bundle import COMPUTED_FIELDS

    fields = {key: value for key, value in manifest.model_dump().items() if key not in COMPUTED_FIELDS}
    old = manifest.threshold
    stale = {old.get("warning"), *(old.get("advice") or [])}
    history = list(fields.get("calibration_history") or [])
    history.append({"bundle_id": manifest.bundle_id, "threshold": old, "calibration": manifest.calibration})
    n_finetune = (manifest.calibration or {}).get("n_finetune")
    fields.update(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        target_fpr=threshold.target_fpr,
        threshold=threshold.to_dict(),
        calibration=calibration_record(threshold, scores, images, n_finetune, labels=False),
        recalibrated_from=manifest.bundle_id,
        calibration_history=history,
        warnings=[w for w in manifest.warnings or [] if w not in stale]
        + ([threshold.warning] if threshold.warning else []) + threshold.advice,
    )
    fields["data"] = {**(fields.get("data") or {}), "calibration": images}
    return fields


def recalibrate(bundle_dir: Path, clean_dir: Path, out_dir: Path, fpr: float, rule: str, delta: float,
                device: str = "cpu", progress: bool = True, overwrite: bool = False, verify_key=None,
                sign_key=None, allowed_factory_modules=()):
    """Load and verify a bundle, score a folder of clean images with it, write a new bundle with
    the threshold they give (signed with ``sign_key`` when given). Returns (new manifest, threshold)."""
    from defense.bundle import load_bundle, save_bundle
    from defense.data import iter_image_batches, scan_flat_folder
    from defense.models.loading import ModelSpec

    if Path(out_dir).resolve() == Path(bundle_dir).resolve():
        raise UserError(f"--out {out_dir}: give a new folder; the bundle being recalibrated is left as it is")
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; choose another or pass --overwrite")
    guard, manifest = load_bundle(bundle_dir, device, verify_key=verify_key,
                                  allowed_factory_modules=allowed_factory_modules)
    paths = scan_flat_folder(clean_dir, option="--clean")
    batches = iter_image_batches(paths, guard.preprocessing, option="--clean", progress=progress,
                                 desc="scoring clean images")
    scores = score_batches(guard, batches)
    require_finite(scores, f"the clean images in {clean_dir}")
    threshold = calibrate_threshold(scores.score, fpr, rule, delta)
    guard.rejection_threshold = threshold.tau
    fields = recalibrated_fields(manifest, threshold, scores.score, image_record(paths, "--clean", "not used"))
    spec = ModelSpec.from_dict(manifest.architecture)
    new_manifest = save_bundle(out_dir, guard, spec, fields, overwrite=overwrite, sign_key=sign_key)
    return new_manifest, threshold
