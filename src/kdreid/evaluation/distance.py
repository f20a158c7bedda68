"""Query-gallery distances: Euclidean on embeddings, or cosine (1 - cosine similarity), optionally on L2-normalised
features. Smaller = more similar, the convention of `evaluate` and `re_ranking`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdreid.errors import EvaluationError

METRICS = ("euclidean", "cosine")


def compute_distance_matrix(query, gallery, metric: str = "euclidean", normalize: bool = False) -> torch.Tensor:
    """(Q, G) float32 distances between query (Q, D) and gallery (G, D) features (numpy, torch or `Features`).

    euclidean: ||q - g||, from ||q||^2 + ||g||^2 - 2 q.g (one matrix product), clamped at 0 against rounding. This
        is the true distance, not torchreid's squared one: rankings are identical, and `re_ranking` squares its
        input, which gives the paper's squared distance.
    cosine: 1 - q.g / (||q|| ||g||), clamped to [0, 2].
    normalize: L2-normalise features first (then euclidean^2 = 2 * cosine).
    """
    check_metric(metric)
    query, gallery = _as_features(query, "query"), _as_features(gallery, "gallery")
    if query.shape[1] != gallery.shape[1]:
        raise EvaluationError(f"query features have {query.shape[1]} dimensions but gallery features "
                              f"{gallery.shape[1]}; extract both with the same model")
    gallery = gallery.to(query.device)
    if normalize or metric == "cosine":
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    return distances_of_prepared(query, gallery, metric)


def distances_of_prepared(query: torch.Tensor, gallery: torch.Tensor, metric: str, query_squared=None,
                          gallery_squared=None) -> torch.Tensor:
    """(Q, G) distances of float32 features on one device, L2-normalised for cosine; the rows' squared norms
    (`squared_norms`) when already known, for euclidean: re-ranking computes a thousand blocks of rows against the
    same N features and computes their norms once."""
    # In place throughout: one (Q, G) matrix at a time (MSMT17's is 3.8 GB).
    if metric == "cosine":
        # Clamped: rounding puts identical vectors at -1e-7, and re-ranking squares distances (sign matters).
        return (query @ gallery.T).neg_().add_(1.0).clamp_(0.0, 2.0)
    query_squared = squared_norms(query) if query_squared is None else query_squared
    gallery_squared = squared_norms(gallery) if gallery_squared is None else gallery_squared
    squared = query_squared[:, None] + gallery_squared[None, :]  # (Q, G)
    squared.addmm_(query, gallery.T, beta=1.0, alpha=-2.0)
    return squared.clamp_(min=0.0).sqrt_()


def squared_norms(features: torch.Tensor) -> torch.Tensor:
    return features.pow(2).sum(1)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise EvaluationError(f"unknown distance metric {metric!r}; use one of {', '.join(METRICS)}")


def check_finite(features: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(features).all()):
        raise EvaluationError(f"{name} features hold NaN or inf; check the model and its checkpoint")


def _as_features(features, name: str) -> torch.Tensor:
    features = getattr(features, "features", features)  # a `Features` from extract_features
    tensor = torch.from_numpy(features) if isinstance(features, np.ndarray) else torch.as_tensor(features)
    if tensor.dim() != 2:
        raise EvaluationError(f"{name} features must be 2-D (N, D), got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().to(torch.float32)
    check_finite(tensor, name)
    return tensor
