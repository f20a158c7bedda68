"""A hand-crafted retrieval floor: colour histograms of the person's central strip, Hellinger distance.

Each image is converted to HSV; the central 40 % of its columns (where the person is, so the background weighs
little) is cut into 6 horizontal stripes, and each stripe gets an 8 (hue) x 4 (saturation) x 4 (value) histogram
normalised to sum 1. The distance between two images is the Hellinger distance between their stripe
distributions, `sqrt(1 - sum_i sqrt(p_i q_i))` with p, q the concatenated histograms / 6; features are stored as
`sqrt(p)`, so all distances are one matrix product. Ranking metrics are the market protocol of
`kdreid.evaluation.ranking`.

On the synthetic benchmark it is the sanity bar of the design study (§2.10): clearly above chance (the images
carry identity), clearly below a learned model under full camera style, and higher with the style gap turned
off. `expected_random_map` gives chance exactly (the mean AP of a uniformly random ranking).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from kdreid.data.cache import read_image
from kdreid.errors import EvaluationError
from kdreid.evaluation.ranking import evaluate_rank, evaluation_warnings_to

STRIPES = 6
HUE_BINS, SATURATION_BINS, VALUE_BINS = 8, 4, 4
BINS = HUE_BINS * SATURATION_BINS * VALUE_BINS  # 128 per stripe
CENTRAL_FRACTION = 0.4


def stripe_histograms(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (STRIPES * BINS,) float64: per-stripe HSV histograms, each summing to 1."""
    height, width = rgb.shape[:2]
    if height < STRIPES:
        raise ValueError(f"image height {height} is below the {STRIPES} stripes")
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"), dtype=np.int64)
    first = int(round(width * (1 - CENTRAL_FRACTION) / 2))
    last = max(first + 1, int(round(width * (1 + CENTRAL_FRACTION) / 2)))
    strip = hsv[:, first:last]  # (H, w, 3)
    bins = (strip[..., 0] * HUE_BINS // 256) * (SATURATION_BINS * VALUE_BINS) \
        + (strip[..., 1] * SATURATION_BINS // 256) * VALUE_BINS + strip[..., 2] * VALUE_BINS // 256
    stripe_of_row = np.arange(height) * STRIPES // height  # (H,) 6 equal stripes
    index = stripe_of_row[:, None] * BINS + bins
    counts = np.bincount(index.ravel(), minlength=STRIPES * BINS).astype(np.float64).reshape(STRIPES, BINS)
    return (counts / counts.sum(axis=1, keepdims=True)).ravel()


def histogram_features(paths: Sequence[str]) -> np.ndarray:
    """(N, STRIPES * BINS) float32 square roots of the stripe distributions (unit L2 norm), one image at a time."""
    features = np.empty((len(paths), STRIPES * BINS), dtype=np.float32)
    for i, path in enumerate(paths):
        features[i] = np.sqrt(stripe_histograms(read_image(path)) / STRIPES)
    return features


def hellinger_distances(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, D), (G, D) square-root features -> (Q, G) Hellinger distances in [0, 1]."""
    affinity = query.astype(np.float64) @ gallery.astype(np.float64).T  # Bhattacharyya coefficients
    return np.sqrt(np.clip(1.0 - affinity, 0.0, None))


def expected_random_map(q_pids, g_pids, q_camids, g_camids) -> float:
    """Mean AP of a uniformly random ranking under the market protocol (chance), as a fraction.

    For a query with M kept gallery items of which R match, the expected AP of a random order is
    (1/M) [ (R-1)/(M-1) (M - H_M) + H_M ] with H_M the M-th harmonic number (Bestgen 2015); queries without a
    cross-camera match are skipped, as in the ranking."""
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    values = []
    for pid, camid in zip(q_pids, q_camids):
        same_pid = g_pids == pid
        dropped = same_pid & (g_camids == camid)
        kept = len(g_pids) - int(dropped.sum())
        matches = int((same_pid & ~dropped).sum())
        if matches == 0:
            continue
        if kept == 1:
            values.append(1.0)
            continue
        harmonic = float(np.sum(1.0 / np.arange(1, kept + 1)))
        values.append(((matches - 1) / (kept - 1) * (kept - harmonic) + harmonic) / kept)
    if not values:
        raise EvaluationError("no query has a gallery match from another camera; chance is undefined")
    return float(np.mean(values))


@dataclass
class BaselineResult:
    """Percentages, as the results tables show them."""

    dataset: str
    mAP: float
    rank1: float
    rank5: float
    rank10: float
    rank20: float
    chance_mAP: float
    num_query: int
    num_gallery: int

    def line(self) -> str:
        return (f"{self.dataset}: colour-histogram baseline mAP {self.mAP:.1f} %, rank-1 {self.rank1:.1f} %, "
                f"rank-5 {self.rank5:.1f} %, rank-10 {self.rank10:.1f} %, rank-20 {self.rank20:.1f} % "
                f"(chance mAP {self.chance_mAP:.2f} %; {self.num_query} queries, {self.num_gallery} gallery images)")


def color_histogram_baseline(dataset, use_metric_cuhk03: bool = False) -> BaselineResult:
    """Run the baseline on a parsed dataset (`kdreid.data.datasets.base.ReidDataset`): query against gallery, its
    CMC single-gallery-shot under CUHK03's classic protocol (`use_metric_cuhk03`, as torchreid)."""
    if not dataset.query or not dataset.gallery:
        raise EvaluationError(f"{dataset.name} has an empty query or gallery split; nothing to evaluate")
    query_features = histogram_features([r.path for r in dataset.query])
    gallery_features = histogram_features([r.path for r in dataset.gallery])
    q_pids = np.array([r.pid for r in dataset.query])
    g_pids = np.array([r.pid for r in dataset.gallery])
    q_camids = np.array([r.camid for r in dataset.query])
    g_camids = np.array([r.camid for r in dataset.gallery])
    distances = hellinger_distances(query_features, gallery_features)
    cmc, mean_ap = evaluate_rank(distances, q_pids, g_pids, q_camids, g_camids, max_rank=50,
                                 use_metric_cuhk03=use_metric_cuhk03)
    rank = lambda r: 100.0 * float(cmc[min(r, len(cmc)) - 1])  # noqa: E731
    return BaselineResult(
        dataset=dataset.name, mAP=100.0 * float(mean_ap), rank1=rank(1), rank5=rank(5), rank10=rank(10),
        rank20=rank(20),
        chance_mAP=100.0 * expected_random_map(q_pids, g_pids, q_camids, g_camids),
        num_query=len(q_pids), num_gallery=len(g_pids),
    )


def baseline_command(args) -> int:
    """`kdreid data baseline --root R -d NAME [--json] [CUHK03 flags]`."""
    import json
    from dataclasses import asdict

    from kdreid.data.check import dataset_from_args

    dataset = dataset_from_args(args)
    with evaluation_warnings_to(lambda message: print(f"kdreid: warning: {dataset.name}: {message}", file=sys.stderr)):
        result = color_histogram_baseline(dataset, use_metric_cuhk03=args.cuhk03_classic_split)
    print(json.dumps(asdict(result), indent=2) if args.json else result.line())
    return 0
