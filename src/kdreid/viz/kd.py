"""KD-ReID's picture: does the student measure distances as its teacher does?

The distill stage saves RUN/kd_distances_before.npz and RUN/kd_distances_after.npz. For each target t (in the
order of the `targets` array) they hold, over the pairs of a fixed sample of that target's training images,
`t{i}_teacher` and `t{i}_student` (the cosine distances, 1 − cos, between the vectors distillation matches:
the `kd_feature` of target t's teacher and of the student, both in eval mode) and `t{i}_same` (whether the pair
shows one identity; used for this picture only, never for training). Distance distillation drives the points
towards the diagonal; the within-identity pairs should sit low on both axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from kdreid.errors import KdreidError
from kdreid.viz.common import PALETTE, fitted_suptitle, new_figure, read_npz, save_png

SHOWN_WITHIN = 3000  # within-identity pairs drawn as points over the density (a sample when there are more)


def load_kd_distances(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """{target: {"teacher", "student", "same"}} of a distill stage's kd_distances_*.npz, checked."""
    path = Path(path)
    arrays = read_npz(path, "the distill stage (kd_distances_before/after.npz)")
    targets = [str(name) for name in np.atleast_1d(arrays.get("targets", []))]
    distances = {}
    for index, target in enumerate(targets):
        keys = [f"t{index}_{kind}" for kind in ("teacher", "student", "same")]
        if (any(key not in arrays or arrays[key].ndim != 1 for key in keys)
                or len({len(arrays[key]) for key in keys}) != 1
                or not all(np.issubdtype(arrays[key].dtype, np.number) for key in keys[:2])):
            raise KdreidError(f"{path} lacks or mismatches {', '.join(keys)}; it is not a distill stage's file")
        distances[target] = {"teacher": arrays[keys[0]].astype(np.float64),
                             "student": arrays[keys[1]].astype(np.float64), "same": arrays[keys[2]].astype(bool)}
    if not distances:
        raise KdreidError(f"{path} names no target; it is not a distill stage's kd_distances file")
    return distances


def agreement(teacher: np.ndarray, student: np.ndarray) -> dict[str, float]:
    """How closely the student's distances follow the teacher's: Pearson r and the mean absolute difference."""
    if len(teacher) < 2 or np.std(teacher) == 0 or np.std(student) == 0:
        r = float("nan")
    else:
        r = float(np.corrcoef(teacher, student)[0, 1])
    return {"pearson": r, "mean_abs_difference": float(np.mean(np.abs(teacher - student))) if len(teacher) else
            float("nan")}


def kd_distance_picture(before: Mapping | str | Path, after: Mapping | str | Path | None, path: str | Path,
                        title: str = "") -> Path:
    """Write the picture to `path` (PNG): a row per moment (before distillation, after it — left out when the run
    has not finished), a column per target; each panel (teacher distance, student distance) of the pairs of two
    identities as a density and of the pairs of one identity as points, the diagonal, and the agreement (over all
    pairs) in its title."""
    from matplotlib.colors import LogNorm  # after viz.common, which says how to install matplotlib

    moments = [("before distillation", before if isinstance(before, Mapping) else load_kd_distances(before))]
    if after is not None:
        moments.append(("after distillation", after if isinstance(after, Mapping) else load_kd_distances(after)))
    targets = list(moments[0][1])
    figure = new_figure(4.2 * len(targets), 4.0 * len(moments) + (0.5 if title else 0.2))
    axes_grid = figure.subplots(len(moments), len(targets), squeeze=False)
    rng = np.random.default_rng(0)  # which within-identity pairs are drawn when there are too many: fixed
    for row, (moment, distances) in enumerate(moments):
        for column, target in enumerate(targets):
            axes = axes_grid[row, column]
            pairs = distances.get(target)
            if pairs is None or not len(pairs["teacher"]):
                axes.set_title(f"{target}, {moment}: no pairs", fontsize=9)
                continue
            finite = np.isfinite(pairs["teacher"]) & np.isfinite(pairs["student"])  # a diverged student: NaN
            teacher, student, same = pairs["teacher"][finite], pairs["student"][finite], pairs["same"][finite]
            if not len(teacher):
                axes.set_title(f"{target}, {moment}: no finite distances", fontsize=9)
                continue
            upper = max(float(teacher.max()), float(student.max()), 1e-6)
            # Pairs of two identities as a density on a log scale (they are most pairs, and a few dense cells
            # would hide the rest on a linear one); pairs of one identity as points over it.
            axes.hist2d(teacher[~same], student[~same], bins=60, range=[[0, upper], [0, upper]], cmap="Greys",
                        cmin=1, norm=LogNorm())
            within = np.flatnonzero(same)
            if len(within) > SHOWN_WITHIN:
                within = rng.choice(within, SHOWN_WITHIN, replace=False)
            axes.scatter(teacher[within], student[within], s=2, color=PALETTE[2], alpha=0.4,
                         label=f"one identity ({int(same.sum()):,} pairs; grey: two, {int((~same).sum()):,})")
            axes.plot([0, upper], [0, upper], color=PALETTE[3], linewidth=1, label="student = teacher")
            fit = agreement(teacher, student)
            axes.set_title(f"{target}, {moment}\nPearson r {fit['pearson']:.3f}, mean |student − teacher| "
                           f"{fit['mean_abs_difference']:.3f}", fontsize=9)
            axes.set_xlabel("teacher's distance (1 − cos)", fontsize=8)
            axes.set_ylabel("student's distance (1 − cos)", fontsize=8)
            axes.legend(fontsize=7, loc="upper left")
    if title:  # one target's column (4.2 inches) is narrower than a report's title
        fitted_suptitle(figure, title, fontsize=11)
    figure.tight_layout()
    return save_png(figure, path)
