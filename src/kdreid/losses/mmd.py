"""Maximum mean discrepancy with a multi-bandwidth Gaussian kernel, and D-MMD (Mekhazni et al., ECCV 2020).

D-MMD aligns, between source and target, the distributions of *scalar* pairwise distances: the within-class
distances (two images of the same identity or tracklet) and the between-class ones, plus the embeddings
themselves. This module follows the paper's definition:

- distances are Euclidean (not squared) between embeddings;
- each unordered pair of rows is one sample (self-distances excluded, every pair once; two copies of one image,
  which the P×K sampler draws for a group smaller than K, are a pair unless the rows' images are given);
- classes come from the batch's group labels (identity, tracklet or pseudo-label), not from positions.

The original code differed (rows of K squared distances as samples, self-distances included, 50 of the 56 group
pairs of a P=8 batch); see docs/algorithms.md. Its kernel is kept as the default: a *sum* of 19 Gaussians
exp(−‖a − b‖² / (2σ)) with σ (a variance) from 1e-6 to 1e6. Which bandwidths carry the signal depends on the
embeddings' scale (docs/algorithms.md gives measured values); the tiny ones contribute only on the diagonal of
K(X, X), a constant.
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
    same = x is y
    x = x.float().reshape(len(x), -1)
    y = x if same else y.float().reshape(len(y), -1)
    if x.shape[1] == 1:  # scalar samples (distances): the exact difference, cheap at (N, M)
        squared = (x - y.t()).pow(2)
    else:
        # Wide embeddings: the differences themselves, summed without an (N, M, D) tensor. Not the expansion
        # |x|² + |y|² - 2x·y: in float32 it leaves rounding of ~1e-4 between two equal samples (2048-d features of
        # norm ~45) — each sample and itself, and also two copies of one image or a collapsed embedding — which
        # the narrow bandwidths (1/(2σ) up to 5e5) turn into a kernel value anywhere between ~16 and 19 instead
        # of 19. cdist's gradient at a zero distance is 0, as the exact one.
        squared = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    return torch.exp(-squared[..., None] * _inverse_widths(tuple(sigmas), squared.device)).sum(-1)


_WIDTHS: dict = {}


def _inverse_widths(sigmas: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """1 / (2σ) as a float32 tensor on `device`, made once: a host-to-device copy per call would stall the GPU's
    queue every step (and cannot be captured in a CUDA graph)."""
    key = (sigmas, device)
    if key not in _WIDTHS:
        # Made outside inference mode even when the first call is inside it: an inference tensor could not be
        # saved for the backward pass of every later training step.
        with torch.inference_mode(False):
            _WIDTHS[key] = 1.0 / (2.0 * torch.tensor(sigmas, dtype=torch.float32, device=device))
    return _WIDTHS[key]


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


def weighted_mmd(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor, w_x: torch.Tensor,
                 w_y: torch.Tensor) -> torch.Tensor:
    """The biased MMD between the samples of x with weight w_x > 0 and those of y with w_y > 0 (0/1 weights: the
    MMD of those subsets, as `mmd` computes it), from the kernel matrices of all samples. Fixed shapes whatever
    the subsets: no host-device synchronisation. k_xx (N, N), k_yy (M, M), k_xy (N, M), w_x (N,), w_y (M,).
    A side with no sample (all weights 0) leaves the MMD undefined: the term is then 0, with no gradient.
    float32 even under autocast: in bf16 the products (sums of up to 19 per entry) round the MMD to steps of ~0.1."""
    with torch.autocast(k_xx.device.type, enabled=False):
        k_xx, k_yy, k_xy, w_x, w_y = (t.float() for t in (k_xx, k_yy, k_xy, w_x, w_y))
        present = ((w_x.sum() > 0) & (w_y.sum() > 0)).float()  # a tensor, not a branch: no host sync
        w_x = w_x / w_x.sum().clamp_min(1e-12)
        w_y = w_y / w_y.sum().clamp_min(1e-12)
        return present * (w_x @ k_xx @ w_x + w_y @ k_yy @ w_y - 2.0 * (w_x @ k_xy @ w_y))


def within_between(
    dist: torch.Tensor, groups: torch.Tensor, images: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a pairwise distance matrix into its within-class and between-class scalar distances.
    dist (N, N), groups (N,) -> (within (n_w,), between (n_b,)); each unordered pair once, no self-pairs, and
    with `images` (N,) no pair of two copies of one image (see `dmmd_terms`)."""
    pairs, within, between = _pairs(dist, groups, images)
    return pairs[within > 0], pairs[between > 0]


def dmmd_terms(
    source_embeddings: torch.Tensor,
    source_groups: torch.Tensor,
    target_embeddings: torch.Tensor,
    target_groups: torch.Tensor,
    sigmas=DEFAULT_SIGMAS,
    normalize: bool = False,
    *,
    source_images: torch.Tensor | None = None,
    target_images: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The three D-MMD terms: MMD of within-class distances, of between-class distances, and of the
    embeddings. `normalize` L2-normalises the embeddings first: the kernel's bandwidths are fixed, so on raw
    embeddings the terms also change with the embedding's overall scale, which training can then move instead
    of the distributions' shape (docs/algorithms.md shows it happening). The source distance samples are
    detached, so only the target's distance distributions move towards the source's; the embedding term keeps
    gradients on both sides, as the original code did.

    Every unordered pair of different images is a sample; the within/between split is a 0/1 weight on the pairs
    (`weighted_mmd`), equal to `mmd` on the subsets that `within_between` selects but without their
    data-dependent sizes, so a training step never waits for the GPU to count them.

    `source_images` / `target_images` (N,) say which image each row is (its index in the dataset): given, two
    copies of one image (a group with fewer than K images repeats some in its P×K chunk) are no within-class pair.
    None: every row counts as its own image, as the original code counted them (`adapt --dmmd-copies`)."""
    if normalize:
        source_embeddings = torch.nn.functional.normalize(source_embeddings, dim=1)
        target_embeddings = torch.nn.functional.normalize(target_embeddings, dim=1)
    source_pairs, source_within, source_between = _pairs(euclidean_distances(source_embeddings), source_groups,
                                                         source_images)
    target_pairs, target_within, target_between = _pairs(euclidean_distances(target_embeddings), target_groups,
                                                         target_images)
    source_pairs = source_pairs.detach()
    with torch.autocast(source_pairs.device.type, enabled=False):
        k_ss = _gaussian_kernel(source_pairs, source_pairs, sigmas)
        k_tt = _gaussian_kernel(target_pairs, target_pairs, sigmas)
        k_st = _gaussian_kernel(source_pairs, target_pairs, sigmas)
    return {
        "mmd_within": weighted_mmd(k_ss, k_tt, k_st, source_within, target_within),
        "mmd_between": weighted_mmd(k_ss, k_tt, k_st, source_between, target_between),
        "mmd_features": mmd(source_embeddings, target_embeddings, sigmas),
    }


def _pairs(
    dist: torch.Tensor, groups: torch.Tensor, images: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every unordered pair of rows, in row order: its distance (P,), and as float 0/1 weights (P,) whether it is a
    within-class pair (same group, different images) and whether a between-class one (different groups); P =
    N(N-1)/2 whatever the groups (no data-dependent shape). dist (N, N), groups (N,), images (N,) or None."""
    first, second = torch.triu_indices(len(dist), len(dist), offset=1, device=dist.device)
    same_group = groups[first] == groups[second]
    within = same_group if images is None else same_group & (images[first] != images[second])
    return dist[first, second], within.float(), (~same_group).float()
