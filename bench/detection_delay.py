"""Detection delay of the guard's alerts: how many images until an alert's condition holds.

    python -m bench.detection_delay                 # Markdown table (BENCHMARKS.md, issue 29)
    python -m bench.detection_delay --json out.json

Simulated streams (CPU, seconds; no model): a bundle calibrated for a 1% FPR on 5,000 images
(realized-FPR range 0.74-1.29%, defense.threshold.realized_fpr_range) serves 10 equally frequent
classes at a steady rate. Its windows are those of docker/prometheus/rules/badexpert.yml (the FPR
band over 1 hour, concentration over 15 minutes), evaluated every 15 s; the conditions are
service/live_checks.py's, which the rules carry. Before the change the windows are full of clean
traffic at 1%; then either

- FPR drift: the clean rejection rate goes from 1% to 3% (the clean traffic drifted), or
- a burst: a share of the traffic (1%, 5%, 20%) carries a trigger; the model sends every triggered
  input to the target class and the guard flags ``--detect`` of them (0.9: an ASR of 10% with the
  guard), clean rejections spread over the classes like accepted traffic.

Delay = images after the change until the condition first holds (the `for:` of each alert, 5 or 2
minutes, comes on top of it, in time). Also counted: runs where a condition held on clean traffic
just before the change (false alarms), and the concentration condition under FPR drift (it should
not hold: drift spreads rejections over the classes).

The clean-score drift statistic (service/drift.py, the server's own DriftWindow) on scores drawn
from a continuous distribution (the test on quantile bins does not depend on which): the share of
windows of exchangeable clean traffic above 1 (with the two-sample correction for calibration
quantiles estimated from 5,000 images, and without it), the same with 5% triggered inputs (scores
below the calibration median), and the images until it passes 1 when the clean scores shift by a
fraction of their spread (log-scores moved by 0.1, 0.25, 0.5 standard deviations).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from defense.threshold import conformal_rank, realized_fpr_range
from defense.calibrate import QUANTILES
from service.drift import DriftWindow, UpperTail
from service.live_checks import above_band, concentrated

EVALUATION_S = 15
BAND_WINDOW_S, CONCENTRATION_WINDOW_S = 3600, 900


def scenario_probabilities(classes: int, clean_fpr: float, burst: float, detect: float, target: int = 0):
    """Per-image probabilities of (rejected, class) and (accepted, class): 2 x classes categories."""
    rejected = np.full(classes, (1 - burst) * clean_fpr / classes)
    accepted = np.full(classes, (1 - burst) * (1 - clean_fpr) / classes)
    rejected[target] += burst * detect
    accepted[target] += burst * (1 - detect)
    return np.concatenate([rejected, accepted])


def delays(rng, rate: float, before, after, band: tuple[float, float], classes: int, runs: int,
           horizon: int) -> dict:
    """Images after the change until each condition holds, per run (None: not within ``horizon``)."""
    step = max(1, round(rate * EVALUATION_S))
    band_steps, concentration_steps = round(BAND_WINDOW_S / EVALUATION_S), round(CONCENTRATION_WINDOW_S / EVALUATION_S)
    history = band_steps
    found = {"above_band": [], "concentration": []}
    false_alarms = {"above_band": 0, "concentration": 0}
    for _ in range(runs):
        counts = np.concatenate([rng.multinomial(step, before, size=history),
                                 rng.multinomial(step, after, size=horizon // step + 1)])
        cumulative = np.concatenate([np.zeros((1, 2 * classes), dtype=np.int64), counts.cumsum(axis=0)])
        first = {name: None for name in found}
        for index in range(history - 1, len(counts)):
            band_window = cumulative[index + 1] - cumulative[max(0, index + 1 - band_steps)]
            recent = cumulative[index + 1] - cumulative[max(0, index + 1 - concentration_steps)]
            rejected_by_class, accepted_by_class = recent[:classes], recent[classes:]
            flagged = rejected_by_class.sum()
            held = {
                "above_band": above_band(band_window[:classes].sum(), band_window.sum(), band[1]),
                "concentration": any(concentrated(rejected_by_class[c], flagged,
                                                  accepted_by_class[c] / max(1, accepted_by_class.sum()))
                                     for c in range(classes)),
            }
            for name, holds in held.items():
                if index == history - 1:
                    false_alarms[name] += holds
                elif holds and first[name] is None:
                    first[name] = (index - history + 1) * step
            if all(value is not None for value in first.values()):
                break
        for name in found:
            found[name].append(first[name])
    return {name: summary(values, runs) | {"false_alarms": int(false_alarms[name])} for name, values in found.items()}


def summary(values: list, runs: int) -> dict:
    detected = sorted(v for v in values if v is not None)
    if not detected:
        return {"detected": 0, "runs": runs}
    return {"detected": len(detected), "runs": runs, "median": int(np.median(detected)),
            "p90": int(np.percentile(detected, 90)) if len(detected) == runs else None}


def run(args) -> list[dict]:
    k = conformal_rank(args.calibration_images, args.fpr)
    band = realized_fpr_range(args.calibration_images, k)
    rng = np.random.default_rng(args.seed)
    clean = scenario_probabilities(args.classes, args.fpr, 0.0, args.detect)
    scenarios = [("FPR drift 1% -> 3%", scenario_probabilities(args.classes, args.drifted_fpr, 0.0, args.detect))]
    scenarios += [(f"burst {share:.0%} triggered", scenario_probabilities(args.classes, args.fpr, share, args.detect))
                  for share in args.bursts]
    rows = []
    for rate in args.rates:
        for name, after in scenarios:
            result = delays(rng, rate, clean, after, band, args.classes, args.runs, args.horizon)
            rows.append({"scenario": name, "images_per_s": rate, "band": band, **result})
    return rows


def cell(result: dict) -> str:
    if not result["detected"]:
        return f"not within the horizon (0/{result['runs']})"
    text = f"{result['median']:,}"
    if result["p90"] is not None:
        text += f" (p90 {result['p90']:,})"
    if result["detected"] < result["runs"]:
        text += f", {result['detected']}/{result['runs']} runs"
    return text


def table(rows: list[dict]) -> str:
    lines = ["| traffic | change | FPR above band: images (median, p90) | concentration: images (median, p90) | "
             "false alarms before the change (band / concentration) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['images_per_s']:g} images/s | {row['scenario']} | {cell(row['above_band'])} | "
                     f"{cell(row['concentration'])} | {row['above_band']['false_alarms']} / "
                     f"{row['concentration']['false_alarms']} of {row['above_band']['runs']} |")
    return "\n".join(lines)


def clean_scores(rng, n: int, shift: float = 0.0, triggered: float = 0.0) -> np.ndarray:
    """Log-normal clean scores (log-score moved by ``shift`` standard deviations); a ``triggered``
    share scores far below the median (the guard's triggered inputs)."""
    scores = np.exp(rng.standard_normal(n) + shift)
    hit = rng.random(n) < triggered
    scores[hit] = np.exp(rng.standard_normal(hit.sum()) - 4.0)
    return scores


def drift_rows(rng, calibration_images: int, window: int, blocks: int, runs: int, windows_per_run: int = 10,
               shifts=(0.1, 0.25, 0.5)) -> list[dict]:
    rows = []
    block = window // blocks
    for name, correct, shift, triggered in [("clean, two-sample (the server)", True, 0.0, 0.0),
                                            ("clean, one-sample (no correction)", False, 0.0, 0.0),
                                            ("clean + 5% triggered", True, 0.0, 0.05)]:
        above = total = 0
        for _ in range(runs):
            tail = calibrated_tail(rng, calibration_images, correct)
            drift = DriftWindow(tail, window, blocks)
            drift.add(clean_scores(rng, window - block, shift, triggered).tolist())
            for _ in range(windows_per_run * blocks):
                drift.add(clean_scores(rng, block, shift, triggered).tolist())
                above += drift.statistic() > 1
                total += 1
        rows.append({"stream": name, "windows_above_1": above / total, "windows": total})
    for shift in shifts:
        found = []
        for _ in range(runs):
            tail = calibrated_tail(rng, calibration_images, True)
            drift = DriftWindow(tail, window, blocks)
            drift.add(clean_scores(rng, window).tolist())
            first = None
            for index in range(1, 20 * blocks + 1):
                drift.add(clean_scores(rng, block, shift).tolist())
                if drift.statistic() > 1:
                    first = index * block
                    break
            found.append(first)
        rows.append({"stream": f"clean scores shifted by {shift:g} sd", **summary(found, runs)})
    return rows


def calibrated_tail(rng, calibration_images: int, correct: bool) -> UpperTail:
    scores = clean_scores(rng, calibration_images)
    quantiles = {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(scores, QUANTILES))}
    return UpperTail.from_quantiles(quantiles, calibration_images if correct else None)


def drift_table(rows: list[dict], window: int) -> str:
    lines = [f"| stream (windows of {window:,} images) | windows above 1 | images after the change until above 1 "
             "(median, p90) |", "|---|---|---|"]
    for row in rows:
        if "windows_above_1" in row:
            lines.append(f"| {row['stream']} | {row['windows_above_1']:.2%} of {row['windows']:,} | |")
        else:
            lines.append(f"| {row['stream']} | | {cell(row)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 10.0], help="images per second")
    parser.add_argument("--bursts", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--detect", type=float, default=0.9, help="share of triggered inputs the guard flags")
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--drifted-fpr", type=float, default=0.03)
    parser.add_argument("--calibration-images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--horizon", type=int, default=100_000, help="most images followed after the change")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drift-window", type=int, default=2000, help="BADEXPERT_DRIFT_WINDOW")
    parser.add_argument("--drift-blocks", type=int, default=10, help="BADEXPERT_DRIFT_BLOCKS")
    parser.add_argument("--drift-runs", type=int, default=50)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run(args)
    print(table(rows))
    drift = drift_rows(np.random.default_rng(args.seed), args.calibration_images, args.drift_window,
                       args.drift_blocks, args.drift_runs)
    print()
    print(drift_table(drift, args.drift_window))
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"alerts": rows, "drift": drift}, stream, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
