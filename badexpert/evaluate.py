"""``badexpert evaluate``: measure a bundle on the user's clean and triggered images.

    badexpert evaluate BUNDLE --clean DIR --triggered DIR [--target-class N|NAME] --report DIR

Argument parsing and printing: :meth:`defense.Bundle.evaluate` (:mod:`defense.evaluate_job`) measures.
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

from pathlib import Path

from badexpert.common import add_factory_modules_argument


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


def run_evaluate(args) -> int:
    from defense.evaluate_job import check_evaluation_inputs
    from defense.guard_bundle import Bundle
    from defense.report import metric_lines, signal_lines

    check_evaluation_inputs(args.bootstrap, args.clean, args.triggered, args.report)
    bundle = Bundle.load(args.bundle, verify_key=args.verify_key, device=args.device,
                         allowed_factory_modules=[name.strip() for name in args.allow_factory_modules.split(",")
                                                  if name.strip()])
    report = bundle.evaluate(args.clean, args.triggered, target_class=args.target_class, bootstrap=args.bootstrap,
                             report_dir=args.report, progress=not args.quiet, log=print)
    log = (lambda *a, **k: None) if args.quiet else print
    for warning in report.warnings:
        print(f"warning: {warning}")
    data = report.document["data"]
    log(f"{data['n_clean']} clean and {data['n_triggered']} triggered images; target class {data['target_class']} "
        f"({data['target_class_name']}); tau {report.document['bundle']['tau']:.4g}")
    for line in metric_lines(report.document["metrics"]):
        log(line)
    for line in signal_lines(report.document["signals"]):
        log(line)
    if report.document.get("self_test"):
        log(f"  the build's self-test: {report.document['self_test']['summary']}")
        log(f"    ({report.document['self_test']['promise']})")
    print(f"report written to {args.report}/ (report.md, report.json, {', '.join(report.document['plots'].values())})")
    return 0
