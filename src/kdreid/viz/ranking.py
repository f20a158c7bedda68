"""Ranked results, the picture every re-ID user expects: each query beside its top-k gallery images, a green
border for a correct match (same identity), red for a wrong one, the distance under each image.

The gallery is filtered as the market protocol scores it (DESIGN §6): for each query, gallery images of the same
identity seen by the same camera are dropped, so the picture shows exactly the ranking that mAP and CMC count.

    pages = visualize_ranked_results(query_features, gallery_features, "runs/eval/visrank", prefix="market1501")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from kdreid.errors import EvaluationError
from kdreid.viz.common import (CORRECT_RGB, QUERY_RGB, WRONG_RGB, fitted_suptitle, new_figure, remove_pages,
                               save_png)

THUMBNAIL_SIZE = (128, 64)  # (height, width) of each image in the picture: the re-ID aspect ratio, small files
BORDER = 5  # pixels of coloured frame around a thumbnail
QUERIES_PER_PAGE = 8  # rows per PNG; more queries go to further pages


@dataclass
class RankedQuery:
    """One query's row of the picture: gallery indices nearest first, their distances and correctness."""

    query_index: int
    gallery_indices: list[int]
    distances: list[float]
    correct: list[bool]


def choose_queries(num_queries: int, count: int) -> list[int]:
    """`count` query indices spread evenly over 0..num_queries-1 (datasets list queries by identity, so this
    shows different people), always the same ones for the same dataset."""
    if num_queries <= 0 or count <= 0:
        return []
    count = min(count, num_queries)
    return sorted(set(np.linspace(0, num_queries - 1, count).round().astype(int).tolist()))


def rank_queries(
    distances: torch.Tensor | np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_camids: np.ndarray,
    query_indices: Sequence[int],
    topk: int = 10,
) -> list[RankedQuery]:
    """Top-k of each chosen query. distances: (len(query_indices), G), row i for query query_indices[i].

    Gallery items of the query's identity *and* camera are left out (market protocol); tied distances are ordered
    as the evaluation counts them (`kdreid.evaluation.ranking.ranked_order`): against the query, a non-match
    before a tied match, else gallery order."""
    from kdreid.evaluation.ranking import ranked_order

    distances = torch.as_tensor(distances, dtype=torch.float32).cpu()
    if distances.shape != (len(query_indices), len(gallery_pids)):
        raise EvaluationError(f"distances are {tuple(distances.shape)} but there are {len(query_indices)} chosen "
                              f"queries and {len(gallery_pids)} gallery images")
    gallery_pids_t, gallery_camids_t = torch.as_tensor(gallery_pids), torch.as_tensor(gallery_camids)
    ranked = []
    for row, query_index in enumerate(query_indices):
        pid, camid = int(query_pids[query_index]), int(query_camids[query_index])
        keep = ~((gallery_pids_t == pid) & (gallery_camids_t == camid))  # (G,)
        candidates = torch.nonzero(keep).flatten()
        chosen = candidates[ranked_order(distances[row, candidates], gallery_pids_t[candidates] == pid)[:topk]]
        ranked.append(RankedQuery(
            query_index=int(query_index),
            gallery_indices=chosen.tolist(),
            distances=distances[row, chosen].tolist(),
            correct=(gallery_pids_t[chosen] == pid).tolist(),
        ))
    return ranked


def _framed(path: str, rgb: tuple[int, int, int]) -> np.ndarray:
    """The image as a thumbnail inside a BORDER-pixel frame of colour `rgb` -> (H + 2B, W + 2B, 3) uint8."""
    from kdreid.data.cache import read_image

    height, width = THUMBNAIL_SIZE
    image = read_image(path, height, width)
    framed = np.empty((height + 2 * BORDER, width + 2 * BORDER, 3), dtype=np.uint8)
    framed[:] = rgb
    framed[BORDER:-BORDER, BORDER:-BORDER] = image
    return framed


def draw_ranked_results(
    ranked: Sequence[RankedQuery],
    query_paths: Sequence[str],
    gallery_paths: Sequence[str],
    query_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_camids: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """One PNG with a row per ranked query: the query (grey frame), then its gallery images nearest first."""
    if not ranked:
        raise EvaluationError("no query to draw")
    columns = 1 + max(len(r.gallery_indices) for r in ranked)
    rows = len(ranked)
    cell_width, cell_height = 1.05, 2.55  # inches: a 2:1 thumbnail plus two lines of text
    top_space = 0.3 + (0.35 if title else 0.0)  # inches above the first row: its "#k" titles, the suptitle
    figure_height = cell_height * rows + top_space
    figure = new_figure(cell_width * columns + 0.3, figure_height)
    grid = figure.add_gridspec(rows, columns, left=0.01, right=0.99, bottom=0.35 / figure_height,
                               top=1 - top_space / figure_height, wspace=0.12, hspace=0.45)
    if title:
        fitted_suptitle(figure, title, fontsize=11, y=1 - 0.1 / figure_height, va="top")
    for row, item in enumerate(ranked):
        q = item.query_index
        axes = figure.add_subplot(grid[row, 0])
        _show(axes, _framed(query_paths[q], QUERY_RGB))
        axes.set_title("query", fontsize=9, fontweight="bold")
        axes.text(0.5, -0.04, f"id {query_pids[q]} cam {query_camids[q]}", transform=axes.transAxes,
                  ha="center", va="top", fontsize=7)
        for rank, (g, distance, correct) in enumerate(zip(item.gallery_indices, item.distances, item.correct), 1):
            axes = figure.add_subplot(grid[row, rank])
            _show(axes, _framed(gallery_paths[g], CORRECT_RGB if correct else WRONG_RGB))
            axes.set_title(f"#{rank}", fontsize=8)
            axes.text(0.5, -0.04, f"{distance:.3f}\nid {gallery_pids[g]} cam {gallery_camids[g]}",
                      transform=axes.transAxes, ha="center", va="top", fontsize=7)
    return save_png(figure, path)


def _show(axes, image: np.ndarray) -> None:
    # "nearest" keeps the frame's colour exact (no blending with the image at the edges of a resampled border).
    axes.imshow(image, interpolation="nearest")
    axes.set_axis_off()


def query_distances(query_features: torch.Tensor, gallery_features: torch.Tensor, query_indices: Sequence[int],
                    *, metric: str = "euclidean", rerank: bool = False) -> torch.Tensor:
    """(len(query_indices), G) distances of the chosen queries, the same the evaluation ranks by. Without
    re-ranking only the chosen rows are computed; k-reciprocal re-ranking depends on every query's
    neighbourhood, so it is computed over all queries, then the rows are taken."""
    from kdreid.evaluation.distance import compute_distance_matrix
    from kdreid.evaluation.rerank import re_ranking_features

    index = torch.as_tensor(list(query_indices), dtype=torch.long)
    if rerank:
        return torch.as_tensor(re_ranking_features(query_features, gallery_features, metric=metric))[index]
    return compute_distance_matrix(query_features[index], gallery_features, metric=metric)


def visualize_ranked_results(
    query,
    gallery,
    out_dir: str | Path,
    *,
    prefix: str = "visrank",
    num_queries: int = 8,
    topk: int = 10,
    metric: str = "euclidean",
    rerank: bool = False,
    title: str = "",
) -> list[Path]:
    """Ranked-results pictures of `num_queries` queries (chosen by `choose_queries`) for query and gallery
    `Features` (kdreid.evaluation.features), written as OUT_DIR/<prefix>_01.png, _02.png, ... with
    QUERIES_PER_PAGE queries per page; that prefix's pages from an earlier call are removed first, so the folder
    never shows an older ranking beside this one. -> the written paths."""
    if topk < 1:
        raise EvaluationError(f"--visrank-topk must be at least 1, got {topk}")
    remove_pages(out_dir, prefix)
    chosen = choose_queries(len(query), num_queries)
    if not chosen or len(gallery) == 0:
        return []
    distances = query_distances(query.features, gallery.features, chosen, metric=metric, rerank=rerank)
    ranked = rank_queries(distances, query.pids, gallery.pids, query.camids, gallery.camids, chosen, topk)
    pages = []
    for start in range(0, len(ranked), QUERIES_PER_PAGE):
        page = len(pages) + 1
        heading = title and f"{title} ({page}/{-(-len(ranked) // QUERIES_PER_PAGE)})"
        pages.append(draw_ranked_results(
            ranked[start:start + QUERIES_PER_PAGE], query.paths, gallery.paths, query.pids, query.camids,
            gallery.pids, gallery.camids, Path(out_dir) / f"{prefix}_{page:02d}.png", title=heading,
        ))
    return pages
