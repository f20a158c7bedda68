"""Training curves of one stage from its RUN/metrics.json: each loss over epochs, and mAP per dataset at the
epochs where the stage evaluated (every `eval_freq` epochs, and the last)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from matplotlib.ticker import MaxNLocator

from kdreid.errors import KdreidError
from kdreid.viz.common import PALETTE, new_figure, save_png


def curve_series(metrics: Mapping) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """({loss name: [(epoch, mean loss)]}, {dataset: [(epoch, mAP)]}) from a stage's metrics.json content; one line
    when it is not what a training stage writes (a damaged file: the caller names it)."""
    epochs = metrics.get("epochs")
    if epochs is None:
        raise KdreidError("metrics.json has no 'epochs' list: only a training stage's metrics have curves")
    if not isinstance(epochs, list):
        raise KdreidError(f"'epochs' is {type(epochs).__name__}, not the list of epoch records a training stage writes")
    losses: dict[str, list[tuple[int, float]]] = {}
    maps: dict[str, list[tuple[int, float]]] = {}
    for position, entry in enumerate(epochs, 1):
        try:  # only this entry's parsing: any other value than a stage writes is damage, said in one line
            epoch = int(entry["epoch"])
            entry_losses = [(name, float(value)) for name, value in (entry.get("losses") or {}).items()]
            entry_maps = [(dataset, float(values["mAP"])) for dataset, values in (entry.get("metrics") or {}).items()
                          if isinstance(values, Mapping) and values.get("mAP") is not None]
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise KdreidError(f"'epochs' entry {position} is not a training stage's record "
                              f"({type(error).__name__}: {error})") from None
        for name, value in entry_losses:
            losses.setdefault(name, []).append((epoch, value))
        for dataset, value in entry_maps:
            maps.setdefault(dataset, []).append((epoch, value))
    if not losses and not maps:
        raise KdreidError("no 'epochs' entry holds losses or metrics; nothing to plot")
    return losses, maps


def training_curves(metrics: Mapping, path: str | Path, title: str = "") -> Path:
    """Two panels side by side: losses (the total `loss` in black, its terms in colour) and mAP (%) per dataset."""
    losses, maps = curve_series(metrics)
    figure = new_figure(11, 3.8 + (0.3 if title else 0))
    loss_axes, map_axes = figure.subplots(1, 2)
    colours = iter(PALETTE)
    for name, points in losses.items():
        epochs, values = zip(*points)
        total = name == "loss"
        loss_axes.plot(epochs, values, marker="o", markersize=3, label=name, color="black" if total else
                       next(colours, None), linewidth=2.2 if total else 1.3)
    _finish_axes(loss_axes, "training losses (epoch means)", "loss", legend=bool(losses))
    colours = iter(PALETTE)
    for dataset, points in maps.items():
        epochs, values = zip(*points)
        map_axes.plot(epochs, values, marker="o", markersize=4, label=dataset, color=next(colours, None),
                      linestyle="--" if dataset == "source-val" else "-")
    _finish_axes(map_axes, "mAP (%) when evaluated", "mAP (%)", legend=bool(maps))
    if not maps:
        map_axes.text(0.5, 0.5, "no evaluation recorded", ha="center", va="center", transform=map_axes.transAxes)
    # Whole epochs on the x axes: a fractional epoch tick would suggest measurements that do not exist. A few
    # epochs (one evaluation: the locator falls back to fractions around it) get a tick each, no more.
    for axes, series in ((loss_axes, losses), (map_axes, maps)):
        epochs = sorted({epoch for points in series.values() for epoch, _ in points})
        if 0 < len(epochs) <= 12:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    return save_png(figure, path)


def _finish_axes(axes, title: str, ylabel: str, *, legend: bool) -> None:
    """Title, epoch x label, y label and grid of one panel; the legend when something was plotted."""
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("epoch")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if legend:
        axes.legend(fontsize=8)
