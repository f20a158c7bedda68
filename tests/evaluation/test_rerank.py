"""k-reciprocal re-ranking: parity with torchreid's `re_ranking`, features vs matrices, chunking, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdreid.errors import EvaluationError
from kdreid.evaluation import rerank
from kdreid.evaluation.distance import compute_distance_matrix
from kdreid.evaluation.rerank import re_ranking, re_ranking_features
from tests.reference import load_torchreid_module


@pytest.fixture(scope="module")
def torchreid_rerank():
    return load_torchreid_module("torchreid/reid/utils/rerank.py")


def problem(seed, num_q, num_g, dim=16, clusters=0):
    rng = np.random.default_rng(seed)
    if clusters:  # identities: the neighbourhoods re-ranking works on are not all noise
        centres = rng.normal(size=(clusters, dim))
        qf = centres[rng.integers(0, clusters, num_q)] + 0.5 * rng.normal(size=(num_q, dim))
        gf = centres[rng.integers(0, clusters, num_g)] + 0.5 * rng.normal(size=(num_g, dim))
    else:
        qf, gf = rng.normal(size=(num_q, dim)), rng.normal(size=(num_g, dim))
    qf, gf = torch.from_numpy(qf.astype(np.float32)), torch.from_numpy(gf.astype(np.float32))
    q_g = compute_distance_matrix(qf, gf).numpy()
    # torchreid reads q_q / g_g by columns, we read rows: symmetrise so both see the same matrix exactly.
    q_q, g_g = (compute_distance_matrix(x, x).numpy() for x in (qf, gf))
    q_q, g_g = (q_q + q_q.T) / 2, (g_g + g_g.T) / 2
    return qf, gf, q_g, q_q, g_g


@pytest.mark.parametrize("seed, num_q, num_g, clusters", [(0, 20, 60, 0), (1, 35, 120, 8), (2, 8, 25, 0),
                                                          (3, 50, 150, 12)])
def test_default_parameters_equal_torchreid(torchreid_rerank, seed, num_q, num_g, clusters):
    _, _, q_g, q_q, g_g = problem(seed, num_q, num_g, clusters=clusters)
    expected = torchreid_rerank.re_ranking(q_g, q_q, g_g)
    ours = re_ranking(q_g, q_q, g_g)
    assert isinstance(ours, np.ndarray) and ours.shape == (num_q, num_g) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    assert np.abs(ours - q_g).max() > 0.1  # it did re-rank


@pytest.mark.parametrize("k1, k2, lambda_value", [(5, 3, 0.3), (7, 1, 0.5), (20, 6, 0.0), (20, 6, 1.0), (4, 5, 0.2),
                                                   (9, 2, 0.3)])
def test_other_parameters_equal_torchreid(torchreid_rerank, k1, k2, lambda_value):
    _, _, q_g, q_q, g_g = problem(4, 25, 70, clusters=6)
    expected = torchreid_rerank.re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    ours = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_features_and_torch_inputs_agree_with_matrices():
    qf, gf, q_g, q_q, g_g = problem(5, 30, 90, clusters=5)
    from_matrices = re_ranking(q_g, q_q, g_g)
    as_torch = re_ranking(*(torch.from_numpy(m) for m in (q_g, q_q, g_g)))
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), from_matrices)
    np.testing.assert_allclose(re_ranking_features(qf, gf).numpy(), from_matrices, atol=1e-5)
    cosine = re_ranking_features(qf, gf, metric="cosine").numpy()
    cos_matrices = re_ranking(*(compute_distance_matrix(a, b, metric="cosine").numpy()
                                for a, b in ((qf, gf), (qf, qf), (gf, gf))))
    np.testing.assert_allclose(cosine, cos_matrices, atol=1e-5)


def test_small_chunks_give_the_same_result(monkeypatch):
    qf, gf, q_g, q_q, g_g = problem(6, 40, 110, clusters=7)
    expected = re_ranking(q_g, q_q, g_g)
    monkeypatch.setattr(rerank, "_ROW_CHUNK_ELEMENTS", 7 * 150)  # 7 rows at a time
    monkeypatch.setattr(rerank, "_PAIR_CHUNK", 500)  # roughly one query at a time
    monkeypatch.setattr(rerank, "_ENCODE_CHUNK_COMPARISONS", 5 * 21 * 11 * 21)  # 5 rows at a time
    monkeypatch.setattr(rerank, "_PAIRS_PER_GATHER", 64)
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g), expected, atol=1e-6)
    np.testing.assert_allclose(re_ranking_features(qf, gf).numpy(), expected, atol=1e-5)


def test_bad_input_is_one_line():
    _, _, q_g, q_q, g_g = problem(7, 6, 20)
    with pytest.raises(EvaluationError, match=r"g_g_dist 20 x 20 .* got \(6, 6\) and \(19, 19\)"):
        re_ranking(q_g, q_q, g_g[:19, :19])
    bad = q_g.copy()
    bad[2, 3] = np.nan
    with pytest.raises(EvaluationError, match="NaN or negative"):
        re_ranking(bad, q_q, g_g)
    with pytest.raises(EvaluationError, match="NaN or negative"):
        re_ranking(-q_g, q_q, g_g)
    with pytest.raises(EvaluationError, match="k2 <= k1 \\+ 1"):
        re_ranking(q_g, q_q, g_g, k1=3, k2=6)
    # From features: the features are checked once, before the first block of distances (no longer by
    # compute_distance_matrix, block by block).
    qf, gf = torch.randn(7, 8), torch.randn(20, 8)
    gf[4, 1] = float("inf")
    with pytest.raises(EvaluationError, match="^re-ranking features hold NaN or inf"):
        re_ranking_features(qf, gf)
    with pytest.raises(EvaluationError, match="^unknown distance metric 'manhattan'; use one of euclidean, cosine$"):
        re_ranking_features(qf, gf[:3], metric="manhattan")
    # each bound said before any work (a lambda of 1.5 would blend with a negative weight on the Jaccard term)
    for k1, k2, lambda_value in ((0, 1, 0.3), (20, 6, 1.5), (20, 6, -0.1)):
        with pytest.raises(EvaluationError, match="re-ranking needs k1 >= 1, 1 <= k2 <= k1 \\+ 1 and 0 <= lambda <= 1"):
            re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lambda_value)


def test_features_with_far_cosine_neighbours_agree_with_matrices():
    """A small set and a large k1: the expanded sets reach images at cosine distance above 1 (up to 2), which the
    features path must read as the matrices hold them (a clamp at 1 there went unseen by the clustered problems)."""
    qf, gf, *_ = problem(8, 6, 18, dim=3)
    matrices = [compute_distance_matrix(a, b, metric="cosine").numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    matrices[1:] = [(m + m.T) / 2 for m in matrices[1:]]
    assert max(m.max() for m in matrices) > 1.5
    np.testing.assert_allclose(re_ranking_features(qf, gf, metric="cosine").numpy(), re_ranking(*matrices),
                               atol=1e-5)
