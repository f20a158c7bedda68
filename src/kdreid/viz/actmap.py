"""Activation maps: where a model looks in a person image. The spatial attention of the model's final activated
feature map (the one its embedding pools) — the sum over channels of the squared activations (Zagoruyko &
Komodakis, "Paying more attention to attention", ICLR 2017, p = 2; the map torchreid's `visactmap` draws) —
upsampled to the image and drawn over it as a heat map.

Several models side by side on the same images show whether a KD student looks where its teacher looks: under
each map after the first row, `r` is the Pearson correlation of that map with the first model's map of the same
image (1: the same places, 0: unrelated).

    pages = visualize_activation_maps([("teacher", teacher), ("student", student)], dataset.query,
                                      "runs/kd/actmap", prefix="market1501")
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdreid.errors import EvaluationError
from kdreid.viz.common import fitted_suptitle, new_figure, remove_pages, save_png
from kdreid.viz.ranking import THUMBNAIL_SIZE, choose_queries

IMAGES_PER_PAGE = 8  # columns per PNG; more images go to further pages
HEAT_WEIGHT = 0.6  # the heat map's share of each drawn pixel; the image keeps the rest
COLORMAP = "jet"  # blue = little attention, red = most, as re-ID papers and torchreid draw it


@torch.no_grad()
def activation_maps(model: nn.Module, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, h, w) float32 in [0, 1] on the CPU for float RGB images (N, 3, H, W) in [0, 1]: the model's attention,
    upsampled bilinearly to `size` (default the images' H x W) and scaled to [0, 1] per image by its minimum and
    maximum. A map with the same value everywhere (nothing stands out) is all zero. The model is put in eval mode."""
    if not callable(getattr(model, "trunk", None)):
        raise EvaluationError("activation maps need a kdreid model's feature maps: pass its checkpoint (model.pt), "
                              "not an exported file")
    model.eval()
    device = next(model.parameters()).device
    _, final_map = model.trunk(images.to(device).float())
    attention = final_map.float().pow(2).sum(dim=1, keepdim=True)  # (N, 1, h, w)
    attention = F.interpolate(attention, size=size or tuple(images.shape[2:]), mode="bilinear",
                              align_corners=False)[:, 0]
    low = attention.amin(dim=(1, 2), keepdim=True)
    span = attention.amax(dim=(1, 2), keepdim=True) - low
    # Relative test: a constant map picks up rounding noise in the upsampling, which must not be blown up to [0, 1].
    flat = span <= 1e-6 * attention.abs().amax(dim=(1, 2), keepdim=True)
    return torch.where(flat, torch.zeros_like(attention), (attention - low) / span.clamp_min(1e-30)).cpu()


def map_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps of one image (NaN when either is flat)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else float("nan")


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 image with its (H, W) map in [0, 1] drawn over it in COLORMAP colours."""
    from matplotlib import colormaps

    colours = colormaps[COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255
    return np.round(image * (1 - HEAT_WEIGHT) + colours * HEAT_WEIGHT).astype(np.uint8)


def draw_activation_maps(images: np.ndarray, maps: Sequence[tuple[str, np.ndarray]], path: str | Path, *,
                         captions: Sequence[str] = (), title: str = "") -> Path:
    """One PNG: a column per image (N, H, W, 3 uint8), the image on top, then a row per (label, maps (N, H, W)) with
    the map drawn over the image; under each map of the rows after the first, its correlation with the first's."""
    if not len(images) or not maps:
        raise EvaluationError("no image or no model to draw activation maps of")
    rows, columns = 1 + len(maps), len(images)
    cell_width, cell_height = 1.05, 2.35  # inches: a 2:1 thumbnail and a line of text
    label_width = 1.0  # inches left of the first column for the rows' labels
    top_space = 0.15 + (0.35 if title else 0.0)
    figure_width, figure_height = label_width + cell_width * columns + 0.1, cell_height * rows + top_space
    figure = new_figure(figure_width, figure_height)
    grid = figure.add_gridspec(rows, columns, left=label_width / figure_width, right=0.99, bottom=0.3 / figure_height,
                               top=1 - top_space / figure_height, wspace=0.12, hspace=0.3)
    if title:
        fitted_suptitle(figure, title, fontsize=11, y=1 - 0.1 / figure_height, va="top")
    reference = maps[0][1]
    for row, (label, row_maps) in enumerate([("image", None), *maps]):
        agreements = [] if row < 2 else [map_agreement(m, r) for m, r in zip(row_maps, reference)]
        finite = [a for a in agreements if a == a]
        if finite:  # the row's label says how closely it follows the first model on this page, on average
            label = f"{label}\nmean r {sum(finite) / len(finite):.2f}"
        for column, image in enumerate(images):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(image if row_maps is None else overlay(image, row_maps[column]), interpolation="nearest")
            axes.set_axis_off()
            text = ""
            if row_maps is None and column < len(captions):
                text = captions[column]
            elif row > 1:
                agreement = agreements[column]
                text = "r n/a" if agreement != agreement else f"r {agreement:.2f}"
            if text:
                axes.text(0.5, -0.03, text, transform=axes.transAxes, ha="center", va="top", fontsize=7)
            if column == 0:
                axes.text(-0.12, 0.5, label, transform=axes.transAxes, ha="right", va="center", fontsize=8,
                          wrap=True)
    return save_png(figure, path)


def visualize_activation_maps(
    models: Sequence[tuple[str, nn.Module]],
    records,
    out_dir: str | Path,
    *,
    prefix: str = "actmap",
    num_images: int = 8,
    device: str | torch.device | None = None,
    title: str = "",
    size: tuple[int | None, int | None] = (None, None),
) -> list[Path]:
    """Activation maps of each (label, model) on `num_images` of `records` (ImageRecord-like, with .path .pid
    .camid; chosen spread over the list, as `choose_queries` chooses), each model fed the images at `size`
    (height, width; a side left None: the size its checkpoint records), written as OUT_DIR/<prefix>_01.png,
    _02.png, ... with IMAGES_PER_PAGE images per page; that prefix's pages from an earlier call are removed first.
    -> the written paths."""
    from kdreid.data.cache import read_image
    from kdreid.evaluation.features import model_input_size, pick_device

    if not models:
        raise EvaluationError("no model to draw activation maps of")
    remove_pages(out_dir, prefix)
    chosen = [records[i] for i in choose_queries(len(records), num_images)]
    if not chosen:
        return []
    device = pick_device(device)
    images = np.stack([read_image(str(r.path), *THUMBNAIL_SIZE) for r in chosen])  # what the picture shows
    maps = []
    for label, model in models:
        recorded = model_input_size(model)
        height, width = size[0] or recorded[0], size[1] or recorded[1]
        batch = torch.from_numpy(np.stack([read_image(str(r.path), height, width) for r in chosen]))
        model.to(device)
        maps.append((label, activation_maps(model, batch.permute(0, 3, 1, 2).float().div(255), THUMBNAIL_SIZE)
                     .numpy()))
    captions = [f"id {r.pid} cam {r.camid}" for r in chosen]
    pages = []
    count = -(-len(chosen) // IMAGES_PER_PAGE)
    for start in range(0, len(chosen), IMAGES_PER_PAGE):
        page = start // IMAGES_PER_PAGE + 1
        part = slice(start, start + IMAGES_PER_PAGE)
        pages.append(draw_activation_maps(
            images[part], [(label, row[part]) for label, row in maps], Path(out_dir) / f"{prefix}_{page:02d}.png",
            captions=captions[part], title=title and f"{title} ({page}/{count})"))
    return pages
