"""The evaluation report's text: ``report.json`` (the report dictionary), ``report.md`` (its
Markdown summary) and the console's metric lines, with the number formats they share."""

from __future__ import annotations

import json
import math
from pathlib import Path

from defense.bootstrap import CONFIDENCE
from defense.evaluation import METRIC_LABELS


def format_metric(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


def formatted_metrics(metric_report: dict):
    """(label, value, (low, high) or None) of each metric, as text: AUROC as a number, the rates in percent."""
    for name, label in METRIC_LABELS.items():
        entry = metric_report[name]
        percent = name != "auroc"
        bounds = (None if entry["ci_low"] is None else
                  (format_metric(entry["ci_low"], percent), format_metric(entry["ci_high"], percent)))
        yield label, format_metric(entry["value"], percent), bounds


def write_markdown(path: Path, report: dict) -> None:
    metrics, data, bundle = report["metrics"], report["data"], report["bundle"]
    lines = [
        "# BaDExpert evaluation report",
        "",
        f"Bundle `{bundle['path']}` (id {bundle['bundle_id']}, {bundle['architecture']}), threshold tau = "
        f"{bundle['tau']:.4g} (target FPR {bundle['target_fpr']:g}), alpha {bundle['alpha']:g}.",
        f"Clean images: {data['n_clean']} from `{data['clean']}`. Triggered images: {data['n_triggered']} from "
        f"`{data['triggered']}` ({data['triggered_layout'].replace('_', ' ')}).",
        f"Target class: {data['target_class']} ({data['target_class_name']}), {data['target_class_from']}.",
        "",
        f"| metric | value | {int(100 * CONFIDENCE)}% CI |",
        "|---|---|---|",
    ]
    for label, value, bounds in formatted_metrics(metrics):
        interval = "n/a" if bounds is None else f"[{bounds[0]}, {bounds[1]}]"
        lines.append(f"| {label} | {value} | {interval} |")
    counts = report["counts"]
    lines += [
        "",
        f"AUROC populations: {counts['n_clean_correct']} clean images that M classifies correctly vs. "
        f"{counts['n_triggered_successful']} triggered images from a non-target source that M sends to the target "
        f"(of {counts['n_triggered_counted']} from a non-target source).",
        f"Intervals: percentile bootstrap, {report['bootstrap']['resamples']} resamples (seed "
        f"{report['bootstrap']['seed']}), clean and triggered images resampled independently.",
    ]
    if len(report.get("signals", {})) > 1:
        lines += ["", "Each signal alone at the bundle's tau (the decision rejects what either rejects):", "",
                  "| signal | AUROC | clean rejected at tau | triggered rejected at tau |", "|---|---|---|---|"]
        lines += [f"| {name} | {_percent(f['auroc'], 2)} | {_percent(f['fpr_at_tau'], 2)}% | {_percent(f['tpr_at_tau'], 1)}% |"
                  for name, f in report["signals"].items()]
    if report.get("self_test"):
        lines += ["", f"Build self-test: {report['self_test']['summary']}. What it promises: "
                      f"{report['self_test']['promise']}."]
    for warning in report["warnings"]:
        lines.append(f"\n**Warning:** {warning}")
    lines += ["", "## Plots", ""]
    for title, name in report["plots"].items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def _percent(value, digits: int) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def signal_lines(signals: dict) -> list[str]:
    """Console lines: each signal's AUROC and what it alone rejects at tau (none without the feature signal)."""
    if len(signals) < 2:
        return []
    lines = ["  each signal alone at tau (AUROC; clean rejected; triggered rejected):"]
    for name, figures in signals.items():
        lines.append(f"    {name:9s} {_percent(figures['auroc'], 2):>6s}  {_percent(figures['fpr_at_tau'], 2):>6s}%  "
                     f"{_percent(figures['tpr_at_tau'], 1):>6s}%")
    return lines


def json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report_dir: Path, report: dict) -> None:
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report_dir / "report.md", report)


def metric_lines(metric_report: dict) -> list[str]:
    """One console line per metric: label, value and interval."""
    lines = []
    for label, value, bounds in formatted_metrics(metric_report):
        interval = "" if bounds is None else f"  [{bounds[0]}, {bounds[1]}]"
        lines.append(f"  {label:34s} {value:>8s}{interval}")
    return lines
