"""Ranking metrics: parity with torchreid's evaluator, direct definitions of mINP, ties and the cuhk03 protocol."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kdreid.errors import EvaluationError
from kdreid.evaluation import ranking
from kdreid.evaluation.ranking import EvaluationWarning, evaluate, evaluate_rank
from tests.reference import load_torchreid_module


@pytest.fixture(scope="module")
def torchreid_rank():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Cython evaluation is unavailable"
        return load_torchreid_module("torchreid/reid/metrics/rank.py")


def random_problem(seed, num_q, num_g, num_ids, num_cams, distractors=0):
    """Random distances (float32, no ties) and labels; `distractors` gallery columns get pid 0."""
    rng = np.random.default_rng(seed)
    # Distinct values in each row (random float32 can tie; with ties torchreid's order is arbitrary).
    distmat = rng.permuted(np.broadcast_to(np.arange(num_g, dtype=np.float32), (num_q, num_g)), axis=1) / num_g
    q_pids = rng.integers(1, num_ids + 1, num_q)
    g_pids = rng.integers(1, num_ids + 1, num_g)
    g_pids[:distractors] = 0
    q_camids = rng.integers(0, num_cams, num_q)
    g_camids = rng.integers(0, num_cams, num_g)
    return distmat, q_pids, g_pids, q_camids, g_camids


def structured_problem(seed, num_ids=30, per_id_q=2, per_id_g=5, dim=16, noise=0.6, distractors=20):
    """Euclidean distances of clustered features: a good model, matches mostly near the top; some query
    identities are missing from the gallery and pid 0 distractors are scattered around."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids + 1, dim))
    q_pids = np.repeat(np.arange(1, num_ids + 1), per_id_q)
    g_pids = np.concatenate([np.repeat(np.arange(1, num_ids - 2), per_id_g), np.zeros(distractors, int)])
    q_feat = centres[q_pids] + noise * rng.normal(size=(len(q_pids), dim))
    g_feat = centres[g_pids] + noise * rng.normal(size=(len(g_pids), dim))
    g_feat[g_pids == 0] = rng.normal(size=(distractors, dim))
    distmat = np.linalg.norm(q_feat[:, None] - g_feat[None], axis=2).astype(np.float32)
    q_camids = rng.integers(0, 4, len(q_pids))
    g_camids = rng.integers(0, 4, len(g_pids))
    return distmat, q_pids, g_pids, q_camids, g_camids


def direct_ranks(distmat, q_pids, g_pids, q_camids, g_camids):
    """Per valid query, the 1-based ranks of its matches among kept items; ties ranked against the query."""
    out = []
    for q in range(len(q_pids)):
        keep = ~((g_pids == q_pids[q]) & (g_camids == q_camids[q]))
        dist, match = distmat[q][keep], g_pids[keep] == q_pids[q]
        order = np.lexsort((match, dist))  # by distance, non-matches before matches at equal distance
        ranks = np.flatnonzero(match[order]) + 1
        if len(ranks):
            out.append(ranks)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_market_equals_torchreid_on_random_matrices(torchreid_rank, seed, chunk_size):
    # 400 gallery items over 40 ids and 3 cameras: every kept list is longer than max_rank, which torchreid needs.
    problem = random_problem(seed, num_q=60, num_g=400, num_ids=45, num_cams=3, distractors=30)
    ref_cmc, ref_map = torchreid_rank.evaluate_py(*problem, 50, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)  # ids 41..45 may be missing from the gallery
        result = evaluate(*problem, max_rank=50, chunk_size=chunk_size)
    assert result.cmc.shape == ref_cmc.shape == (50,)
    np.testing.assert_allclose(result.cmc, ref_cmc, atol=1e-6, rtol=0)
    assert abs(result.mAP - ref_map) < 1e-6
    # The tables' CMC columns (DESIGN §6: ranks 1/5/10/20) are torchreid's entries.
    summary = result.summary()
    assert [summary[f"rank{r}"] for r in (1, 5, 10, 20)] == pytest.approx([100 * ref_cmc[r - 1] for r in (1, 5, 10, 20)],
                                                                          abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_market_equals_torchreid_on_structured_matrices(torchreid_rank, seed):
    problem = structured_problem(seed)
    ref_cmc, ref_map = torchreid_rank.evaluate_py(*problem, 20, False)
    with pytest.warns(EvaluationWarning, match=r"queries have no true match"):
        result = evaluate(*problem, max_rank=20)
    np.testing.assert_allclose(result.cmc, ref_cmc, atol=1e-6, rtol=0)
    assert abs(result.mAP - ref_map) < 1e-6
    assert result.mAP > 0.3  # the structure is real: far above chance
    # Queries of ids 28..30 (absent from the gallery) and those whose matches all share their camera are skipped.
    assert result.num_valid_queries == len(direct_ranks(*problem)) < result.num_queries


def test_cmc_is_as_long_as_the_gallery_when_shorter_than_max_rank(torchreid_rank):
    distmat, q_pids, g_pids, _, _ = random_problem(3, num_q=12, num_g=9, num_ids=3, num_cams=1)
    q_camids, g_camids = np.zeros(12, int), np.ones(9, int)  # no junk: every kept list holds all 9 items
    ref_cmc, ref_map = torchreid_rank.evaluate_py(distmat, q_pids, g_pids, q_camids, g_camids, 50, False)
    cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50)
    assert len(cmc) == len(ref_cmc) == 9
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert abs(mean_ap - ref_map) < 1e-6


def test_minp_and_ap_follow_their_definitions():
    problem = structured_problem(7, noise=1.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        result = evaluate(*problem)
    ranks = direct_ranks(*problem)
    # Ye et al.: INP = |matches| / rank of the hardest match; AP = mean over matches of k / rank_k.
    assert result.mINP == pytest.approx(np.mean([len(r) / r[-1] for r in ranks]), abs=1e-6)
    assert result.mAP == pytest.approx(np.mean([np.mean(np.arange(1, len(r) + 1) / r) for r in ranks]), abs=1e-6)
    assert 0 < result.mINP < result.mAP


def test_ties_rank_against_the_query():
    rng = np.random.default_rng(0)
    # Distances on a coarse grid: many ties between matches and non-matches and among matches.
    distmat = rng.integers(0, 4, (25, 60)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 5, 25), rng.integers(0, 5, 60)
    q_camids, g_camids = rng.integers(0, 2, 25), rng.integers(0, 2, 60)
    result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10)
    ranks = direct_ranks(distmat, q_pids, g_pids, q_camids, g_camids)
    assert result.mAP == pytest.approx(np.mean([np.mean(np.arange(1, len(r) + 1) / r) for r in ranks]), abs=1e-6)
    assert result.mINP == pytest.approx(np.mean([len(r) / r[-1] for r in ranks]), abs=1e-6)
    firsts = np.array([r[0] for r in ranks])
    np.testing.assert_allclose(result.cmc, [(firsts <= k).mean() for k in range(1, 11)], atol=1e-12)
    # A constant matrix (a collapsed model) scores the minimum, not a lucky order.
    flat = evaluate(np.ones((25, 60), np.float32), q_pids, g_pids, q_camids, g_camids, max_rank=10)
    assert flat.mAP < result.mAP and flat.cmc[0] < 0.2


def test_numpy_torch_float64_and_chunking_agree_exactly():
    problem = random_problem(11, num_q=50, num_g=300, num_ids=20, num_cams=4, distractors=10)
    base = evaluate(*problem)
    as_torch = evaluate(torch.from_numpy(problem[0]), *(torch.from_numpy(a) for a in problem[1:]), chunk_size=3)
    as_double = evaluate(problem[0].astype(np.float64), *problem[1:])
    for other in (as_torch, as_double):
        np.testing.assert_array_equal(other.cmc, base.cmc)
        assert other.mAP == pytest.approx(base.mAP, abs=1e-7) and other.mINP == pytest.approx(base.mINP, abs=1e-7)
    again = evaluate(*problem)
    assert (again.mAP, again.mINP) == (base.mAP, base.mINP)  # deterministic


def test_torch_sort_path_agrees_with_numpy_sort(monkeypatch):
    # The CUDA path sorts with torch.sort; run that code on the CPU and compare with the NumPy path.
    problem = random_problem(5, num_q=40, num_g=250, num_ids=15, num_cams=3, distractors=5)
    base = evaluate(*problem, chunk_size=9)
    monkeypatch.setattr(ranking, "_sorted_values", lambda rows: torch.sort(rows, dim=1).values)
    other = evaluate(*problem, chunk_size=9)
    np.testing.assert_array_equal(other.cmc, base.cmc)
    assert (other.mAP, other.mINP) == (base.mAP, base.mINP)


# ------------------------------------------------------------------------------------------------ cuhk03
def cuhk03_transcription(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, seed, num_repeats=10):
    """torchreid's `eval_cuhk03` loop, with its `np.random.choice(idxs)` replaced by the documented draw: identity
    p (ascending) takes its floor(u * n)-th kept image in gallery order, u = rng.random((Q, repeats, ids))."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    ids = np.unique(g_pids)
    draws = np.random.default_rng(seed).random((num_q, num_repeats, len(ids)))
    indices = np.argsort(distmat, axis=1)
    all_cmc, all_ap = [], []
    for q in range(num_q):
        order = indices[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        raw_cmc = (g_pids[order][keep] == q_pids[q]).astype(np.int32)
        if not raw_cmc.any():
            continue
        kept_gallery = order[keep]  # gallery index at each kept rank
        cmc = np.zeros(max_rank)
        for repeat in range(num_repeats):
            mask = np.zeros(len(raw_cmc), dtype=bool)
            for p, pid in enumerate(ids):
                positions = np.flatnonzero(g_pids[kept_gallery] == pid)
                positions = positions[np.argsort(kept_gallery[positions])]  # gallery order
                mask[positions[int(draws[q, repeat, p] * len(positions))]] = True
            sampled_cmc = raw_cmc[mask].cumsum()
            sampled_cmc[sampled_cmc > 1] = 1
            padded = np.ones(max_rank)  # a sampled list shorter than max_rank has found its match
            padded[: min(max_rank, len(sampled_cmc))] = sampled_cmc[:max_rank]
            cmc += padded
        all_cmc.append(cmc / num_repeats)
        precision = raw_cmc.cumsum() / np.arange(1, len(raw_cmc) + 1)
        all_ap.append((precision * raw_cmc).sum() / raw_cmc.sum())
    return np.mean(all_cmc, axis=0), np.mean(all_ap)


@pytest.mark.parametrize("seed", range(4))
def test_cuhk03_equals_transcription_of_its_definition(seed):
    rng = np.random.default_rng(100 + seed)
    num_ids = 12
    g_pids = np.repeat(np.arange(num_ids), rng.integers(1, 5, num_ids))
    q_pids = rng.integers(0, num_ids + 2, 15)  # two ids absent from the gallery
    q_camids, g_camids = rng.integers(0, 2, 15), rng.integers(0, 2, len(g_pids))
    distmat = rng.random((15, len(g_pids)), dtype=np.float32)
    ref_cmc, ref_map = cuhk03_transcription(distmat, q_pids, g_pids, q_camids, g_camids, 8, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EvaluationWarning)
        result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=8, protocol="cuhk03", seed=seed,
                          chunk_size=4)
    np.testing.assert_allclose(result.cmc, ref_cmc, atol=1e-9)
    assert abs(result.mAP - ref_map) < 1e-6


def test_cuhk03_single_image_per_identity_equals_market_cmc():
    # With one gallery image per identity there is nothing to sample: both protocols rank the same list.
    rng = np.random.default_rng(3)
    g_pids = np.arange(30)
    q_pids = rng.integers(0, 30, 20)
    distmat = rng.random((20, 30), dtype=np.float32)
    args = (distmat, q_pids, g_pids, np.zeros(20, int), np.ones(30, int))
    market = evaluate(*args, max_rank=10)
    cuhk03 = evaluate(*args, max_rank=10, protocol="cuhk03")
    np.testing.assert_allclose(cuhk03.cmc, market.cmc, atol=1e-12)
    assert cuhk03.mAP == market.mAP


def test_cuhk03_is_seeded_and_chunk_independent():
    problem = random_problem(8, num_q=30, num_g=200, num_ids=10, num_cams=2)
    first = evaluate(*problem, max_rank=10, protocol="cuhk03", chunk_size=4)
    again = evaluate(*problem, max_rank=10, protocol="cuhk03", chunk_size=30)
    other_seed = evaluate(*problem, max_rank=10, protocol="cuhk03", seed=1)
    np.testing.assert_array_equal(first.cmc, again.cmc)
    assert not np.array_equal(first.cmc, other_seed.cmc)
    # Sampling one image per identity can only shorten the list before the match: CMC at least market's.
    market = evaluate(*problem, max_rank=10)
    assert np.all(first.cmc >= market.cmc - 1e-12)


# ------------------------------------------------------------------------------------------------ bad input
def test_mismatched_lengths_name_the_array():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(0, 5, 8, 3, 2)
    with pytest.raises(EvaluationError, match=r"g_camids has 7 entries but the distance matrix is 5 x 8"):
        evaluate(distmat, q_pids, g_pids, q_camids, g_camids[:7])
    with pytest.raises(EvaluationError, match=r"q_pids has 4 entries"):
        evaluate(distmat, q_pids[:4], g_pids, q_camids, g_camids)


def test_nan_names_the_query_row():
    distmat, *labels = random_problem(0, 6, 8, 3, 2)
    distmat[4, 2] = np.nan
    with pytest.raises(EvaluationError, match=r"NaN \(first in query row 4\)"):
        evaluate(distmat, *labels, chunk_size=2)


def test_empty_query_set_and_gallery_are_errors():
    with pytest.raises(EvaluationError, match="empty query set"):
        evaluate(np.zeros((0, 4), np.float32), [], [1, 2, 3, 4], [], [0, 0, 1, 1])
    with pytest.raises(EvaluationError, match="empty gallery"):
        evaluate(np.zeros((2, 0), np.float32), [1, 2], [], [0, 1], [])
    with pytest.raises(EvaluationError, match="unknown evaluation protocol"):
        evaluate(np.zeros((1, 1), np.float32), [1], [1], [0], [1], protocol="duke")


def test_no_valid_query_warns_with_the_count_and_returns_nan():
    # Every match shares the query's camera: nothing can be evaluated.
    distmat = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    with pytest.warns(EvaluationWarning, match=r"none of the 3 queries"):
        result = evaluate(distmat, [1, 1, 2], [1, 2, 2, 3], [0, 0, 1], [0, 1, 1, 0])
    assert result.num_valid_queries == 0 and np.isnan(result.mAP) and np.all(np.isnan(result.cmc))


def test_some_skipped_queries_warn_with_the_count():
    distmat = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    with pytest.warns(EvaluationWarning, match=r"^1 of 3 queries have no true match"):
        result = evaluate(distmat, [1, 2, 9], [1, 2, 2, 3], [0, 0, 1], [1, 1, 1, 0])
    assert result.num_valid_queries == 2


def test_threaded_chunks_agree_with_sequential():
    # On the CPU with several threads the chunks run in a thread pool; results must not depend on it.
    problem = random_problem(12, num_q=64, num_g=200, num_ids=20, num_cams=3)
    sequential = evaluate(*problem, chunk_size=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = evaluate(*problem, chunk_size=5)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(threaded.cmc, sequential.cmc)
    assert (threaded.mAP, threaded.mINP) == (sequential.mAP, sequential.mINP)


def test_ranked_order_is_the_order_evaluate_counts(rng):
    """On tie-heavy rows, the AP and first-match rank read off `ranked_order` equal `evaluate`'s."""
    from kdreid.evaluation.ranking import ranked_order

    distances = rng.integers(0, 4, (12, 30)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 3, 12), rng.integers(0, 3, 30)
    q_camids, g_camids = np.zeros(12, int), rng.integers(0, 2, 30)
    for q in range(12):
        kept = np.flatnonzero(~((g_pids == q_pids[q]) & (g_camids == q_camids[q])))
        is_match = torch.from_numpy(g_pids[kept] == q_pids[q])
        if not is_match.any():
            continue
        order = ranked_order(torch.from_numpy(distances[q, kept]), is_match)
        ranks = torch.nonzero(is_match[order]).flatten().numpy() + 1  # 1-based ranks of the matches
        expected = evaluate(distances[q:q + 1], q_pids[q:q + 1], g_pids, q_camids[q:q + 1], g_camids, max_rank=30)
        assert expected.rank(int(ranks[0])) == 1 and (ranks[0] == 1 or expected.rank(int(ranks[0]) - 1) == 0)
        assert expected.mAP == pytest.approx(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))


def test_evaluate_rank_takes_torchreids_arguments():
    distmat, q_pids, g_pids, q_camids, g_camids = random_problem(5, num_q=12, num_g=40, num_ids=6, num_cams=2)
    cuhk03 = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10, protocol="cuhk03")
    for call in (dict(use_metric_cuhk03=True), dict(use_metric_cuhk03=True, use_cython=False)):
        cmc, mean_ap = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, 10, **call)
        np.testing.assert_allclose(cmc, cuhk03.cmc)
        assert mean_ap == cuhk03.mAP
    cmc, _ = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, 10, True)  # torchreid's positional order
    np.testing.assert_allclose(cmc, cuhk03.cmc)
    with pytest.raises(EvaluationError, match="q_pids must hold integers"):
        evaluate_rank(distmat, q_pids.astype(str), g_pids, q_camids, g_camids)
