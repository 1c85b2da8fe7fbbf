"""The evaluation report's plots: the ROC curve, the score histograms with tau, the (b, a)
confidence plane with the decision boundary (the paper's Fig. 6) and, with the feature signal, the
plane of the two signals' scores. PNG files, drawn with matplotlib's
Agg backend."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from defense.evaluation import backdoor_likeness
from defense.score import rejects

SCORE_FLOOR = 1e-6  # scores are shown on a log axis; smaller ones are drawn at this value


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


def draw_report_plots(report_dir: Path, clean_out, triggered_out, clean_correct, successful, tau: float,
                      target_fpr: float, auroc: float, alpha: float) -> dict[str, str]:
    """The report's plots of the AUROC's populations (clean correct, triggered successful): {title: file name}.

    No ROC curve when no triggered image reaches the target."""
    auroc_clean = clean_out.score[clean_correct]
    auroc_triggered = triggered_out.score[successful]
    plots = {
        "ROC curve": "roc.png",
        "Score histograms": "score_histogram.png",
        "Confidence plane (b, a)": "confidence_plane.png",
    }
    if successful.any():
        plot_roc(report_dir / plots["ROC curve"], auroc_clean, auroc_triggered, tau, target_fpr, auroc)
    else:
        del plots["ROC curve"]
    plot_histograms(report_dir / plots["Score histograms"], auroc_clean, auroc_triggered, tau)
    plot_confidence_plane(report_dir / plots["Confidence plane (b, a)"],
                          clean_out.expert_agreement[clean_correct], clean_out.auxiliary_agreement[clean_correct],
                          triggered_out.expert_agreement[successful], triggered_out.auxiliary_agreement[successful],
                          tau, alpha)
    if torch.isfinite(clean_out.feature_score).any():
        plots["Signal plane (expert, features)"] = "signal_plane.png"
        plot_signal_plane(report_dir / plots["Signal plane (expert, features)"],
                          clean_out.expert_score[clean_correct], clean_out.feature_score[clean_correct],
                          triggered_out.expert_score[successful], triggered_out.feature_score[successful], tau)
    return plots


def plot_signal_plane(path: Path, clean_expert, clean_feature, triggered_expert, triggered_feature, tau: float) -> None:
    """Each input at (expert score, feature score), log axes: the fused decision rejects an input
    left of or below tau (the shaded L), so the plot shows which signal caught which input."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6.4, 6.0), layout="constrained")
    values = torch.cat([clean_expert, clean_feature, triggered_expert, triggered_feature]).double()
    values = values[torch.isfinite(values)].clamp_min(SCORE_FLOOR)
    low = min(float(values.min()) if len(values) else SCORE_FLOOR, tau) / 2
    high = max(float(values.max()) if len(values) else 1.0, tau) * 2
    ax.axvspan(low, tau, color="grey", alpha=0.15)
    ax.axhspan(low, tau, color="grey", alpha=0.15)
    for x, y, colour, label in ((clean_expert, clean_feature, CLEAN_COLOUR, "clean, correctly classified"),
                                (triggered_expert, triggered_feature, TRIGGERED_COLOUR, "triggered, sent to the target")):
        if len(x):
            caught = float(rejects(torch.minimum(x.double(), y.double()), tau).float().mean())
            ax.scatter(x.double().clamp_min(SCORE_FLOOR), y.double().clamp_min(SCORE_FLOOR), s=6, alpha=0.35,
                       color=colour, label=f"{label} (n={len(x)}; {caught:.1%} rejected)")
    ax.axvline(tau, color="black", ls="--", lw=1.2)
    ax.axhline(tau, color="black", ls="--", lw=1.2, label=f"tau = {tau:.3g}: rejected left of or below")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("expert score (paper Eq. 3); low = backdoor-like")
    ax.set_ylabel("feature signal (same scale); low = far from clean activations")
    ax.set_title("Which signal rejects which input", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.25)
    figure.savefig(path, dpi=110)
    plt.close(figure)
