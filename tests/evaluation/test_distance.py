"""Distances against their direct definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdreid.errors import EvaluationError
from kdreid.evaluation.distance import compute_distance_matrix


def features(seed, n, dim=12):
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_euclidean_and_cosine_follow_their_definitions():
    query, gallery = features(0, 5), features(1, 9)
    q64, g64 = query.astype(np.float64), gallery.astype(np.float64)
    euclidean = compute_distance_matrix(query, gallery)
    direct = np.linalg.norm(q64[:, None] - g64[None], axis=2)
    assert euclidean.dtype == torch.float32 and euclidean.shape == (5, 9)
    np.testing.assert_allclose(euclidean.numpy(), direct, atol=1e-4)
    cosine = compute_distance_matrix(torch.from_numpy(query), torch.from_numpy(gallery), metric="cosine")
    similarity = (q64 @ g64.T) / np.linalg.norm(q64, axis=1)[:, None] / np.linalg.norm(g64, axis=1)[None]
    np.testing.assert_allclose(cosine.numpy(), 1 - similarity, atol=1e-6)


def test_normalized_euclidean_squared_is_twice_the_cosine_distance():
    query, gallery = features(2, 4), features(3, 6)
    euclidean = compute_distance_matrix(query, gallery, normalize=True)
    cosine = compute_distance_matrix(query, gallery, metric="cosine")
    np.testing.assert_allclose(euclidean.numpy() ** 2, 2 * cosine.numpy(), atol=1e-5)
    # Scaling a feature changes Euclidean distances but not normalised or cosine ones.
    scaled = compute_distance_matrix(query * 3, gallery, normalize=True)
    np.testing.assert_allclose(scaled.numpy(), euclidean.numpy(), atol=1e-6)
    assert not np.allclose(compute_distance_matrix(query * 3, gallery).numpy(),
                           compute_distance_matrix(query, gallery).numpy())


def test_self_distances_are_zero_and_never_negative():
    x = features(4, 30, dim=64) * 100  # large norms: the expanded formula cancels catastrophically
    for metric in ("euclidean", "cosine"):
        dist = compute_distance_matrix(x, x, metric=metric)
        assert float(dist.min()) >= 0.0
        # The one-matmul formula loses ~1e-3 of the distance scale to cancellation; self stays far nearest.
        assert float(dist.diagonal().max()) < 1e-3 * float(dist.mean())


def test_bad_features_are_one_line_errors():
    with pytest.raises(EvaluationError, match="12 dimensions but gallery features 5"):
        compute_distance_matrix(features(0, 3), features(1, 3, dim=5))
    bad = features(0, 3)
    bad[1, 2] = np.nan
    with pytest.raises(EvaluationError, match="query features hold NaN"):
        compute_distance_matrix(bad, features(1, 3))
    with pytest.raises(EvaluationError, match="unknown distance metric 'manhattan'"):
        compute_distance_matrix(features(0, 3), features(1, 3), metric="manhattan")
    with pytest.raises(EvaluationError, match="must be 2-D"):
        compute_distance_matrix(features(0, 3)[0], features(1, 3))
