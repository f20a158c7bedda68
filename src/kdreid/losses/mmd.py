"""Maximum mean discrepancy with a multi-bandwidth Gaussian kernel, and D-MMD (Mekhazni et al., ECCV 2020).

D-MMD aligns, between source and target, the distributions of *scalar* pairwise distances: the within-class
distances (two images of the same identity or tracklet) and the between-class ones, plus the embeddings
themselves. This module follows the paper's definition:

- distances are Euclidean (not squared) between embeddings;
- each unordered pair of different images is one sample (self-distances excluded, every pair once);
- classes come from the batch's group labels (identity, tracklet or pseudo-label), not from positions.

The original code differed (rows of K squared distances as samples, self-distances included, 50 of the 56 group
pairs of a P=8 batch); see docs/algorithms.md. Its kernel is kept as the default: a *sum* of 19 Gaussians
exp(−‖a − b‖² / (2σ)) with σ (a variance) from 1e-6 to 1e6. On scalar Euclidean distances of BNNeck-scale
embeddings (tens of units apart) the bandwidths σ ≈ 1…1e3 carry the signal; the tiny ones contribute only on
the diagonal of K(X, X), a constant.
"""

from __future__ import annotations

import torch

from kdreid.losses.triplet import euclidean_distances

# The original code's bandwidths (variances), kept as the default kernel.
DEFAULT_SIGMAS: tuple[float, ...] = (
    1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0, 1e3, 1e4, 1e5, 1e6,
)


def gaussian_kernel(x: torch.Tensor, y: torch.Tensor, sigmas=DEFAULT_SIGMAS) -> torch.Tensor:
    """Σ_σ exp(−‖x_i − y_j‖² / (2σ)). x (N,) or (N, D), y (M,) or (M, D) -> (N, M), in float32 even under
    autocast (bf16 would lose the small differences the narrow bandwidths see)."""
    with torch.autocast(x.device.type, enabled=False):
        return _gaussian_kernel(x, y, sigmas)


def _gaussian_kernel(x: torch.Tensor, y: torch.Tensor, sigmas) -> torch.Tensor:
    x = x.float().reshape(len(x), -1)
    y = y.float().reshape(len(y), -1)
    if x.shape[1] == 1:  # scalar samples (distances): the exact difference, cheap at (N, M)
        squared = (x - y.t()).pow(2)
    else:  # wide embeddings: the expansion avoids an (N, M, D) tensor
        squared = (x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.t()).clamp_min(0.0)
    scales = 1.0 / (2.0 * torch.tensor(sigmas, dtype=squared.dtype, device=squared.device))  # (S,)
    return torch.exp(-squared[..., None] * scales).sum(-1)


def mmd(x: torch.Tensor, y: torch.Tensor, sigmas=DEFAULT_SIGMAS) -> torch.Tensor:
    """Biased (V-statistic) squared MMD: mean K(x, x) + mean K(y, y) − 2 mean K(x, y).
    x (N,) or (N, D) and y (M,) or (M, D): samples of two distributions. Scalar tensor."""
    if len(x) == 0 or len(y) == 0:
        raise ValueError("MMD needs at least one sample on each side")
    return (
        gaussian_kernel(x, x, sigmas).mean()
        + gaussian_kernel(y, y, sigmas).mean()
        - 2.0 * gaussian_kernel(x, y, sigmas).mean()
    )


def within_between(dist: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a pairwise distance matrix into its within-class and between-class scalar distances.
    dist (N, N), groups (N,) -> (within (n_w,), between (n_b,)); each unordered pair once, no self-pairs."""
    same = groups[:, None] == groups[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    return dist[same & upper], dist[~same & upper]


def dmmd_terms(
    source_embeddings: torch.Tensor,
    source_groups: torch.Tensor,
    target_embeddings: torch.Tensor,
    target_groups: torch.Tensor,
    sigmas=DEFAULT_SIGMAS,
) -> dict[str, torch.Tensor]:
    """The three D-MMD terms: MMD of within-class distances, of between-class distances, and of the
    embeddings. The source distance samples are detached, so only the target's distance distributions move
    towards the source's; the embedding term keeps gradients on both sides, as the original code did."""
    source_within, source_between = within_between(euclidean_distances(source_embeddings), source_groups)
    target_within, target_between = within_between(euclidean_distances(target_embeddings), target_groups)
    return {
        "mmd_within": mmd(source_within.detach(), target_within, sigmas),
        "mmd_between": mmd(source_between.detach(), target_between, sigmas),
        "mmd_features": mmd(source_embeddings, target_embeddings, sigmas),
    }
