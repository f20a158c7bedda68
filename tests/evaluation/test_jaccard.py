"""The single-set k-reciprocal Jaccard distance against a direct, dense transcription of its definition."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from kdreid.errors import EvaluationError
from kdreid.evaluation.rerank import jaccard_distance


def _dense_jaccard(features, k1, k2):
    d = cdist(features, features) ** 2
    d = d / d.max(axis=1, keepdims=True)
    n = len(d)
    rank = np.argsort(d, axis=1)
    half = int(np.around(k1 / 2.0))

    def reciprocal(i, k):
        forward = rank[i, : k + 1]
        backward = rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    v = np.zeros((n, n))
    for i in range(n):
        members = reciprocal(i, k1)
        expansion = members
        for c in members:
            candidate = reciprocal(c, half)
            if len(np.intersect1d(candidate, members)) > 2.0 / 3 * len(candidate):
                expansion = np.append(expansion, candidate)
        expansion = np.unique(expansion)
        weight = np.exp(-d[i, expansion])
        v[i, expansion] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    jaccard = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            jaccard[i, j] = 1 - np.minimum(v[i], v[j]).sum() / np.maximum(v[i], v[j]).sum()
    return jaccard


@pytest.mark.parametrize("k1, k2", [(6, 3), (10, 1), (4, 2)])
def test_jaccard_matches_the_dense_definition(k1, k2):
    rng = np.random.default_rng(k1)
    centres = rng.normal(size=(5, 8)) * 3
    features = np.concatenate([c + rng.normal(size=(7, 8)) for c in centres]).astype(np.float32)
    ours = jaccard_distance(torch.from_numpy(features), k1=k1, k2=k2).numpy()
    assert ours.shape == (35, 35)
    np.testing.assert_allclose(ours, _dense_jaccard(features.astype(np.float64), k1, k2), atol=1e-5)
    assert np.allclose(np.diag(ours), 0, atol=1e-6)


def test_jaccard_needs_two_images():
    with pytest.raises(EvaluationError, match="at least two images"):
        jaccard_distance(torch.zeros(1, 4))


def test_jaccard_skips_the_original_distance_pass_its_blend_weighs_0(monkeypatch):
    # The clustering distance is the Jaccard term alone (lambda 0): the query-gallery distances of re-ranking's
    # blend were computed and multiplied by 0, about a fifth of its time (5,000 x 2048-d on 2 CPU cores).
    from kdreid.evaluation import rerank

    def refuse(self, start, stop):
        raise AssertionError("jaccard_distance computed the original distances it weighs 0")

    monkeypatch.setattr(rerank._StackedFeatures, "query_gallery", refuse)
    features = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    assert jaccard_distance(features, k1=6, k2=3).shape == (20, 20)
