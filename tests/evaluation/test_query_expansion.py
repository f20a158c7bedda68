"""Alpha query expansion (`kdreid evaluate --aqe`): against a direct per-vector computation, chunking, what it
does to a ranking, and the command's flags."""

import json

import numpy as np
import pytest
import torch

from kdreid.data.datasets.base import build_dataset
from kdreid.evaluation import alpha_query_expansion, evaluate
from kdreid.evaluation.distance import compute_distance_matrix
from kdreid.evaluation.features import evaluate_features, expand_features, extract_features, load_model
from tests.evaluation.test_evaluate_cli import run, setup  # noqa: F401  (fixture)


def _reference(query, gallery, k, alpha):
    """Radenović et al.'s αQE written out per vector in float64: the k most similar vectors among all (itself
    included), summed with weights max(0, cos)^alpha, normalised."""
    features = np.concatenate([query, gallery]).astype(np.float64)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    expanded = []
    for vector in features:
        similarity = features @ vector
        nearest = np.argsort(-similarity, kind="stable")[:k]
        weights = np.maximum(similarity[nearest], 0) ** alpha
        total = (weights[:, None] * features[nearest]).sum(axis=0)
        expanded.append(total / np.linalg.norm(total))
    expanded = np.array(expanded)
    return expanded[:len(query)], expanded[len(query):]


# (20, 1.5) and (39, 3.0) reach neighbours of negative cosine, which weigh 0 (found by a review: without the clamp
# the closer cases passed, a negative weight or a NaN from the fractional power went unseen).
@pytest.mark.parametrize("k, alpha", [(5, 3.0), (1, 3.0), (3, 0.0), (7, 1.5), (20, 1.5), (39, 3.0)])
def test_matches_the_definition_vector_by_vector(rng, k, alpha):
    query, gallery = rng.normal(size=(9, 16)), rng.normal(size=(30, 16))
    expected_query, expected_gallery = _reference(query, gallery, k, alpha)
    for rows in (None, 1, 4):  # whole, row by row, and chunks that do not divide the set
        got_query, got_gallery = alpha_query_expansion(torch.from_numpy(query).float(),
                                                       torch.from_numpy(gallery).float(), k=k, alpha=alpha,
                                                       rows_per_chunk=rows)
        np.testing.assert_allclose(got_query.numpy(), expected_query, atol=1e-5)
        np.testing.assert_allclose(got_gallery.numpy(), expected_gallery, atol=1e-5)
    if k == 1:  # only itself: the normalised feature
        np.testing.assert_allclose(got_query.numpy(), query / np.linalg.norm(query, axis=1, keepdims=True),
                                   atol=1e-6)


def test_k_above_the_set_size_uses_every_vector_and_bad_settings_are_refused(rng):
    query, gallery = torch.randn(2, 8), torch.randn(3, 8)
    expanded, _ = alpha_query_expansion(query, gallery, k=50, alpha=0.0)
    # alpha 0 weighs every neighbour 1: each vector becomes the normalised sum of all five.
    everything = torch.nn.functional.normalize(torch.cat([query, gallery]), dim=1)
    total = torch.nn.functional.normalize(everything.sum(0, keepdim=True), dim=1)
    assert torch.allclose(expanded, total.expand(2, 8), atol=1e-6)
    for k, alpha in ((0, 3.0), (5, -1.0), (5, float("nan")), (5, float("inf"))):
        with pytest.raises(Exception, match="k must be at least 1 and alpha a finite 0 or more"):
            alpha_query_expansion(query, gallery, k=k, alpha=alpha)


def test_it_pulls_a_noisy_query_to_its_identity(rng):
    """Gallery images of one identity sit close together; queries are noisy views. Summing a query's nearest
    neighbours moves it towards its identity's cluster: the mAP rises (and it could fail: with k = 1 nothing moves)."""
    ids, per_id, dim = 20, 4, 32
    centres = rng.normal(size=(ids, dim))
    gallery = np.repeat(centres, per_id, axis=0) + 0.3 * rng.normal(size=(ids * per_id, dim))
    query = centres + 3.0 * rng.normal(size=(ids, dim))
    q_pids, g_pids = np.arange(ids), np.repeat(np.arange(ids), per_id)
    q_cams, g_cams = np.zeros(ids, int), np.ones(ids * per_id, int)

    def mean_ap(q, g):
        return evaluate(compute_distance_matrix(q, g, metric="cosine"), q_pids, g_pids, q_cams, g_cams).mAP

    plain = mean_ap(torch.from_numpy(query).float(), torch.from_numpy(gallery).float())
    unchanged = mean_ap(*alpha_query_expansion(torch.from_numpy(query).float(), torch.from_numpy(gallery).float(),
                                               k=1))
    expanded = mean_ap(*alpha_query_expansion(torch.from_numpy(query).float(), torch.from_numpy(gallery).float(),
                                              k=4))
    assert unchanged == pytest.approx(plain, abs=1e-9)
    assert expanded > plain + 0.03, (plain, expanded)


def test_evaluate_aqe_scores_the_expanded_features(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    common = ["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root), "--json", "--device",
              "cpu"]
    code, out, err = run([*common, "--aqe", "--aqe-k", "3", "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "alpha query expansion (k 3, alpha 3)" in err
    model, data = load_model(checkpoint), build_dataset("market1501", root)
    query, gallery = (extract_features(model, data.query, device="cpu"),
                      extract_features(model, data.gallery, device="cpu"))
    expected = evaluate_features(*expand_features(query, gallery, k=3, alpha=3.0), device="cpu").summary()
    printed = json.loads(out)["final"]["market1501"]
    assert printed == {key: round(value, 4) for key, value in expected.items()}
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluated_with"]["market1501"]
    assert recorded["aqe"] == {"k": 3, "alpha": 3.0}
    plain = json.loads(run(common, capsys)[1])["final"]["market1501"]
    assert plain != printed  # the flag changes what is scored


def test_aqe_flags_are_checked_before_any_work(setup, tmp_path, capsys):
    root, checkpoint, _ = setup
    common = ["evaluate", "--model", str(checkpoint), "-t", "market1501", "--root", str(root), "--device", "cpu"]
    code, _, err = run([*common, "--aqe", "--aqe-k", "0", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--aqe-k 0" in err and "at least 1" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run([*common, "--aqe-k", "3", "--json"], capsys)
    assert code == 0 and "warning: --aqe-k and --aqe-alpha have no effect without --aqe" in err
