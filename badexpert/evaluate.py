"""``badexpert evaluate``: measure a bundle on the user's clean and triggered images.

    badexpert evaluate BUNDLE --clean DIR --triggered DIR [--target-class N|NAME] --report DIR

Images are read with the bundle's own preprocessing (the same as build and serve). Metrics are
the paper's (docs/method.md, section 6), computed by :func:`defense.evaluation.detection_metrics`:

- AUROC: clean inputs that M classifies correctly vs. triggered inputs from a non-target source
  class that M sends to the target (low score = backdoor);
- TPR at tau (share of those triggered inputs rejected) and the realized FPR (share of all clean
  inputs rejected);
- CA and ASR without and with the guard.

Confidence intervals: :mod:`defense.bootstrap`. The report folder gets ``report.json``,
``report.md`` (:mod:`defense.report`) and three plots (:mod:`defense.plots`): the ROC curve, the
score histograms with tau, and the (b, a) confidence plane with the decision boundary (the
paper's Fig. 6).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from badexpert.common import add_factory_modules_argument
from defense.device import resolve_device
from defense.errors import UserError


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="measure a bundle on clean and triggered images",
                                   description="AUROC, TPR/FPR at the bundle's threshold, clean accuracy and attack "
                                               "success rate with the guard, with a report and plots.")
    evaluate.add_argument("bundle", type=Path, metavar="BUNDLE")
    evaluate.add_argument("--verify-key", type=Path, metavar="PEM",
                          help="refuse the bundle unless it is signed with this Ed25519 public key's private key")
    add_factory_modules_argument(evaluate)
    evaluate.add_argument("--clean", type=Path, required=True, metavar="DIR", help="clean test images (ImageFolder)")
    evaluate.add_argument("--triggered", type=Path, required=True, metavar="DIR",
                          help="triggered images: ImageFolder by source class, or a flat folder")
    evaluate.add_argument("--target-class", help="the backdoor's target (index or name; default: M's most common "
                                                 "prediction on the triggered images)")
    evaluate.add_argument("--report", type=Path, required=True, metavar="DIR", help="folder for report.json, report.md, plots")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default %(default)s)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(handler=run_evaluate)


def check_arguments(args) -> None:
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: must be 0 (no intervals) or a positive number of resamples")
    for option, folder in (("--clean", args.clean), ("--triggered", args.triggered)):
        if not folder.is_dir():
            raise UserError(f"{option} {folder}: no such folder")
    if args.report.exists() and not args.report.is_dir():
        raise UserError(f"--report {args.report}: exists and is not a folder")


def run_evaluate(args) -> int:
    import torch

    from defense.bootstrap import BOOTSTRAP_SEED, CONFIDENCE, bootstrap_metrics, percentile_interval
    from defense.bundle import load_bundle
    from defense.data import load_image_folder
    from defense.evaluation import METRIC_LABELS, detection_metrics
    from defense.evaluation_inputs import check_clean_folder, resolve_target_class, triggered_sources
    from defense.plots import draw_report_plots
    from defense.report import json_number, metric_lines, write_report
    from defense.score import rejects

    started = time.monotonic()
    check_arguments(args)
    device = resolve_device(args.device)
    guard, manifest = load_bundle(args.bundle, device, verify_key=getattr(args, "verify_key", None),
                                  allowed_factory_modules=[name.strip() for name in
                                                           getattr(args, "allow_factory_modules", "").split(",")
                                                           if name.strip()])
    class_names = list(manifest.class_names)
    target = resolve_target_class(args.target_class, class_names)
    log = (lambda *a, **k: None) if args.quiet else print

    check_clean_folder(args.clean, class_names)
    clean = load_image_folder(args.clean, guard.preprocessing, class_names, labeled=True, option="--clean",
                              progress=not args.quiet)
    triggered = load_image_folder(args.triggered, guard.preprocessing, None, labeled=False, option="--triggered",
                                  progress=not args.quiet)
    sources, layout = triggered_sources(args.triggered, triggered.paths, class_names)

    clean_out = guard.score(clean.images)
    triggered_out = guard.score(triggered.images)
    warnings: list[str] = []
    if target is None:
        counts = torch.bincount(triggered_out.label, minlength=len(class_names))
        target = int(counts.argmax())
        share = float(counts[target]) / len(triggered_out.label)
        target_from = "inferred: M's most common prediction on the triggered images"
        print(f"target class inferred: {target} ({class_names[target]}), M's prediction for {share:.1%} of the "
              "triggered images; pass --target-class to set it")
    else:
        target_from = "given with --target-class"
    counted = sources != target
    if not counted.any():
        raise UserError(f"--triggered {args.triggered}: every image is in the target class's folder "
                        f"({class_names[target]!r}); triggered images from other source classes are needed")

    tau = guard.rejection_threshold
    metrics = detection_metrics(tau, clean_out.score, clean_out.label, clean.labels,
                                triggered_out.score, triggered_out.label, sources, target)
    clean_correct = clean_out.label == clean.labels
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
    resamples = int(args.bootstrap)
    distributions = (bootstrap_metrics(tau, clean_out.score, clean_correct, triggered_out.score, counted,
                                       successful, resamples) if resamples else {})
    metric_report = {}
    for name in METRIC_LABELS:
        low, high = percentile_interval(distributions[name]) if resamples else (None, None)
        metric_report[name] = {"value": json_number(float(values[name])), "ci_low": low, "ci_high": high}

    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    auroc_clean = clean_out.score[clean_correct]
    auroc_triggered = triggered_out.score[successful]
    plots = draw_report_plots(report_dir, clean_out, triggered_out, clean_correct, successful, tau,
                              manifest.target_fpr, metrics.auroc, guard.alpha)

    report = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "bundle": {"path": str(args.bundle), "bundle_id": manifest.bundle_id,
                   "architecture": manifest.architecture.get("name"), "tau": tau, "alpha": guard.alpha,
                   "target_fpr": manifest.target_fpr, "threshold": manifest.threshold},
        "data": {"clean": str(args.clean), "n_clean": len(clean), "triggered": str(args.triggered),
                 "n_triggered": len(triggered), "triggered_layout": layout, "target_class": target,
                 "target_class_name": class_names[target], "target_class_from": target_from,
                 "preprocessing": guard.preprocessing.to_dict()},
        "metrics": metric_report,
        "counts": {"n_clean": metrics.n_clean, "n_clean_correct": metrics.n_clean_correct,
                   "n_clean_rejected": int(rejects(clean_out.score, tau).sum()),
                   "n_triggered": len(triggered), "n_triggered_counted": metrics.n_triggered,
                   "n_triggered_successful": metrics.n_triggered_successful,
                   "n_triggered_rejected": int(rejects(triggered_out.score[counted], tau).sum())},
        "bootstrap": {"resamples": resamples, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                      "method": "percentile; clean and triggered images resampled independently"},
        "score_quantiles": {
            population: {f"{q:g}": float(torch.quantile(scores.double(), q)) for q in (0.01, 0.05, 0.5, 0.95, 0.99)}
            for population, scores in (("clean_correct", auroc_clean), ("triggered_successful", auroc_triggered))
            if len(scores)
        },
        "plots": plots,
        "warnings": warnings,
        "device": device,
        "seconds": round(time.monotonic() - started, 2),
    }
    write_report(report_dir, report)

    for warning in warnings:
        print(f"warning: {warning}")
    log(f"{len(clean)} clean and {len(triggered)} triggered images; target class {target} ({class_names[target]}); "
        f"tau {tau:.4g}")
    for line in metric_lines(metric_report):
        log(line)
    print(f"report written to {report_dir}/ (report.md, report.json, {', '.join(plots.values())})")
    return 0
