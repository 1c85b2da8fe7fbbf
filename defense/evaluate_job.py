"""Measuring a guard on clean and triggered images (:meth:`defense.Bundle.evaluate`, and through it
``badexpert evaluate``): the paper's metrics (:func:`defense.evaluation.detection_metrics`), their
bootstrap intervals (:mod:`defense.bootstrap`), and the report folder: ``report.json``,
``report.md`` (:mod:`defense.report`) and three plots (:mod:`defense.plots`).

The clean images need labels: a folder with one sub-folder per class, named as the bundle's classes,
or an ``(images, labels)`` pair. The triggered images: a folder by source class or flat, or an
``(images, source classes)`` pair (None: unknown sources, every image counted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from defense.bootstrap import BOOTSTRAP_SEED, CONFIDENCE, bootstrap_metrics, percentile_interval
from defense.data import ImageSet, load_image_folder
from defense.errors import UserError
from defense.evaluation import METRIC_LABELS, DetectionMetrics, detection_metrics, signal_breakdown
from defense.evaluation_inputs import check_clean_folder, resolve_target_class, triggered_sources
from defense.guard import Guard
from defense.image_inputs import labeled_image_set
from defense.report import json_number, write_report
from defense.self_test_report import self_test_summary
from defense.score import rejects


@dataclass
class Report:
    """An evaluation of a bundle: the metrics, their intervals and counts (``document``, the
    content of ``report.json``), the warnings, and the folder it was written to (None if not)."""

    metrics: DetectionMetrics
    document: dict
    report_dir: Path | None = None

    @property
    def warnings(self) -> list[str]:
        """What makes the figures less trustworthy (few successful triggered images, a weak attack, ...)."""
        return list(self.document["warnings"])


def check_evaluation_inputs(bootstrap: int, clean, triggered, report_dir: Path | None) -> None:
    """Refuse a negative --bootstrap, a missing folder and a --report that is a file, before any work."""
    if bootstrap < 0:
        raise UserError(f"--bootstrap {bootstrap}: must be 0 (no intervals) or a positive number of resamples")
    for option, folder in (("--clean", clean), ("--triggered", triggered)):
        if isinstance(folder, (str, Path)) and not Path(folder).is_dir():
            raise UserError(f"{option} {folder}: no such folder")
    if report_dir is not None and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise UserError(f"--report {report_dir}: exists and is not a folder")


def clean_test_images(clean, guard: Guard, class_names: list[str], progress: bool) -> ImageSet:
    """The clean test images with their labels, read with the bundle's preprocessing."""
    if isinstance(clean, tuple):
        return labeled_image_set(clean[0], clean[1], guard.preprocessing, class_names, option="--clean")
    check_clean_folder(Path(clean), class_names)
    return load_image_folder(Path(clean), guard.preprocessing, class_names, labeled=True, option="--clean",
                             progress=progress)


def triggered_test_images(triggered, guard: Guard, class_names: list[str],
                          progress: bool) -> tuple[ImageSet, torch.Tensor, str]:
    """The triggered images, the source class of each (-1: unknown) and the layout they came in."""
    if isinstance(triggered, tuple):
        images = labeled_image_set(triggered[0], triggered[1], guard.preprocessing, class_names, option="--triggered")
        layout = "flat" if triggered[1] is None else "by_source_class"
        return images, images.labels, layout
    images = load_image_folder(Path(triggered), guard.preprocessing, None, labeled=False, option="--triggered",
                               progress=progress)
    sources, layout = triggered_sources(Path(triggered), images.paths, class_names)
    return images, sources, layout


def evaluate_guard(guard: Guard, bundle: dict, clean, triggered, *, target_class: int | str | None = None,
                   bootstrap: int = 1000, report_dir: str | Path | None = None, progress: bool = True,
                   log: Callable[[str], None] = print) -> Report:
    """Measure ``guard`` (described by ``bundle``: path, bundle_id, architecture, target_fpr,
    threshold, class_names) on clean and triggered images; write the report to ``report_dir``."""
    from defense.plots import draw_report_plots

    started = time.monotonic()
    check_evaluation_inputs(bootstrap, clean, triggered, report_dir)
    class_names = list(bundle["class_names"])
    target = resolve_target_class(None if target_class is None else str(target_class), class_names)
    clean_set = clean_test_images(clean, guard, class_names, progress)
    triggered_set, sources, layout = triggered_test_images(triggered, guard, class_names, progress)

    clean_out = guard.score(clean_set.images)
    triggered_out = guard.score(triggered_set.images)
    warnings: list[str] = []
    if target is None:
        counts = torch.bincount(triggered_out.label, minlength=len(class_names))
        target = int(counts.argmax())
        share = float(counts[target]) / len(triggered_out.label)
        target_from = "inferred: M's most common prediction on the triggered images"
        log(f"target class inferred: {target} ({class_names[target]}), M's prediction for {share:.1%} of the "
            "triggered images; pass --target-class to set it")
    else:
        target_from = "given with --target-class"
    counted = sources != target
    if not counted.any():
        raise UserError(f"--triggered {_shown(triggered)}: every image is in the target class's folder "
                        f"({class_names[target]!r}); triggered images from other source classes are needed")

    tau = guard.rejection_threshold
    metrics = detection_metrics(tau, clean_out.score, clean_out.label, clean_set.labels,
                                triggered_out.score, triggered_out.label, sources, target)
    clean_correct = clean_out.label == clean_set.labels
    successful = counted & (triggered_out.label == target)
    if not successful.any():
        warnings.append("M sends none of the triggered images to the target class: AUROC and TPR are undefined "
                        "(is the target class right? does the trigger work on this model?)")
    elif int(successful.sum()) < 30:
        warnings.append(f"only {int(successful.sum())} triggered images reach the target: the intervals are wide")
    if metrics.asr_without_guard < 0.5 and successful.any():
        warnings.append(f"the attack succeeds on only {metrics.asr_without_guard:.1%} of the triggered images "
                        "without the guard")

    values = metrics.to_dict()
    distributions = (bootstrap_metrics(tau, clean_out.score, clean_correct, triggered_out.score, counted,
                                       successful, bootstrap) if bootstrap else {})
    metric_report = {}
    for name in METRIC_LABELS:
        low, high = percentile_interval(distributions[name]) if bootstrap else (None, None)
        metric_report[name] = {"value": json_number(float(values[name])), "ci_low": low, "ci_high": high}

    plots = {}
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        plots = draw_report_plots(report_dir, clean_out, triggered_out, clean_correct, successful, tau,
                                  bundle["target_fpr"], metrics.auroc, guard.alpha)
    auroc_clean = clean_out.score[clean_correct]
    auroc_triggered = triggered_out.score[successful]
    document = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(bundle["path"]), "bundle_id": bundle["bundle_id"],
                   "architecture": bundle["architecture"], "tau": tau, "alpha": guard.alpha,
                   "target_fpr": bundle["target_fpr"], "threshold": bundle["threshold"]},
        "data": {"clean": _shown(clean), "n_clean": len(clean_set), "triggered": _shown(triggered),
                 "n_triggered": len(triggered_set), "triggered_layout": layout, "target_class": target,
                 "target_class_name": class_names[target], "target_class_from": target_from,
                 "preprocessing": guard.preprocessing.to_dict()},
        "metrics": metric_report,
        "signals": {name: {key: json_number(value) for key, value in figures.items()}
                    for name, figures in signal_breakdown(tau, clean_out, triggered_out, clean_correct,
                                                          successful).items()},
        "counts": {"n_clean": metrics.n_clean, "n_clean_correct": metrics.n_clean_correct,
                   "n_clean_rejected": int(rejects(clean_out.score, tau).sum()),
                   "n_triggered": len(triggered_set), "n_triggered_counted": metrics.n_triggered,
                   "n_triggered_successful": metrics.n_triggered_successful,
                   "n_triggered_rejected": int(rejects(triggered_out.score[counted], tau).sum())},
        "bootstrap": {"resamples": bootstrap, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                      "method": "percentile; clean and triggered images resampled independently"},
        "score_quantiles": {
            population: {f"{q:g}": float(torch.quantile(scores.double(), q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)}
            for population, scores in (("clean_correct", auroc_clean), ("triggered_successful", auroc_triggered))
            if len(scores)
        },
        "self_test": self_test_summary(bundle.get("self_test")),
        "plots": plots,
        "warnings": warnings,
        "device": guard.device.type,
        "seconds": round(time.monotonic() - started, 2),
    }
    if report_dir is not None:
        write_report(report_dir, document)
    return Report(metrics, document, report_dir)


def _shown(images) -> str:
    """How the report names a set of images: the folder, or that they came from Python."""
    return str(images) if isinstance(images, (str, Path)) else "images given in Python"
