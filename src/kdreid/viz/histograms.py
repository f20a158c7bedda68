"""D-MMD's picture: histograms of within-identity and between-identity distances, for source and target, before
and after adaptation.

The adapt stage saves RUN/distances_before.npz and RUN/distances_after.npz, each holding the 1-D arrays
`source_within`, `source_between`, `target_within`, `target_between` (Euclidean distances between the embeddings
of image pairs of one identity / of two identities). Re-identification works where the within-class histogram
sits left of the between-class one; D-MMD pulls the target's two histograms towards the source's shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from kdreid.errors import KdreidError
from kdreid.viz.common import PALETTE, new_figure, read_npz, save_png

DOMAINS = ("source", "target")
KINDS = ("within", "between")
KEYS = tuple(f"{domain}_{kind}" for domain in DOMAINS for kind in KINDS)
BINS = 60


def load_distances(path: str | Path) -> dict[str, np.ndarray]:
    """The four distance arrays of an adapt stage's distances_*.npz, checked."""
    path = Path(path)
    arrays = read_npz(path, "the adapt stage (distances_before/after.npz)")
    missing = [key for key in KEYS if key not in arrays]
    if missing or any(not np.issubdtype(arrays[key].dtype, np.number) for key in KEYS):
        raise KdreidError(f"{path} lacks {', '.join(missing) or 'numeric distances'}; it is not an adapt stage's "
                          "distance file")
    return {key: arrays[key].astype(np.float64).ravel() for key in KEYS}


def summarize(distances: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{key: {"count", "mean"}} of each distance set (NaN mean for an empty one)."""
    return {key: {"count": int(len(values)), "mean": float(np.mean(values)) if len(values) else float("nan")}
            for key, values in distances.items()}


def dmmd_histograms(before: Mapping[str, np.ndarray] | str | Path,
                    after: Mapping[str, np.ndarray] | str | Path | None,
                    path: str | Path, title: str = "") -> Path:
    """Write the histograms to `path` (PNG): a row per moment (before, after — after is left out when the run
    has not finished), a column per domain, within- and between-class distances overlaid, density-scaled so that
    sets of different sizes compare, on the same bins in every panel of a row (a model's distance scale changes
    with training, so each row gets its own range)."""
    moments = [("before adaptation", before if isinstance(before, Mapping) else load_distances(before))]
    if after is not None:
        moments.append(("after adaptation", after if isinstance(after, Mapping) else load_distances(after)))
    figure = new_figure(10, 3.2 * len(moments) + (0.5 if title else 0.2))
    axes_grid = figure.subplots(len(moments), len(DOMAINS), squeeze=False)
    for row, (moment, distances) in enumerate(moments):
        values = np.concatenate([distances[key] for key in KEYS])
        values = values[np.isfinite(values)]
        # The top 1% is drawn in the last bin: a few outlying pairs must not squash everything else to one bar.
        upper = float(np.quantile(values, 0.99)) if len(values) else 1.0
        bins = np.linspace(0.0, max(upper, 1e-6), BINS + 1)
        for column, domain in enumerate(DOMAINS):
            axes = axes_grid[row, column]
            for colour, kind in zip(PALETTE, KINDS):
                data = distances[f"{domain}_{kind}"]
                # A diverged model's distances are NaN: left out (and counted in the legend), as numpy and
                # matplotlib would warn on them and draw nothing.
                finite = data[np.isfinite(data)]
                if len(finite) == 0:
                    continue
                left_out = f", {len(data) - len(finite)} non-finite left out" if len(finite) < len(data) else ""
                # One filled outline per set ("stepfilled"), not one rectangle per bin: the same picture, drawn
                # several times faster.
                axes.hist(np.clip(finite, bins[0], bins[-1]), bins=bins, density=True, histtype="stepfilled",
                          alpha=0.5, color=colour, edgecolor=colour,
                          label=f"{kind}-class (n={len(finite)}, mean {np.mean(finite):.3g}{left_out})")
            axes.set_title(f"{domain}, {moment}", fontsize=10)
            axes.set_xlabel("Euclidean distance between embeddings (last bin: beyond the 99th percentile)", fontsize=8)
            axes.set_ylabel("density")
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize=8)
            else:  # nothing drawn: an empty legend would only warn
                axes.text(0.5, 0.5, "no finite distances", ha="center", va="center", transform=axes.transAxes)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return save_png(figure, path)
