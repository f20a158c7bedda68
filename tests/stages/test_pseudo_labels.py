import numpy as np
import pytest
from scipy.spatial.distance import cdist

from kdreid.stages.pseudo_labels import dbscan

sklearn_cluster = pytest.importorskip("sklearn.cluster")


@pytest.mark.parametrize("seed", range(5))
def test_dbscan_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, 2)) * 5
    points = np.concatenate([c + rng.normal(size=(rng.integers(2, 12), 2)) * 0.6 for c in centres])
    points = np.concatenate([points, rng.uniform(-12, 12, size=(10, 2))])  # noise
    distances = cdist(points, points)
    ours = dbscan(distances, eps=1.0, min_samples=4)
    theirs = sklearn_cluster.DBSCAN(eps=1.0, min_samples=4, metric="precomputed").fit_predict(distances)
    assert np.array_equal(ours, theirs)
    assert ours.max() >= 1 and (ours == -1).any()


def test_silhouette_equals_scikit_learn_on_the_clustered_points():
    from sklearn.metrics import silhouette_score

    from kdreid.stages.pseudo_labels import silhouette

    rng = np.random.default_rng(3)
    points = rng.normal(size=(60, 4))
    distances = cdist(points, points)
    labels = rng.integers(-1, 5, size=60)
    labels[7] = 9  # a cluster of one point (silhouette 0 by definition)
    kept = labels >= 0
    expected = silhouette_score(distances[np.ix_(kept, kept)], labels[kept], metric="precomputed")
    assert silhouette(distances, labels) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(silhouette(distances, np.where(kept, 0, -1)))  # one cluster: undefined


def test_cluster_quality_ranks_separated_identities_above_noise():
    import torch

    from kdreid.stages.pseudo_labels import PseudoLabelConfig, cluster_quality

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(12, 32, generator=generator)
    separated = centres.repeat_interleave(8, 0) + 0.05 * torch.randn(96, 32, generator=generator)
    noise = torch.randn(96, 32, generator=generator)
    settings = PseudoLabelConfig(k1=10, k2=3)
    good, bad = cluster_quality(separated, settings), cluster_quality(noise, settings)
    assert good["clusters"] == 12 and good["clustered"] == 100.0 and good["score"] > 50
    assert bad["score"] < good["score"] / 2


def test_the_target_is_clustered_on_its_normalised_embeddings():
    # Found by a review: clustering raw embeddings passed every test; DBSCAN's eps 0.6 and the k-reciprocal
    # neighbourhoods are SpCL's values for unit vectors, and a raw embedding's scale would move them.
    import torch

    from kdreid.evaluation.rerank import jaccard_distance
    from kdreid.stages.pseudo_labels import PseudoLabelConfig, clustering_distances

    torch.manual_seed(0)
    centres = torch.randn(6, 16)
    features = (centres.repeat_interleave(8, 0) + 0.4 * torch.randn(48, 16)) * torch.rand(48, 1).add(0.2) * 5
    settings = PseudoLabelConfig(k1=6, k2=3)
    expected = jaccard_distance(torch.nn.functional.normalize(features, dim=1), k1=6, k2=3).numpy()
    np.testing.assert_allclose(clustering_distances(features, settings), expected, atol=1e-6)
    assert not np.allclose(jaccard_distance(features, k1=6, k2=3).numpy(), expected, atol=1e-3)


def test_a_point_exactly_eps_away_is_a_neighbour_as_in_scikit_learn():
    # Found by a review: `< eps` instead of `<= eps` passed, random float distances never tie with eps.
    distances = np.full((5, 5), 0.5)
    np.fill_diagonal(distances, 0.0)
    distances[4, :4] = distances[:4, 4] = 0.9  # an outlier
    ours = dbscan(distances, eps=0.5, min_samples=4)
    theirs = sklearn_cluster.DBSCAN(eps=0.5, min_samples=4, metric="precomputed").fit_predict(distances)
    assert np.array_equal(ours, theirs) and list(ours) == [0, 0, 0, 0, -1]


def test_the_defaults_are_spcls():
    # SpCL (Ge et al., NeurIPS 2020) clusters with DBSCAN eps 0.6, min_samples 4 on the Jaccard distance with
    # k1 30, k2 6: the values the module names and `grouping: pseudo` runs with unless told otherwise.
    from kdreid.stages.pseudo_labels import PseudoLabelConfig

    assert PseudoLabelConfig() == PseudoLabelConfig(eps=0.6, min_samples=4, k1=30, k2=6)


def test_cluster_quality_is_the_silhouette_times_the_share_clustered():
    # Found by a review: the score without its share-of-images factor passed.
    import torch
    from sklearn.metrics import silhouette_score

    from kdreid.stages.pseudo_labels import PseudoLabelConfig, cluster_quality, clustering_distances

    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(6, 32, generator=generator)
    features = torch.cat([centres.repeat_interleave(8, 0) + 0.05 * torch.randn(48, 32, generator=generator),
                          torch.randn(12, 32, generator=generator)])  # 12 loners
    settings = PseudoLabelConfig(k1=10, k2=3)
    distances = clustering_distances(features, settings).clip(0, None)  # float noise below 0 upsets scikit-learn
    labels = sklearn_cluster.DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit_predict(distances)
    kept = labels >= 0
    assert 0.5 < kept.mean() < 1 and labels.max() >= 1
    expected = 100 * silhouette_score(distances[np.ix_(kept, kept)], labels[kept], metric="precomputed") * kept.mean()
    quality = cluster_quality(features, settings)
    assert quality["score"] == pytest.approx(expected, abs=1e-4)
    assert quality["clusters"] == labels.max() + 1 and quality["clustered"] == pytest.approx(100 * kept.mean())


def test_fewer_than_two_clusters_score_below_any_clustering():
    import torch

    from kdreid.stages.pseudo_labels import PseudoLabelConfig, cluster_quality

    generator = torch.Generator().manual_seed(0)
    one_person = torch.randn(1, 16, generator=generator) + 0.01 * torch.randn(20, 16, generator=generator)
    quality = cluster_quality(one_person, PseudoLabelConfig(k1=6, k2=3))
    assert quality["clusters"] == 1 and quality["score"] == -100.0
