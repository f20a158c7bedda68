"""Alpha query expansion (αQE; Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018), the test-time option fast-reid calls TEST.AQE (its defaults: k = 5, α = 3, one round).

Every query *and* gallery feature is replaced by the sum of its k nearest features (by cosine similarity, itself
included) among all query and gallery features, each weighted by its similarity to the power α (similarities
below 0 count as 0), then L2-normalised. The gallery side is database-side augmentation; like k-reciprocal
re-ranking it uses the other queries, so a score measured with it is transductive and says so where it is shown.

    query, gallery = alpha_query_expansion(query_features, gallery_features, k=5, alpha=3.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdreid.errors import EvaluationError

AQE_K = 5
AQE_ALPHA = 3.0
# Similarity rows computed at once: rows x (queries + gallery) floats, 64 M = 256 MB, whatever the set's size.
_ROW_BUDGET = 1 << 26


def check_aqe(k: int, alpha: float) -> None:
    # alpha = inf would raise a self-similarity of 0.99999994 to 0: zero or NaN features.
    if k < 1 or not 0 <= alpha < math.inf:
        raise EvaluationError(f"--aqe-k {k} --aqe-alpha {alpha}: k must be at least 1 and alpha a finite 0 or more")


@torch.no_grad()
def alpha_query_expansion(query: torch.Tensor, gallery: torch.Tensor, *, k: int = AQE_K, alpha: float = AQE_ALPHA,
                          rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(expanded query (Q, D), expanded gallery (G, D)), L2-normalised float32 on the features' device. The
    similarity matrix is never whole: `rows_per_chunk` rows at a time (default: what fits 256 MB)."""
    check_aqe(k, alpha)
    features = F.normalize(torch.cat([query, gallery]).float(), dim=1)  # (N, D)
    count = len(features)
    k = min(k, count)
    rows = rows_per_chunk or max(1, _ROW_BUDGET // max(count, 1))
    expanded = torch.empty_like(features)
    for start in range(0, count, rows):
        block = features[start:start + rows]
        similarity, neighbours = (block @ features.T).topk(k, dim=1)  # (c, k), itself first (cosine 1)
        weights = similarity.clamp_min(0).pow(alpha)
        expanded[start:start + rows] = torch.einsum("ck,ckd->cd", weights, features[neighbours])
    expanded = F.normalize(expanded, dim=1)
    return expanded[:len(query)], expanded[len(query):]
