"""Pseudo-labels for an unlabelled target: DBSCAN on the k-reciprocal Jaccard distance of target embeddings,
as in UDA re-ID practice (SpCL: eps 0.6, min 4 samples, k1 30, k2 6). Outliers get -1 and are left out of
training."""

from __future__ import annotations

from collections import deque

import numpy as np


def dbscan(distances: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN (Ester et al., 1996) on a precomputed (N, N) distance matrix -> labels (N,), -1 = noise.

    A point is a core point when at least `min_samples` points (itself included) lie within `eps`; clusters are
    the connected components of core points, plus the border points within eps of one (a border point joins
    the first cluster that reaches it, in index order, as scikit-learn does)."""
    distances = np.asarray(distances)
    n = len(distances)
    neighbours = [np.flatnonzero(row <= eps) for row in distances]
    core = np.array([len(members) >= min_samples for members in neighbours], dtype=bool)
    labels = np.full(n, -1, dtype=np.int64)
    cluster = 0
    for start in range(n):
        if labels[start] != -1 or not core[start]:
            continue
        labels[start] = cluster
        queue = deque([start])
        while queue:
            point = queue.popleft()
            if not core[point]:
                continue  # border points join but do not spread the cluster
            for other in neighbours[point]:
                if labels[other] == -1:
                    labels[other] = cluster
                    queue.append(other)
        cluster += 1
    return labels
