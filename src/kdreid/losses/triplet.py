"""Hard-mining ("batch-hard") triplet loss (Hermans et al., "In Defense of the Triplet Loss", 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def euclidean_distances(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise Euclidean (not squared) distances. a (N, D), b (M, D) -> (N, M).

    Computed as sqrt(‖a‖² + ‖b‖² − 2ab) clamped at 1e-12 so that the gradient of the zero self-distances stays
    finite; float32 even under autocast, where the expansion loses too much precision in bf16."""
    with torch.autocast(a.device.type, enabled=False):  # the matmul would otherwise run in bf16
        a = a.float()
        b = a if b is None else b.float()
        squared = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.t()
        return squared.clamp_min(1e-12).sqrt()


def batch_hard_triplet(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, soft_margin: bool = False
) -> torch.Tensor:
    """For each anchor, the farthest same-label sample and the nearest other-label sample of the batch:
    mean over anchors of max(0, d_ap − d_an + margin), or log(1 + exp(d_ap − d_an)) with `soft_margin`.

    embeddings (N, D), labels (N,). Anchors without a positive (a singleton label) or without a negative are
    left out; a P×K batch with K ≥ 2 has neither."""
    dist = euclidean_distances(embeddings)  # (N, N)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive = same & ~eye
    negative = ~same
    hardest_positive = dist.masked_fill(~positive, float("-inf")).amax(1)
    hardest_negative = dist.masked_fill(~negative, float("inf")).amin(1)
    valid = positive.any(1) & negative.any(1)  # (N,)
    # A weighted mean over the valid anchors instead of boolean indexing: no host-device sync on CUDA, and a
    # batch without any valid anchor gives 0 with the graph kept (nothing to learn from it).
    gap = torch.where(valid, hardest_positive - hardest_negative, torch.zeros_like(hardest_positive))
    per_anchor = F.softplus(gap) if soft_margin else F.relu(gap + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp_min(1)
