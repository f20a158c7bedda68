"""The verification view of an evaluation: are two images the same person, judged by their distance alone?

Query-gallery pairs form two populations: *positives*, one identity seen by two cameras (the pairs the market
protocol counts as true matches), and *negatives*, two identities (the gallery's distractors included).
Same-identity pairs from one camera are left out, as the ranking leaves them out. From the two histograms come
the ROC curve (true-positive rate against false-positive rate as the distance threshold grows), its area, and
for a few false-positive rates the true-positive rate and the threshold that gives it: what a deployment needs
to choose a cut-off for `kdreid search --max-distance`. (fast-reid reports TPR@FPR; its users asked for the
pos/neg distance plots that `kdreid evaluate --verification` draws.)

The histograms have BINS equal bins over the distances' range and are filled one chunk of queries at a time,
so an MSMT17-size matrix (~10^9 pairs) needs no copy of its pairs. A threshold is a bin edge: it is exact to
1/BINS of the range, and the false-positive rate it gives never exceeds the one asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kdreid.errors import EvaluationError
from kdreid.evaluation.ranking import _as_float_tensor, _as_int_array

BINS = 16384
FPR_LEVELS = (1e-4, 1e-3, 1e-2, 1e-1)
_CHUNK_ELEMENTS = 1 << 22  # ~4M distances per chunk: a few tens of MB of masks and indices on the CPU


@dataclass
class VerificationResult:
    """Counts of positive and negative pairs per distance bin. Bin b holds distances in [edges[b], edges[b+1])
    (the largest distance in the last bin)."""

    edges: np.ndarray  # (BINS + 1,) float64, ascending
    positives: np.ndarray  # (BINS,) int64
    negatives: np.ndarray  # (BINS,) int64

    @property
    def num_positive(self) -> int:
        return int(self.positives.sum())

    @property
    def num_negative(self) -> int:
        return int(self.negatives.sum())

    def roc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, threshold), one point per bin edge from the first: the fractions of negative and positive
        pairs closer than the threshold. NaN rates where a population is empty."""
        def rates(counts: np.ndarray) -> np.ndarray:
            total = counts.sum()
            cumulative = np.concatenate([[0], np.cumsum(counts)]).astype(np.float64)
            return cumulative / total if total else np.full(len(cumulative), np.nan)

        return rates(self.negatives), rates(self.positives), self.edges

    def at_fpr(self, fpr: float) -> tuple[float, float]:
        """(tpr, threshold) at the largest threshold whose false-positive rate is at most `fpr`."""
        false_rate, true_rate, thresholds = self.roc()
        if np.isnan(false_rate[0]) or np.isnan(true_rate[0]):
            return float("nan"), float("nan")
        index = int(np.searchsorted(false_rate, fpr, side="right")) - 1  # false_rate[0] = 0 <= fpr: index >= 0
        return float(true_rate[index]), float(thresholds[index])

    def auc(self) -> float:
        """Area under the ROC curve (trapezoids: pairs that share a bin count as ties, half right)."""
        false_rate, true_rate, _ = self.roc()
        return float(np.sum(np.diff(false_rate) * (true_rate[1:] + true_rate[:-1]) / 2))

    def summary(self) -> dict:
        """Plain values for metrics.json: pair counts, the AUC and, per FPR level, TPR (percent) and threshold."""
        def plain(value: float, digits: int | None = 6) -> float | None:  # JSON has no NaN
            return None if value != value else value if digits is None else round(value, digits)

        levels = []
        for fpr in FPR_LEVELS:
            tpr, threshold = self.at_fpr(fpr)
            # the threshold in full: rounded up, it could let through more than `fpr` of the negative pairs
            levels.append({"fpr": fpr, "tpr": plain(100.0 * tpr), "threshold": plain(threshold, None)})
        return {"positive_pairs": self.num_positive, "negative_pairs": self.num_negative,
                "auc": plain(self.auc(), None), "at_fpr": levels}  # whole: printed to 4 digits, as on the picture


def threshold_text(threshold: float, digits: int = 4) -> str:
    """A threshold for people to copy, to `digits` significant digits rounded *down*: a cut-off rounded up could let
    more false positives through than the rate it was measured for."""
    if threshold != threshold or threshold <= 0:
        return f"{threshold:g}"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(threshold)))
    return f"{math.floor(threshold * scale) / scale:.{digits}g}"


def verification_statistics(distmat, q_pids, g_pids, q_camids, g_camids, *, bins: int = BINS) -> VerificationResult:
    """Histograms of the positive and negative pairs of a (Q, G) distance matrix (numpy or torch, smaller = more
    similar) over `bins` equal bins between its smallest and largest value."""
    distmat = _as_float_tensor(distmat)
    q_pids, g_pids, q_camids, g_camids = (torch.from_numpy(_as_int_array(a, name)).to(distmat.device) for a, name in (
        (q_pids, "q_pids"), (g_pids, "g_pids"), (q_camids, "q_camids"), (g_camids, "g_camids")))
    num_q, num_g = distmat.shape
    if (len(q_pids), len(q_camids), len(g_pids), len(g_camids)) != (num_q, num_q, num_g, num_g):
        raise EvaluationError(f"the distance matrix is {num_q} x {num_g}: pass one pid and one camid per query row "
                              "and per gallery column")
    if num_q == 0 or num_g == 0:
        raise EvaluationError("an empty query or gallery set has no pairs to count")
    low, high = float(distmat.min()), float(distmat.max())  # NaN when any distance is (no full-size mask needed)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise EvaluationError("the distance matrix holds NaN or inf; check the features")
    width = (high - low) or 1.0  # all distances equal: one bin holds them all
    edges = low + width * np.arange(bins + 1, dtype=np.float64) / bins
    positives = torch.zeros(bins, dtype=torch.int64, device=distmat.device)
    negatives = torch.zeros(bins, dtype=torch.int64, device=distmat.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // num_g)
    for start in range(0, num_q, rows_per_chunk):
        stop = min(start + rows_per_chunk, num_q)
        rows = distmat[start:stop].to(torch.float64)
        index = ((rows - low) * (bins / width)).long().clamp_(0, bins - 1)
        same_identity = q_pids[start:stop, None] == g_pids[None, :]
        same_camera = q_camids[start:stop, None] == g_camids[None, :]
        positives += torch.bincount(index[same_identity & ~same_camera], minlength=bins)
        negatives += torch.bincount(index[~same_identity], minlength=bins)
    return VerificationResult(edges, positives.cpu().numpy(), negatives.cpu().numpy())
