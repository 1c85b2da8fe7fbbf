"""Argument types and option groups that several subcommands share, and the threshold summary."""

from __future__ import annotations

import argparse


def learning_rate(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def alpha(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_threshold_arguments(group, defaults=None) -> None:
    """--fpr, --threshold-rule, --threshold-delta; ``defaults`` None: they default to None, meaning the
    bundle's own (``badexpert calibrate``)."""
    shown = "the bundle's own" if defaults is None else "%(default)s"
    group.add_argument("--fpr", type=fraction, default=getattr(defaults, "fpr", None),
                       help=f"target false-positive rate: share of clean inputs rejected (default {shown})")
    group.add_argument("--threshold-rule", choices=["conformal", "ucb"], default=getattr(defaults, "threshold_rule", None),
                       help="conformal: expected FPR = target (at most); ucb: realized FPR above the target with "
                            "probability <= --threshold-delta, paid for by rejecting fewer clean AND triggered "
                            f"inputs when calibration images are few (default {shown})")
    group.add_argument("--threshold-delta", type=fraction, default=getattr(defaults, "threshold_delta", None),
                       help=f"--threshold-rule ucb: the allowed probability of exceeding the target (default {shown})")


def add_factory_modules_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-factory-modules", default="", metavar="MODULES",
                        help="comma-separated modules whose 'module:factory' architecture, named in the bundle, "
                             "may be imported and called")


def print_threshold(manifest) -> None:
    """The threshold, what to expect of the realized FPR, and every warning and piece of advice."""
    from defense.threshold import Threshold

    threshold = Threshold(**{**manifest.threshold, "fpr_range": tuple(manifest.threshold["fpr_range"])})
    print(f"  threshold {threshold.describe()}")
    for warning in getattr(manifest, "warnings", None) or []:
        print(f"  warning: {warning}")


def print_self_test(manifest) -> None:
    """The build's canary self-test, as the summary and ``evaluate`` print it (``self-test: off`` without one)."""
    from defense.self_test_report import self_test_lines

    for line in self_test_lines((manifest.model_extra or {}).get("self_test")):
        print(line)
