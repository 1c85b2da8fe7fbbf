"""``badexpert evaluate``: measure a bundle on the user's clean and triggered images.

    badexpert evaluate BUNDLE --clean DIR --triggered DIR [--target-class N|NAME] --report DIR

Images are read with the bundle's own preprocessing (the same as build and serve). Metrics are
the paper's (docs/method.md, section 6), computed by :func:`defense.evaluation.detection_metrics`:

- AUROC: clean inputs that M classifies correctly vs. triggered inputs from a non-target source
  class that M sends to the target (low score = backdoor);
- TPR at tau (share of those triggered inputs rejected) and the realized FPR (share of all clean
  inputs rejected);
- CA and ASR without and with the guard.

Confidence intervals: percentile bootstrap, clean and triggered images resampled independently,
seeded, all resamples computed at once. The report folder gets ``report.json``, ``report.md`` and
three plots: the ROC curve, the score histograms with tau, and the (b, a) confidence plane with
the decision boundary (the paper's Fig. 6).
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from defense.errors import UserError
from defense.evaluation import backdoor_likeness
from defense.score import rejects

BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
SCORE_FLOOR = 1e-6  # scores are shown on a log axis; smaller ones are drawn at this value
METRIC_LABELS = {
    "auroc": "AUROC",
    "tpr": "TPR at tau (triggered rejected)",
    "fpr": "FPR at tau (clean rejected)",
    "clean_accuracy_without_guard": "CA without guard",
    "clean_accuracy_with_guard": "CA with guard",
    "asr_without_guard": "ASR without guard",
    "asr_with_guard": "ASR with guard",
}


# ----------------------------------------------------------------------------------------------
# reading the inputs


def resolve_target_class(text: str | None, class_names: list[str]) -> int | None:
    """--target-class as an index or a class name; None when not given."""
    if text is None:
        return None
    if text in class_names:
        return class_names.index(text)
    try:
        index = int(text)
    except ValueError:
        raise UserError(f"--target-class {text}: not a class of this bundle ({_shown(class_names)}) nor an index")
    if not 0 <= index < len(class_names):
        raise UserError(f"--target-class {text}: out of range; the bundle's model has {len(class_names)} classes "
                        f"(0 to {len(class_names) - 1})")
    return index


def _shown(class_names: list[str]) -> str:
    return ", ".join(class_names[:12]) + (", ..." if len(class_names) > 12 else "")


def check_clean_folder(root: Path, class_names: list[str]) -> None:
    """The clean images need labels: one sub-folder per class, named as the bundle's classes."""
    from defense.data import IMAGE_SUFFIXES

    def has_images(folder: Path) -> bool:
        return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())

    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and has_images(p))
    unknown = [name for name in folders if name not in class_names]
    if unknown:
        raise UserError(f"--clean {root}: folder {unknown[0]!r} is not a class of the bundle ({_shown(class_names)}); "
                        "put the clean images in one folder per class, named as the bundle's classes")
    if not folders:
        raise UserError(f"--clean {root}: no class sub-folders with images; the clean images need labels: one folder "
                        f"per class, named as the bundle's classes ({_shown(class_names)})")


def triggered_sources(root: Path, paths: list[Path], class_names: list[str]) -> tuple[torch.Tensor, str]:
    """Source class of each triggered image from its first-level folder, or -1 (flat folder).

    Layout ``by_source_class``: every image sits in a folder named after a class of the bundle.
    Layout ``flat``: no image does; all count as inputs from a non-target source.
    """
    folders = [path.relative_to(root).parts[0] if len(path.relative_to(root).parts) > 1 else None for path in paths]
    known = [name in class_names for name in folders]
    if not any(known):
        return torch.full((len(paths),), -1, dtype=torch.long), "flat"
    for path, folder, is_class in zip(paths, folders, known):
        if not is_class:
            where = f"folder {folder!r}" if folder is not None else f"loose image {path.name!r}"
            raise UserError(f"--triggered {root}: {where} is not a class of the bundle; use one folder per source "
                            "class (named as in the bundle's class names) or a flat folder of images")
    return torch.tensor([class_names.index(folder) for folder in folders], dtype=torch.long), "by_source_class"


# ----------------------------------------------------------------------------------------------
# bootstrap


def resample_counts(n: int, resamples: int, generator: torch.Generator) -> torch.Tensor:
    """(resamples, n) multiplicities of a bootstrap resample of n items (float)."""
    index = torch.randint(0, n, (resamples, n), generator=generator)
    counts = torch.zeros(resamples, n)
    counts.scatter_add_(1, index, torch.ones(resamples, n))
    return counts


def weighted_auroc(clean_scores: torch.Tensor, triggered_scores: torch.Tensor,
                   clean_weights: torch.Tensor, triggered_weights: torch.Tensor) -> torch.Tensor:
    """AUROC (triggered = positive, detected by a low score) for each row of weights, ties counted half.

    Weights (B, n) are bootstrap multiplicities (zero for items outside the AUROC's populations).
    For every clean score, the weighted number of triggered scores below it comes from one sort
    and a cumulative sum, so all B resamples cost O(B (n_c + n_t)) after O(n log n) sorting.
    """
    # A NaN score is rejected: rank it as the lowest (most backdoor-like) score.
    clean_scores, triggered_scores = (s.double().nan_to_num(nan=-math.inf) for s in (clean_scores, triggered_scores))
    order = triggered_scores.argsort()
    sorted_scores = triggered_scores[order].double()
    cumulative = torch.nn.functional.pad(triggered_weights[:, order].double().cumsum(1), (1, 0))
    queries = clean_scores.double()
    below = torch.searchsorted(sorted_scores, queries, right=False)
    at_or_below = torch.searchsorted(sorted_scores, queries, right=True)
    less = cumulative[:, below]
    ties = cumulative[:, at_or_below] - less
    wins = (clean_weights.double() * (less + 0.5 * ties)).sum(1)
    total = clean_weights.double().sum(1) * triggered_weights.double().sum(1)
    return torch.where(total > 0, wins / total.clamp_min(1e-300), torch.full_like(total, float("nan")))


def bootstrap_metrics(tau: float, clean_scores, clean_correct, triggered_scores, triggered_counted,
                      triggered_successful, resamples: int, seed: int = BOOTSTRAP_SEED,
                      chunk: int = 100) -> dict[str, torch.Tensor]:
    """Each metric on ``resamples`` bootstrap resamples: {name: (resamples,) tensor}."""
    generator = torch.Generator().manual_seed(seed)
    clean_rejected = rejects(clean_scores, tau).double()
    triggered_rejected = rejects(triggered_scores, tau).double()
    correct = clean_correct.double()
    counted = triggered_counted.double()
    successful = triggered_successful.double()
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in METRIC_LABELS}
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        wc = resample_counts(len(clean_scores), size, generator).double()
        wt = resample_counts(len(triggered_scores), size, generator).double()
        n_clean = wc.sum(1)
        n_counted = wt @ counted
        n_successful = wt @ successful
        nan = torch.full((size,), float("nan"), dtype=torch.double)
        columns["auroc"].append(weighted_auroc(clean_scores, triggered_scores, wc * correct, wt * successful))
        columns["tpr"].append(torch.where(n_successful > 0, (wt @ (successful * triggered_rejected)) / n_successful.clamp_min(1), nan))
        columns["fpr"].append((wc @ clean_rejected) / n_clean)
        columns["clean_accuracy_without_guard"].append((wc @ correct) / n_clean)
        columns["clean_accuracy_with_guard"].append((wc @ (correct * (1 - clean_rejected))) / n_clean)
        columns["asr_without_guard"].append(torch.where(n_counted > 0, (wt @ successful) / n_counted.clamp_min(1), nan))
        columns["asr_with_guard"].append(torch.where(n_counted > 0, (wt @ (successful * (1 - triggered_rejected)))
                                                     / n_counted.clamp_min(1), nan))
    return {name: torch.cat(parts) for name, parts in columns.items()}


def percentile_interval(values: torch.Tensor, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    finite = values[torch.isfinite(values)]
    if len(finite) == 0:
        return None, None
    tail = (1 - confidence) / 2
    low, high = torch.quantile(finite.double(), torch.tensor([tail, 1 - tail], dtype=torch.double))
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CLEAN_COLOUR, TRIGGERED_COLOUR, REJECTED_COLOUR = "#1f77b4", "#d62728", "#dcdcdc"


def roc_points(clean_scores: torch.Tensor, triggered_scores: torch.Tensor):
    from sklearn.metrics import roc_curve

    truth = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(triggered_scores))]).numpy()
    fpr, tpr, _ = roc_curve(truth, backdoor_likeness(torch.cat([clean_scores, triggered_scores])).numpy())
    return fpr, tpr


def plot_roc(path: Path, clean_scores, triggered_scores, tau: float, target_fpr: float, auroc: float) -> None:
    plt = _pyplot()
    fpr, tpr = roc_points(clean_scores, triggered_scores)
    point_fpr = float(rejects(clean_scores, tau).float().mean())
    point_tpr = float(rejects(triggered_scores, tau).float().mean())
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    floor = 0.5 / max(len(clean_scores), 1)
    for ax, log in zip(axes, (False, True)):
        ax.plot(fpr if not log else [max(f, floor) for f in fpr], tpr, color="black", lw=1.8,
                label=f"BaDExpert (AUROC {auroc:.4f})")
        ax.plot([max(point_fpr, floor) if log else point_fpr], [point_tpr], "o", color=TRIGGERED_COLOUR, ms=8,
                label=f"at tau: FPR {point_fpr:.2%}, TPR {point_tpr:.2%}")
        ax.axvline(target_fpr, color="grey", ls=":", lw=1.2, label=f"target FPR {target_fpr:g}")
        ax.set_ylim(-0.01, 1.01)
        ax.set_ylabel("true-positive rate (triggered rejected)")
        ax.grid(alpha=0.3)
        if log:
            ax.set_xscale("log")
            ax.set_xlim(floor * 0.8, 1.0)
            ax.set_xlabel("false-positive rate (clean rejected), log scale")
            ax.set_title("ROC, low-FPR region")
        else:
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set_xlim(-0.01, 1.01)
            ax.set_xlabel("false-positive rate (clean rejected)")
            ax.set_title("ROC curve")
        ax.legend(loc="lower right", fontsize=8.5)
    figure.suptitle(f"{len(clean_scores)} correctly classified clean vs. {len(triggered_scores)} successful triggered inputs",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_histograms(path: Path, clean_scores, triggered_scores, tau: float) -> None:
    import numpy as np

    plt = _pyplot()
    clean = clean_scores.double().clamp_min(SCORE_FLOOR).numpy()
    triggered = triggered_scores.double().clamp_min(SCORE_FLOOR).numpy()
    both = np.concatenate([clean, triggered, [max(tau, SCORE_FLOOR)]])
    low, high = float(both.min()), float(both.max())
    log_axis = high / low > 100
    if log_axis:
        bins = np.logspace(math.log10(low) - 0.05, math.log10(high) + 0.05, 70)
    else:
        bins = np.linspace(low, high, 70)
    figure, ax = plt.subplots(figsize=(8, 4.4))
    clean_counts, _, _ = ax.hist(clean, bins=bins, color=CLEAN_COLOUR, alpha=0.6,
                                 label=f"clean, correctly classified (n={len(clean)})")
    peak = float(clean_counts.max()) if len(clean) else 0.0
    if len(triggered):
        triggered_counts, _, _ = ax.hist(triggered, bins=bins, color=TRIGGERED_COLOUR, alpha=0.6,
                                         label=f"triggered, sent to the target (n={len(triggered)})")
        peak = max(peak, float(triggered_counts.max()))
    ax.axvline(tau, color="black", ls="--", lw=1.5, label=f"tau = {tau:.3g}: reject below")
    ax.axvspan(bins[0], tau, color="grey", alpha=0.12)
    if log_axis:
        ax.set_xscale("log")
    log_counts = peak > 50  # a log count axis keeps the few clean inputs below tau visible
    if log_counts:
        ax.set_yscale("log")
    ax.set_xlabel("BaDExpert score" + (" (log scale)" if log_axis else "") + "; low = backdoor-like")
    ax.set_ylabel("inputs" + (" (log scale)" if log_counts else ""))
    ax.set_title(f"Score distributions; {float(rejects(clean_scores, tau).float().mean()):.2%} of these clean and "
                 f"{float(rejects(triggered_scores, tau).float().mean()) if len(triggered) else float('nan'):.2%} "
                 "of these triggered rejected", fontsize=10)
    ax.legend(fontsize=8.5, loc="best")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


PLANE_FLOOR = 1e-7  # 1 - b and a below this (float32 rounding) are drawn at the floor of the zoomed panel


def _density(ax, x, y, bins, colour: str):
    """A 2-D histogram of (x, y) in one colour, darker where denser (log counts), empty bins blank."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap, LogNorm

    if len(x) == 0:
        return
    counts, xedges, yedges = np.histogram2d(x, y, bins=bins)
    counts = np.ma.masked_equal(counts, 0)
    cmap = LinearSegmentedColormap.from_list("density", ["#ffffff", colour])
    ax.pcolormesh(xedges, yedges, counts.T, cmap=cmap, norm=LogNorm(vmin=0.5, vmax=max(counts.max(), 1.0)),
                  alpha=0.75, shading="flat", rasterized=True)


def plot_confidence_plane(path: Path, clean_b, clean_a, triggered_b, triggered_a, tau: float, alpha: float) -> None:
    """x = b (backdoor expert agrees with M), y = a (auxiliary agrees with M); reject where score < tau.

    Left: the whole plane, as 2-D histograms (the paper's Fig. 6). Right: the backdoor corner
    (b -> 1, a -> 0) magnified, with 1 - b and a on log axes, where the triangle rule acts.
    """
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from defense.score import triangle_score

    plt = _pyplot()
    figure, (full, corner) = plt.subplots(1, 2, figsize=(12.5, 6.6), layout="constrained")
    populations = [(clean_b, clean_a, CLEAN_COLOUR), (triggered_b, triggered_a, TRIGGERED_COLOUR)]

    # whole plane, linear axes
    grid = torch.linspace(0, 1, 801, dtype=torch.float64)
    b, a = torch.meshgrid(grid, grid, indexing="xy")
    plane_scores = triangle_score(b, a, alpha)
    score = plane_scores.numpy()
    full.contourf(b.numpy(), a.numpy(), rejects(plane_scores, tau).numpy().astype(float), levels=[0.5, 1.5], colors=[REJECTED_COLOUR], alpha=0.9)
    for x, y, colour in populations:
        _density(full, x.double().numpy(), y.double().numpy(), np.linspace(0, 1, 51), colour)
    full.contour(b.numpy(), a.numpy(), score, levels=[tau], colors="black", linewidths=1.4, linestyles="--")
    full.set_xlim(0, 1)
    full.set_ylim(0, 1)
    full.set_aspect("equal")
    full.set_xlabel("b: backdoor expert's confidence in M's label")
    full.set_ylabel("a: auxiliary model's confidence in M's label")
    full.set_title("Confidence plane (paper Fig. 6), darker = more inputs", fontsize=10)

    # the corner b -> 1, a -> 0, log axes of 1 - b and a
    edges = np.logspace(np.log10(PLANE_FLOOR) - 0.25, 0, 41)
    u = torch.logspace(np.log10(PLANE_FLOOR) - 0.25, 0, 600, dtype=torch.float64)
    uu, vv = torch.meshgrid(u, u, indexing="xy")
    corner_score = triangle_score(1 - uu, vv, alpha)
    corner.contourf(uu.numpy(), vv.numpy(), rejects(corner_score, tau).numpy().astype(float), levels=[0.5, 1.5],
                    colors=[REJECTED_COLOUR], alpha=0.9)
    for x, y, colour in populations:
        gap = (1 - x.double()).clamp(PLANE_FLOOR, 1).numpy()
        _density(corner, gap, y.double().clamp(PLANE_FLOOR, 1).numpy(), edges, colour)
    corner.contour(uu.numpy(), vv.numpy(), corner_score.numpy(), levels=[tau], colors="black", linewidths=1.4, linestyles="--")
    corner.set_xscale("log")
    corner.set_yscale("log")
    corner.set_xlim(edges[0], 1)
    corner.set_ylim(edges[0], 1)
    corner.set_aspect("equal")
    corner.set_xlabel("1 - b (log scale): 0 = the expert fully agrees with M")
    corner.set_ylabel("a (log scale): 0 = the auxiliary fully disagrees")
    corner.set_title(f"Backdoor corner magnified (values below {PLANE_FLOOR:g} drawn at the edge)", fontsize=10)

    rejected_clean = float(rejects(triangle_score(clean_b, clean_a, alpha), tau).float().mean()) if len(clean_b) else float("nan")
    rejected_triggered = (float(rejects(triangle_score(triggered_b, triggered_a, alpha), tau).float().mean())
                          if len(triggered_b) else float("nan"))
    handles = [
        Patch(color=CLEAN_COLOUR, label=f"clean, correctly classified (n={len(clean_b)}; {rejected_clean:.1%} rejected)"),
        Patch(color=TRIGGERED_COLOUR,
              label=f"triggered, sent to the target (n={len(triggered_b)}; {rejected_triggered:.1%} rejected)"),
        Line2D([], [], color="black", ls="--", label=f"decision boundary: score = tau ({tau:.3g})"),
        Patch(color=REJECTED_COLOUR, label="rejected region (score < tau)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    for ax in (full, corner):
        ax.grid(alpha=0.25)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------
# report


def _fmt(value: float | None, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.4f}"


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
    for name, label in METRIC_LABELS.items():
        entry = metrics[name]
        percent = name != "auroc"
        interval = ("n/a" if entry["ci_low"] is None else
                    f"[{_fmt(entry['ci_low'], percent)}, {_fmt(entry['ci_high'], percent)}]")
        lines.append(f"| {label} | {_fmt(entry['value'], percent)} | {interval} |")
    counts = report["counts"]
    lines += [
        "",
        f"AUROC populations: {counts['n_clean_correct']} clean images that M classifies correctly vs. "
        f"{counts['n_triggered_successful']} triggered images from a non-target source that M sends to the target "
        f"(of {counts['n_triggered_counted']} from a non-target source).",
        f"Intervals: percentile bootstrap, {report['bootstrap']['resamples']} resamples (seed "
        f"{report['bootstrap']['seed']}), clean and triggered images resampled independently.",
    ]
    for warning in report["warnings"]:
        lines.append(f"\n**Warning:** {warning}")
    lines += ["", "## Plots", ""]
    for title, name in report["plots"].items():
        lines += [f"### {title}", "", f"![{title}]({name})", ""]
    path.write_text("\n".join(lines).rstrip() + "\n")


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_bundle(args) -> int:
    from defense.bundle import load_bundle
    from defense.cli import resolve_device
    from defense.data import load_image_folder
    from defense.evaluation import detection_metrics

    started = time.monotonic()
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: must be 0 (no intervals) or a positive number of resamples")
    for option, folder in (("--clean", args.clean), ("--triggered", args.triggered)):
        if not folder.is_dir():
            raise UserError(f"{option} {folder}: no such folder")
    if args.report.exists() and not args.report.is_dir():
        raise UserError(f"--report {args.report}: exists and is not a folder")
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
        metric_report[name] = {"value": _json_number(float(values[name])), "ci_low": low, "ci_high": high}

    report_dir = Path(args.report)
    report_dir.mkdir(parents=True, exist_ok=True)
    auroc_clean = clean_out.score[clean_correct]
    auroc_triggered = triggered_out.score[successful]
    plots = {
        "ROC curve": "roc.png",
        "Score histograms": "score_histogram.png",
        "Confidence plane (b, a)": "confidence_plane.png",
    }
    if successful.any():
        plot_roc(report_dir / plots["ROC curve"], auroc_clean, auroc_triggered, tau, manifest.target_fpr, metrics.auroc)
    else:
        del plots["ROC curve"]
    plot_histograms(report_dir / plots["Score histograms"], auroc_clean, auroc_triggered, tau)
    plot_confidence_plane(report_dir / plots["Confidence plane (b, a)"],
                          clean_out.expert_agreement[clean_correct], clean_out.auxiliary_agreement[clean_correct],
                          triggered_out.expert_agreement[successful], triggered_out.auxiliary_agreement[successful],
                          tau, guard.alpha)

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
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report_dir / "report.md", report)

    for warning in warnings:
        print(f"warning: {warning}")
    log(f"{len(clean)} clean and {len(triggered)} triggered images; target class {target} ({class_names[target]}); "
        f"tau {tau:.4g}")
    for name, label in METRIC_LABELS.items():
        entry = metric_report[name]
        percent = name != "auroc"
        interval = "" if entry["ci_low"] is None else f"  [{_fmt(entry['ci_low'], percent)}, {_fmt(entry['ci_high'], percent)}]"
        log(f"  {label:34s} {_fmt(entry['value'], percent):>8s}{interval}")
    print(f"report written to {report_dir}/ (report.md, report.json, {', '.join(plots.values())})")
    return 0
