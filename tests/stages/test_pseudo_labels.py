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
