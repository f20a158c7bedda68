"""Evaluation: distances, ranking metrics (CMC, mAP, mINP), k-reciprocal re-ranking, alpha query expansion,
feature extraction.

    distmat = compute_distance_matrix(query_features, gallery_features, metric="euclidean")
    cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)        # torchreid's shape
    result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids)                # + mINP, valid queries
    result = evaluate_model(model, build_dataset("market1501", root), flip=True)  # images -> metrics
    query, gallery = alpha_query_expansion(query_features, gallery_features, k=5, alpha=3.0)  # fast-reid's AQE

See docs/evaluation.md.
"""

from kdreid.evaluation.distance import compute_distance_matrix
from kdreid.evaluation.features import (
    FeatureExtractor,
    Features,
    evaluate_features,
    evaluate_model,
    extract_features,
    load_model,
)
from kdreid.evaluation.query_expansion import alpha_query_expansion
from kdreid.evaluation.ranking import EvaluationWarning, RankResult, evaluate, evaluate_rank
from kdreid.evaluation.rerank import re_ranking, re_ranking_features

__all__ = [
    "EvaluationWarning",
    "alpha_query_expansion",
    "FeatureExtractor",
    "Features",
    "RankResult",
    "compute_distance_matrix",
    "evaluate",
    "evaluate_features",
    "evaluate_model",
    "evaluate_rank",
    "extract_features",
    "load_model",
    "re_ranking",
    "re_ranking_features",
]
