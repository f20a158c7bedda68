"""The verification picture of an evaluation (`kdreid evaluate --verification`): the distance histograms of
positive pairs (one identity, two cameras) and negative pairs (two identities), and the ROC curve with the
true-positive rate and threshold at each false-positive level of `kdreid.evaluation.verification`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdreid.evaluation.verification import FPR_LEVELS, VerificationResult, threshold_text
from kdreid.viz.common import PALETTE, new_figure, save_png

DRAWN_BINS = 64  # the histogram's bins as drawn: groups of the result's fine bins


def verification_picture(result: VerificationResult, path: str | Path, title: str = "") -> Path:
    """Write the picture to `path` (PNG): histograms left, ROC right (false-positive rate on a log axis)."""
    figure = new_figure(11, 4.2)
    histogram_axes, roc_axes = figure.subplots(1, 2)
    group = max(1, len(result.positives) // DRAWN_BINS)
    edges = np.append(result.edges[:-1:group], result.edges[-1])  # each group's first edge, then the last one
    levels = [(fpr, *result.at_fpr(fpr)) for fpr in FPR_LEVELS]
    for colour, name, counts in ((PALETTE[2], "positive", result.positives), (PALETTE[3], "negative",
                                                                              result.negatives)):
        total = counts.sum()
        if not total:
            continue
        grouped = np.add.reduceat(counts, np.arange(0, len(counts), group))
        density = grouped / (total * np.diff(edges))
        histogram_axes.stairs(density, edges, fill=True, alpha=0.5, color=colour,
                              label=f"{name} pairs (n={total:,})")
    for index, (fpr, _, threshold) in enumerate(levels):
        if threshold == threshold:
            histogram_axes.axvline(threshold, color="black", linestyle=(0, (1 + index, 2)), linewidth=1,
                                   label=f"threshold at FPR {fpr:g}: {threshold_text(threshold)}")
    histogram_axes.set_xlabel("distance between query and gallery embeddings")
    histogram_axes.set_ylabel("density")
    histogram_axes.set_title("positive: one identity, two cameras; negative: two identities", fontsize=9)
    histogram_axes.legend(fontsize=8)

    false_rate, true_rate, _ = result.roc()
    shown = false_rate > 0  # a log axis has no 0
    smallest = max(1e-6, 0.5 / max(result.num_negative, 1))
    roc_axes.plot(false_rate[shown], true_rate[shown], color=PALETTE[0], label=f"ROC, AUC {result.auc():.4f}")
    for fpr, tpr, _ in levels:
        if tpr == tpr and fpr >= smallest:
            roc_axes.plot([fpr], [tpr], "o", color="black", markersize=4)
            roc_axes.annotate(f"{100 * tpr:.1f} %", (fpr, tpr), textcoords="offset points", xytext=(-8, 6),
                              fontsize=8)
    roc_axes.set_xscale("log")
    roc_axes.set_xlim(smallest, 1.0)
    roc_axes.set_ylim(0.0, 1.02)
    roc_axes.set_xlabel("false-positive rate (negative pairs closer than the threshold)")
    roc_axes.set_ylabel("true-positive rate")
    roc_axes.grid(True, which="both", alpha=0.3)
    roc_axes.legend(fontsize=8, loc="lower right")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return save_png(figure, path)
