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
from defense.manifest import sha256_of
from defense.guard import Guard
from defense.score import GuardScores
from defense.threshold import DEFAULT_DELTA, DEFAULT_RULE, Threshold, calibrate_threshold

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


DIGEST_CHARS = 16  # hex digits kept of each image file's sha256 (64 bits: no accidental match)
MAX_DIGESTS = 100_000  # beyond it a step's record keeps no per-image digests (the manifest stays small)
BUILD_IMAGE_STEPS = ("finetuning", "rate_selection")  # images a calibration must not reuse


def file_digest(path: Path) -> str:
    return sha256_of(path)[:DIGEST_CHARS]


def content_digests(paths: list[Path]) -> list[str] | None:
    """The sorted content digests of image files, or None when they are not all files (images given in
    memory) or too many to record."""
    if len(paths) > MAX_DIGESTS or not all(path is not None and Path(path).is_file() for path in paths):
        return None
    return sorted(file_digest(path) for path in paths)


def image_record(paths: list[Path], source: str, labels: str, digests: bool = False) -> dict:
    """Which images a step used: their count, where they came from, and a digest of their names;
    ``digests``: also each file's content digest (what ``calibrate`` checks its images against)."""
    names = sorted(str(path) for path in paths)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    record = {"source": source, "n": len(paths), "labels": labels, "paths_sha256": digest}
    if digests:
        record["content_sha256_16"] = content_digests(paths)
    return record


def check_unseen(manifest, paths: list[Path], option: str) -> str | None:
    """Refuse calibration images whose content the build finetuned on or chose rates on (a copy in
    another folder included). Returns a warning when the bundle records no digests to check with."""
    data = getattr(manifest, "data", None) or {}
    known, unrecorded = set(), []
    for step in BUILD_IMAGE_STEPS:
        digests = (data.get(step) or {}).get("content_sha256_16")
        if digests is None:
            unrecorded.append(step)
        else:
            known.update(digests)
    shared = [path for path in paths if file_digest(path) in known] if known else []
    if shared:
        raise UserError(f"{option}: {len(shared)} of its images have the content of images the build finetuned "
                        f"on or chose learning rates on (e.g. {shared[0]}); calibrate on clean images the build "
                        "never saw")
    if unrecorded:
        return (f"the bundle records no content digests of its {' and '.join(unrecorded)} images (built by an "
                f"earlier release): {option} was not checked for images the build already used")
    return None


def calibration_record(threshold: Threshold, scores: torch.Tensor, images: dict, n_finetune: int | None,
                       labels: bool) -> dict:
    quantiles = torch.quantile(scores.double(), torch.tensor(QUANTILES, dtype=torch.double))
    return {
        "n": threshold.n, "k": threshold.k, "realized_fpr": threshold.calibration_fpr,
        "expected_fpr": threshold.expected_fpr, "fpr_range": list(threshold.fpr_range),
        "n_finetune": n_finetune, "labels": labels, "images": images,
        "score_quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)},
    }




def threshold_request(manifest, fpr: float | None, rule: str | None, delta: float | None) -> tuple[float, str, float]:
    """(target FPR, rule, delta) for recalibrating ``manifest``: each given one, else the bundle's own
    (its settings, then its threshold record), else calibrate_threshold's default."""
    settings, record = manifest.settings or {}, manifest.threshold or {}
    fpr = fpr if fpr is not None else manifest.target_fpr
    rule = rule or settings.get("threshold_rule") or record.get("rule") or DEFAULT_RULE
    if delta is None:
        delta = settings.get("threshold_delta") or record.get("delta") or DEFAULT_DELTA
    return fpr, rule, delta


def recalibrated_fields(manifest, threshold: Threshold, scores: torch.Tensor, images: dict,
                        asked: dict | None = None, warning: str | None = None) -> dict:
    """The manifest fields of a bundle recalibrated from ``manifest``: same models, new tau. Its
    settings take ``asked`` (fpr, threshold_rule, threshold_delta: the next calibrate's defaults)."""
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
        + ([threshold.warning] if threshold.warning else []) + threshold.advice + ([warning] if warning else []),
    )
    fields["settings"] = {**(fields.get("settings") or {}), **(asked or {})}
    fields["data"] = {**(fields.get("data") or {}), "calibration": images}
    return fields


def recalibrate(bundle_dir: Path, clean_dir: Path, out_dir: Path, fpr: float | None = None, rule: str | None = None,
                delta: float | None = None, device: str = "cpu", progress: bool = True, overwrite: bool = False,
                verify_key=None, sign_key=None, allowed_factory_modules=()):
    """Load and verify a bundle, score a folder of clean images with it, write a new bundle with
    the threshold they give (signed with ``sign_key`` when given). ``fpr``, ``rule``, ``delta``: None
    keeps the bundle's own. Images the build already used (by content) are refused. Returns (new
    manifest, threshold)."""
    from defense.bundle import load_bundle, save_bundle
    from defense.data import iter_image_batches, scan_flat_folder
    from defense.models.loading import ModelSpec

    if Path(out_dir).resolve() == Path(bundle_dir).resolve():
        raise UserError(f"--out {out_dir}: give a new folder; the bundle being recalibrated is left as it is")
    if Path(out_dir).exists() and any(Path(out_dir).iterdir()) and not overwrite:
        raise UserError(f"--out {out_dir}: the folder exists and is not empty; choose another or pass --overwrite")
    guard, manifest = load_bundle(bundle_dir, device, verify_key=verify_key,
                                  allowed_factory_modules=allowed_factory_modules)
    fpr, rule, delta = threshold_request(manifest, fpr, rule, delta)
    paths = scan_flat_folder(clean_dir, option="--clean")
    warning = check_unseen(manifest, paths, f"--clean {clean_dir}")
    batches = iter_image_batches(paths, guard.preprocessing, option="--clean", progress=progress,
                                 desc="scoring clean images")
    scores = score_batches(guard, batches)
    require_finite(scores, f"the clean images in {clean_dir}")
    threshold = calibrate_threshold(scores.score, fpr, rule, delta)
    guard.rejection_threshold = threshold.tau
    asked = {"fpr": fpr, "threshold_rule": rule, "threshold_delta": delta}
    fields = recalibrated_fields(manifest, threshold, scores.score, image_record(paths, "--clean", "not used"),
                                 asked, warning)
    spec = ModelSpec.from_dict(manifest.architecture)
    new_manifest = save_bundle(out_dir, guard, spec, fields, overwrite=overwrite, sign_key=sign_key)
    return new_manifest, threshold
