"""The pipeline's final table as a bar chart: per target, mAP of source-only, the target's teacher, the blended
baseline and the KD-ReID student (from a pipeline RUN/metrics.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from kdreid.errors import KdreidError
from kdreid.viz.common import PALETTE, new_figure, save_png

# (metrics.json key, default label), in the order of the results table.
ROWS = (
    ("source_only", "source only (teacher arch.)"),
    ("source_only_student", "source only (student arch.)"),
    ("teachers", "teacher (D-MMD, its target)"),
    ("blend", "blend (D-MMD on all targets)"),
    ("student", "KD-ReID student"),
)


def pipeline_rows(metrics: Mapping, metric: str = "mAP") -> tuple[list[str], dict[str, dict[str, float]]]:
    """(targets, {row key: {target: value}}) of the rows metrics.json holds; a row absent for a target is left
    out of it (its bar is not drawn). One line when a value is not a number (a damaged file: the caller names it)."""
    rows: dict[str, dict[str, float]] = {}
    targets: list[str] = []
    for key, _ in ROWS:
        per_target = metrics.get(key)
        if per_target is None:
            continue
        # Another type than kdreid writes is damage too, said in one line: skipped, the row's bars would silently
        # be missing from a chart whose table still shows them.
        if not isinstance(per_target, Mapping):
            raise KdreidError(f"its '{key}' row is {type(per_target).__name__}, not a mapping of targets to metrics")
        for target, entry in per_target.items():
            if not isinstance(entry, Mapping):
                raise KdreidError(f"its '{key}' row holds {type(entry).__name__} for {target}, not a mapping of "
                                  "metrics")
        try:  # only this row's parsing: a value other than a number is damage, said in one line
            values = {t: float(m[metric]) for t, m in per_target.items() if m.get(metric) is not None}
        except (TypeError, ValueError) as error:
            raise KdreidError(f"its '{key}' row holds a {metric} that is not a number ({error})") from None
        if values:
            rows[key] = values
            targets += [t for t in values if t not in targets]
    if not rows:
        raise KdreidError(f"metrics.json holds none of {', '.join(k for k, _ in ROWS)}: not a pipeline run's metrics")
    return targets, rows


def pipeline_bars(metrics: Mapping, path: str | Path, *, metric: str = "mAP", labels: Mapping[str, str] | None = None,
                  title: str = "") -> Path:
    """Grouped bars, one group per target (and their mean when every row covers every target), one bar per row
    of ROWS; the value is printed on each bar. `labels` renames rows (e.g. with the architectures)."""
    targets, rows = pipeline_rows(metrics, metric)
    names = {key: (labels or {}).get(key, label) for key, label in ROWS}
    groups = list(targets)
    if len(targets) > 1 and all(len(values) == len(targets) for values in rows.values()):
        groups.append("mean")
        for values in rows.values():
            values["mean"] = sum(values[t] for t in targets) / len(targets)
    width = 0.8 / len(rows)
    # About 0.45 inch per bar, so that the values printed on neighbouring bars do not overlap.
    figure = new_figure(max(6.0, 3.0 + 0.45 * len(groups) * len(rows)), 4.6 + (0.3 if title else 0))
    axes = figure.subplots()
    highest = max(v for values in rows.values() for v in values.values())
    for index, (key, values) in enumerate(rows.items()):
        positions = [g + (index - (len(rows) - 1) / 2) * width for g, group in enumerate(groups) if group in values]
        heights = [values[group] for group in groups if group in values]
        bars = axes.bar(positions, heights, width * 0.95, label=names[key], color=PALETTE[index % len(PALETTE)])
        axes.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylabel(f"{metric} (%)")
    axes.set_ylim(0, max(1.0, highest) * 1.15)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(title or f"{metric} per target", fontsize=11)
    figure.tight_layout()
    return save_png(figure, path)
