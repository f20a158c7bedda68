"""Pseudo-labels for an unlabelled target: DBSCAN on the k-reciprocal Jaccard distance of target embeddings,
as in UDA re-ID practice (SpCL's values: eps 0.6, min 4 samples, k1 30, k2 6; the Jaccard distance is Zhong et
al.'s, as re-ranking computes it, not SpCL's softmax-weighted variant). Outliers get -1 and are left out of
training. The same clustering scores a model without labels (`cluster_quality`, what `--select target-clusters`
chooses by)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PseudoLabelConfig:
    eps: float = 0.6
    min_samples: int = 4
    k1: int = 30
    k2: int = 6


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


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw, 1987) of the clustered points (label >= 0) on a precomputed distance matrix:
    s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the other members of i's cluster, b_i the smallest
    mean distance to another cluster's members; 0 for a point alone in its cluster. NaN with fewer than two
    clusters, where it is undefined."""
    labels = np.asarray(labels)
    kept = np.flatnonzero(labels >= 0)
    clusters, index = np.unique(labels[kept], return_inverse=True)
    if len(clusters) < 2:
        return float("nan")
    distances = np.asarray(distances, dtype=np.float64)[np.ix_(kept, kept)]
    members = np.eye(len(clusters))[index]  # (n, C) one-hot
    sizes = members.sum(0)  # (C,)
    sums = distances @ members  # (n, C): each point's summed distance to every cluster
    own_size = sizes[index]
    a = sums[np.arange(len(kept)), index] / np.maximum(own_size - 1, 1)  # the zero self-distance left out
    to_others = sums / sizes
    to_others[np.arange(len(kept)), index] = np.inf
    b = to_others.min(1)
    s = np.where(own_size > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
    return float(s.mean())


def clustering_distances(features: torch.Tensor, settings: PseudoLabelConfig) -> np.ndarray:
    """What the target is clustered on: the k-reciprocal Jaccard distance (N, N) of the L2-normalised
    embeddings (N, D)."""
    from kdreid.evaluation.rerank import jaccard_distance

    features = torch.nn.functional.normalize(features.float(), dim=1)
    return jaccard_distance(features, k1=settings.k1, k2=settings.k2).cpu().numpy()


def cluster_quality(features: torch.Tensor, settings: PseudoLabelConfig) -> dict[str, float]:
    """A label-free score of how well a model separates an unlabelled domain: the target's embeddings are
    clustered as for pseudo-labels, and score = 100 × silhouette of the clusters on the Jaccard distance × the
    share of images clustered (a model that leaves most images as outliers does not score by its few tight
    clusters). -100 when fewer than two clusters form."""
    distances = clustering_distances(features, settings)
    labels = dbscan(distances, settings.eps, settings.min_samples)
    clustered = float((labels >= 0).mean()) if len(labels) else 0.0
    value = silhouette(distances, labels)
    score = -100.0 if value != value else 100.0 * value * clustered
    return {"score": score, "clusters": float(labels.max() + 1), "clustered": 100.0 * clustered}
