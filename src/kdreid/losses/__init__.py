"""Losses: pure functions of tensors (no devices, no state)."""

from kdreid.losses.classification import cross_entropy_label_smoothing
from kdreid.losses.mmd import DEFAULT_SIGMAS, dmmd_terms, gaussian_kernel, mmd, within_between
from kdreid.losses.triplet import batch_hard_triplet, euclidean_distances

__all__ = [
    "DEFAULT_SIGMAS",
    "batch_hard_triplet",
    "cross_entropy_label_smoothing",
    "dmmd_terms",
    "euclidean_distances",
    "gaussian_kernel",
    "mmd",
    "within_between",
]
