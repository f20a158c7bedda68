"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal Encoding",
CVPR 2017), with torchreid's conventions (`torchreid/reid/utils/rerank.py`) and memory bounded by chunks.

The method, on the N = Q + G images of query and gallery together:
  1. d(i, j) = squared input distance, each row divided by its maximum (torchreid squares what it is given: pass
     Euclidean distances to get the paper's squared distances);
  2. R(i, k) = the k nearest neighbours of i (itself included); the k1-reciprocal set of i holds the j in R(i, k1)
     with i in R(j, k1); it is expanded by the k1/2-reciprocal set of each member c when more than 2/3 of that set
     is already in i's (paper eq. 6);
  3. V(i, j) = exp(-d(i, j)) over the expanded set, normalised to sum 1 (eq. 7), then averaged over the k2
     nearest neighbours of i (local query expansion, eq. 11);
  4. Jaccard distance d_J(i, j) = 1 - sum_l min(V_il, V_jl) / sum_l max(V_il, V_jl), written with sum_l V = 1 as
     1 - m / (2 - m), m = sum_l min (eq. 10); final = (1 - lambda) d_J + lambda d (eq. 12), query rows, gallery
     columns.

torchreid holds dense N x N matrices (distances, ranks, V: ~9 GB at Market size). Here only the k1 + 1 nearest
neighbours of each image and the sparse V (a few dozen non-zeros a row) are kept; distance rows are rebuilt chunk
by chunk from the inputs, and the Jaccard sums run over sparse (query entry, gallery entry) pairs in bounded
chunks. Memory is O(N * (k1 + nnz(V) per row)) plus the (Q, G) result. `re_ranking_features` builds the distance
rows from features, so a gallery too large for a dense G x G matrix (MSMT17: 27 GB) never needs one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kdreid.errors import EvaluationError
from kdreid.evaluation.distance import check_finite, check_metric, distances_of_prepared, squared_norms

# Bounds on the temporaries: distance rows rebuilt per chunk, and (query entry, gallery entry) pairs per chunk of
# the Jaccard step (~60 bytes each). Together they keep Market size well under 1 GB.
_ROW_CHUNK_ELEMENTS = 1 << 23
_PAIR_CHUNK = 1 << 21
_ENCODE_CHUNK_COMPARISONS = 1 << 24
_PAIRS_PER_GATHER = 1 << 13  # feature pairs gathered at once by re_ranking_features (2 x 8192 x D floats)
# What re_ranking_features holds beside its (Q, G) result, in feature copies, bytes an image and bounded chunks:
# [query; gallery] stacked (and its normalised copy for cosine), 3 x 8192 x D floats of gathered pairs of rows, the
# nearest-neighbour lists and the sparse V with its sorted copies (~5 KB an image at ~75 non-zeros a row, random
# features; clustered ones have ~20). Not all at once (the phases follow one another): with these, evaluation_memory
# is 1.2-1.7x every peak measured without glibc's heap retention (bench/evaluation_memory.py: Market size and
# 500 x 40,000, 512- and 2048-d).
_FEATURE_COPIES = 3
_BYTES_PER_IMAGE = 6 << 10
_CHUNK_BYTES = 64 << 20


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3):
    """Re-ranked (Q, G) distances from the query-gallery, query-query and gallery-gallery distance matrices.

    Same arguments and results as torchreid's `re_ranking`; numpy in, numpy out; torch in, torch out (on the
    device of `q_g_dist`). Distances must be non-negative; q_q_dist and g_g_dist are read by rows, torchreid reads
    them by columns: the same for symmetric matrices, which distance matrices are.
    """
    as_numpy = isinstance(q_g_dist, np.ndarray)
    q_g = _as_tensor(q_g_dist, "q_g_dist")
    q_q = _as_tensor(q_q_dist, "q_q_dist").to(q_g.device)
    g_g = _as_tensor(g_g_dist, "g_g_dist").to(q_g.device)
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise EvaluationError(
            f"re-ranking needs q_q_dist {num_q} x {num_q} and g_g_dist {num_g} x {num_g} for a {num_q} x {num_g} "
            f"q_g_dist, got {tuple(q_q.shape)} and {tuple(g_g.shape)}")
    final = _re_rank(_StackedMatrices(q_g, q_q, g_g), k1, k2, lambda_value)
    return final.cpu().numpy() if as_numpy else final


def re_ranking_features(query_features, gallery_features, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                        metric: str = "euclidean"):
    """Re-ranked (Q, G) distances straight from features (N, D): no N x N matrix is ever formed.

    The same as `re_ranking` on the matrices `compute_distance_matrix` gives for these features and metric (up to
    float rounding: distances are recomputed rather than read).
    """
    query_features = _as_tensor(query_features, "query_features").to(torch.float32)
    gallery_features = _as_tensor(gallery_features, "gallery_features").to(query_features)
    if query_features.shape[1] != gallery_features.shape[1]:
        raise EvaluationError(f"query features have {query_features.shape[1]} dimensions but gallery features "
                              f"{gallery_features.shape[1]}")
    final = _re_rank(_StackedFeatures(query_features, gallery_features, metric), k1, k2, lambda_value)
    return final


def re_ranking_memory(num_q: int, num_g: int, dim: int) -> int:
    """Bytes `re_ranking_features` takes for Q x G images of `dim` features beside the (Q, G) float32 result."""
    num_all = num_q + num_g
    return _FEATURE_COPIES * 4 * num_all * dim + _BYTES_PER_IMAGE * num_all + _CHUNK_BYTES


def jaccard_distance(features, k1: int = 30, k2: int = 6, metric: str = "euclidean") -> torch.Tensor:
    """(N, N) k-reciprocal Jaccard distances among one set of images: steps 1-4 above with the set as both
    query and gallery. This is the clustering distance of UDA re-ID (SpCL and others: DBSCAN on it, k1 30, k2 6)."""
    features = _as_tensor(features, "features").to(torch.float32)
    num = len(features)
    if num < 2:
        raise EvaluationError(f"the Jaccard distance needs at least two images, got {num}")
    one_set = _StackedFeatures(features, features[:0], metric)  # the set alone: N "queries", no gallery
    row_chunk = max(1, _ROW_CHUNK_ELEMENTS // num)
    neighbours, row_max = _nearest_neighbours(one_set, min(k1 + 1, num), row_chunk)
    row_max_squared = row_max.to(torch.float32).pow(2)

    def normalised(rows: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        return distances.to(torch.float32).pow(2) / row_max_squared[rows].view(-1, *[1] * (distances.dim() - 1))

    half = min(int(np.around(k1 / 2.0)) + 1, num)
    v_rows, v_cols, v_vals = _encode(one_set, normalised, neighbours, half)
    if k2 != 1:
        v_rows, v_cols, v_vals = _expand_query(v_rows, v_cols, v_vals, neighbours[:, :k2], num)
    # The Jaccard step pairs query rows of V with gallery rows of V; here both are the set, so V is stacked twice
    # (still sorted by row, then column) and the original-distance term gets weight 0.
    as_pairs = _StackedFeatures(features, features, metric)
    return _jaccard_and_blend(as_pairs, normalised, torch.cat([v_rows, v_rows + num]), torch.cat([v_cols, v_cols]),
                              torch.cat([v_vals, v_vals]), 0.0, row_chunk)


# ------------------------------------------------------------------------------------------------ internals
class _StackedMatrices:
    """The N x N distances of [queries; gallery] as torchreid stacks them, [[q_q, q_g], [q_g^T, g_g]], read in
    pieces: blocks of rows, single entries, and the query-gallery block."""

    def __init__(self, q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_q, self.num_g = q_g.shape
        self.device = q_g.device

    def row_blocks(self, start: int, stop: int) -> list[tuple[int, torch.Tensor]]:
        """Rows start..stop-1 (all queries or all gallery) as (first column, block) pieces."""
        if stop <= self.num_q:
            return [(0, self.q_q[start:stop]), (self.num_q, self.q_g[start:stop])]
        g_start, g_stop = start - self.num_q, stop - self.num_q
        return [(0, self.q_g[:, g_start:g_stop].T.contiguous()), (self.num_q, self.g_g[g_start:g_stop])]

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """distance[rows, cols] elementwise, any shape."""
        q = self.num_q
        row_q, col_q = rows < q, cols < q
        out = torch.empty(rows.shape, dtype=self.q_g.dtype, device=self.device)
        for row_in_q in (True, False):
            for col_in_q in (True, False):
                where = (row_q == row_in_q) & (col_q == col_in_q)
                r, c = rows[where], cols[where]
                if row_in_q and col_in_q:
                    out[where] = self.q_q[r, c]
                elif row_in_q:
                    out[where] = self.q_g[r, c - q]
                elif col_in_q:
                    out[where] = self.q_g[c, r - q]
                else:
                    out[where] = self.g_g[r - q, c - q]
        return out

    def query_gallery(self, start: int, stop: int) -> torch.Tensor:
        return self.q_g[start:stop]


class _StackedFeatures:
    """The same N x N distances, computed from features on demand. The features are checked, normalised (cosine) and
    their squared norms taken once: each of the ~N / 90 blocks of rows (about 1,000 at MSMT17 size) is one matrix
    product, where building it as compute_distance_matrix does re-read, copied and checked all N features: a new
    N x D buffer a block, which glibc's heap kept (1.4-1.9 GB against 0.6 GB at 500 x 40,000) and 1.8x the time."""

    def __init__(self, query: torch.Tensor, gallery: torch.Tensor, metric: str):
        check_metric(metric)
        features = torch.cat([query, gallery])  # (N, D)
        check_finite(features, "re-ranking")
        self.metric = metric
        self.features = F.normalize(features, dim=1) if metric == "cosine" else features
        self.squared = None if metric == "cosine" else squared_norms(features)
        self.num_q, self.num_g = len(query), len(gallery)
        self.device = query.device

    def _distances(self, rows: slice, cols: slice) -> torch.Tensor:
        squared = (None, None) if self.squared is None else (self.squared[rows], self.squared[cols])
        return distances_of_prepared(self.features[rows], self.features[cols], self.metric, *squared)

    def row_blocks(self, start: int, stop: int) -> list[tuple[int, torch.Tensor]]:
        return [(0, self._distances(slice(start, stop), slice(None)))]

    def entries(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        rows, cols = rows.flatten(), cols.flatten()
        values = torch.empty(len(rows), dtype=torch.float32, device=self.device)
        for start in range(0, len(rows), _PAIRS_PER_GATHER):  # bounded: each pair gathers two D-wide rows
            stop = start + _PAIRS_PER_GATHER
            row, col = rows[start:stop], cols[start:stop]
            products = (self.features[row] * self.features[col]).sum(1)  # (M,)
            if self.squared is None:  # normalised features: the cosine distance
                values[start:stop] = (1.0 - products).clamp(0.0, 2.0)
            else:
                squared = self.squared[row] + self.squared[col] - 2.0 * products
                values[start:stop] = squared.clamp(min=0.0).sqrt()
        return values

    def query_gallery(self, start: int, stop: int) -> torch.Tensor:
        return self._distances(slice(start, stop), slice(self.num_q, None))


def _re_rank(stacked, k1: int, k2: int, lambda_value: float) -> torch.Tensor:
    num_q, num_g = stacked.num_q, stacked.num_g
    num_all = num_q + num_g
    if num_q == 0 or num_g == 0:
        raise EvaluationError(f"re-ranking needs queries and gallery images, got {num_q} and {num_g}")
    if k1 < 1 or not 1 <= k2 <= k1 + 1 or not 0.0 <= lambda_value <= 1.0:
        raise EvaluationError(f"re-ranking needs k1 >= 1, 1 <= k2 <= k1 + 1 and 0 <= lambda <= 1; got k1={k1}, "
                              f"k2={k2}, lambda={lambda_value}")
    row_chunk = max(1, _ROW_CHUNK_ELEMENTS // num_all)
    neighbours, row_max = _nearest_neighbours(stacked, min(k1 + 1, num_all), row_chunk)  # (N, k1 + 1), (N,)
    # torchreid's original_dist: d^2 / max_j d^2 per row, in float32.
    row_max_squared = row_max.to(torch.float32).pow(2)

    def normalised(rows: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        return distances.to(torch.float32).pow(2) / row_max_squared[rows].view(-1, *[1] * (distances.dim() - 1))

    half = min(int(np.around(k1 / 2.0)) + 1, num_all)  # np.around as torchreid: 10 -> 10, 2.5 -> 2
    v_rows, v_cols, v_vals = _encode(stacked, normalised, neighbours, half)
    if k2 != 1:
        v_rows, v_cols, v_vals = _expand_query(v_rows, v_cols, v_vals, neighbours[:, :k2], num_all)
    return _jaccard_and_blend(stacked, normalised, v_rows, v_cols, v_vals, lambda_value, row_chunk)


def _nearest_neighbours(stacked, k: int, row_chunk: int):
    """(N, k) indices of the k nearest images of each image, nearest first, and (N,) each row's largest distance."""
    num_q, num_all = stacked.num_q, stacked.num_q + stacked.num_g
    starts = [*range(0, num_q, row_chunk), *range(num_q, num_all, row_chunk)]  # chunks never straddle Q
    stops = [min(s + row_chunk, num_q if s < num_q else num_all) for s in starts]
    neighbours, row_max = [], []
    for start, stop in zip(starts, stops):
        values, indices, maxima = [], [], []
        for first_col, block in stacked.row_blocks(start, stop):
            low, high = torch.aminmax(block, dim=1)
            if bool(torch.isnan(high).any()) or bool((low < 0).any()):
                raise EvaluationError("re-ranking input holds NaN or negative distances; pass distances (>= 0) of "
                                      "finite features")
            maxima.append(high)
            top = torch.topk(block, min(k, block.shape[1]), dim=1, largest=False, sorted=True)
            values.append(top.values)
            indices.append(top.indices + first_col)
        values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
        best = torch.topk(values, k, dim=1, largest=False, sorted=True).indices
        neighbours.append(indices.gather(1, best))
        row_max.append(torch.stack(maxima, dim=1).amax(dim=1))
    return torch.cat(neighbours), torch.cat(row_max)


def _reciprocal(neighbours: torch.Tensor, nodes: torch.Tensor, k: int) -> torch.Tensor:
    """(C, k) bool: is the j-th of the k nearest neighbours of each node reciprocal (node among its k nearest)?"""
    forward = neighbours[nodes, :k]  # (C, k)
    backward = neighbours[forward, :k]  # (C, k, k)
    return (backward == nodes[:, None, None]).any(dim=2)


def _encode(stacked, normalised, neighbours: torch.Tensor, half: int):
    """Sparse V (COO: rows, cols, values), eq. 6-7."""
    num_all, k = neighbours.shape
    # Few large chunks: the work per row is small (k * half * k comparisons), and many small ops stall when the
    # cores are shared. ~16M comparisons (16 MB of booleans) per chunk.
    row_chunk = max(1, _ENCODE_CHUNK_COMPARISONS // (k * half * k))
    every = torch.arange(num_all, device=neighbours.device)
    half_reciprocal = torch.cat([_reciprocal(neighbours, every[s:s + row_chunk], half)
                                 for s in range(0, num_all, row_chunk)])  # (N, half)
    half_size = half_reciprocal.sum(1)  # (N,)
    out_rows, out_cols, out_vals = [], [], []
    for start in range(0, num_all, row_chunk):
        nodes = every[start:start + row_chunk]  # (C,)
        forward = neighbours[nodes]  # (C, k)
        reciprocal = _reciprocal(neighbours, nodes, k)  # (C, k)
        # Each reciprocal candidate c brings its own half-size reciprocal set when > 2/3 of it is already in ours.
        candidate_sets = neighbours[forward, :half]  # (C, k, half)
        candidate_in_set = half_reciprocal[forward]  # (C, k, half)
        in_ours = ((candidate_sets[..., None] == forward[:, None, None, :]) & reciprocal[:, None, None, :]).any(3)
        overlap = (in_ours & candidate_in_set).sum(2)  # (C, k)
        accepted = reciprocal & (overlap > 2.0 / 3.0 * half_size[forward])
        members = torch.cat([forward, candidate_sets.flatten(1)], dim=1)  # (C, k + k * half)
        is_member = torch.cat([reciprocal, (candidate_in_set & accepted[..., None]).flatten(1)], dim=1)
        # Unique members per row: sort with non-members pushed to the end (num_all), drop repeats.
        members = torch.where(is_member, members, num_all).sort(dim=1).values
        first = torch.ones_like(is_member)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        keep = first & (members < num_all)
        rows, cols = nodes[:, None].expand_as(members)[keep], members[keep]  # (M,) each, sorted by (row, col)
        weight = torch.exp(-normalised(rows, stacked.entries(rows, cols)))
        row_sum = torch.zeros(num_all, dtype=weight.dtype, device=weight.device).index_add_(0, rows, weight)
        out_rows.append(rows)
        out_cols.append(cols)
        out_vals.append(weight / row_sum[rows])
    return torch.cat(out_rows), torch.cat(out_cols), torch.cat(out_vals)


def _csr_pointers(sorted_keys: torch.Tensor, size: int) -> torch.Tensor:
    """(size + 1,) start offsets of each key in a sorted key array."""
    counts = torch.bincount(sorted_keys, minlength=size)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _expand_pairs(pointers: torch.Tensor, groups: torch.Tensor):
    """For each entry naming a group, every position of that group: (entry index, position), both (T,)."""
    counts = pointers[groups + 1] - pointers[groups]
    entry = torch.repeat_interleave(torch.arange(len(groups), device=groups.device), counts)
    offsets = torch.arange(len(entry), device=groups.device) - torch.repeat_interleave(counts.cumsum(0) - counts,
                                                                                       counts)
    return entry, pointers[groups[entry]] + offsets


def _expand_query(v_rows, v_cols, v_vals, k2_neighbours, num_all: int):
    """V_qe(i) = mean of V over the k2 nearest neighbours of i (eq. 11), still sparse."""
    k2 = k2_neighbours.shape[1]
    order = torch.argsort(v_rows, stable=True)
    v_rows, v_cols, v_vals = v_rows[order], v_cols[order], v_vals[order]
    pointers = _csr_pointers(v_rows, num_all)
    sources = k2_neighbours.flatten()  # (N * k2,) row i pulls rows sources[i * k2: (i + 1) * k2]
    entry, position = _expand_pairs(pointers, sources)
    target_rows = entry // k2
    keys = target_rows * num_all + v_cols[position]
    unique_keys, slot = torch.unique(keys, sorted=True, return_inverse=True)
    summed = torch.zeros(len(unique_keys), dtype=v_vals.dtype, device=v_vals.device)
    summed.index_add_(0, slot, v_vals[position])
    return unique_keys // num_all, unique_keys % num_all, summed / k2


def _jaccard_and_blend(stacked, normalised, v_rows, v_cols, v_vals, lambda_value: float,
                       row_chunk: int) -> torch.Tensor:
    num_q, num_g = stacked.num_q, stacked.num_g
    num_all = num_q + num_g
    device = v_vals.device
    # Query rows of V by row (CSR) and gallery rows of V by column (CSC: which gallery images use column l).
    is_query = v_rows < num_q  # V comes sorted by (row, column): the query rows are already CSR
    q_rows, q_cols, q_vals = v_rows[is_query], v_cols[is_query], v_vals[is_query]
    q_pointers = _csr_pointers(q_rows, num_q)
    g_order = torch.argsort(v_cols[~is_query], stable=True)
    g_rows = v_rows[~is_query][g_order] - num_q
    g_cols, g_vals = v_cols[~is_query][g_order], v_vals[~is_query][g_order]
    g_pointers = _csr_pointers(g_cols, num_all)
    column_use = g_pointers[1:] - g_pointers[:-1]  # (N,) gallery rows with a non-zero in each column

    # Query chunks sized so that each holds at most _PAIR_CHUNK (query entry, gallery entry) pairs (and a row cap).
    pairs_per_query = torch.zeros(num_q, dtype=torch.int64, device=device)
    pairs_per_query.index_add_(0, q_rows, column_use[q_cols])
    bounds = [0]
    cumulative = pairs_per_query.cumsum(0).cpu().numpy()
    while bounds[-1] < num_q:
        done = cumulative[bounds[-1] - 1] if bounds[-1] else 0
        stop = int(np.searchsorted(cumulative, done + _PAIR_CHUNK, side="right"))
        bounds.append(min(max(stop, bounds[-1] + 1), bounds[-1] + row_chunk, num_q))

    final = torch.empty(num_q, num_g, dtype=torch.float32, device=device)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        # Every pair (query entry (i, l), gallery entry (j, l)) of the chunk, laid out entry by entry; the work
        # is proportional to the pairs, not to Q x G. Written with few passes: this loop is the hot spot.
        first, last = int(q_pointers[start]), int(q_pointers[stop])
        cols = q_cols[first:last]
        counts = column_use[cols]
        total = int(counts.sum())
        shift = g_pointers[cols] - (counts.cumsum(0) - counts)  # pair p of entry e sits at g_pointers[l_e] + p
        position = torch.arange(total, device=device) + torch.repeat_interleave(shift, counts, output_size=total)
        target = torch.repeat_interleave((q_rows[first:last] - start) * num_g, counts, output_size=total)
        target += g_rows[position]  # flat index into the chunk's (C, G) sums
        query_value = torch.repeat_interleave(q_vals[first:last], counts, output_size=total)
        shared = torch.zeros((stop - start) * num_g, dtype=torch.float32, device=device)
        shared.index_add_(0, target, torch.minimum(query_value, g_vals[position]))
        shared = shared.view(stop - start, num_g)  # sum_l min(V_il, V_jl)
        jaccard = 1.0 - shared / (2.0 - shared)
        if lambda_value == 0.0:  # the clustering distance (jaccard_distance): no original-distance pass to weigh 0
            final[start:stop] = jaccard
            continue
        original = normalised(torch.arange(start, stop, device=device), stacked.query_gallery(start, stop))
        final[start:stop] = jaccard * (1.0 - lambda_value) + original * lambda_value
    return final


def _as_tensor(values, name: str) -> torch.Tensor:
    tensor = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.as_tensor(values)
    if tensor.dim() != 2:
        raise EvaluationError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    return tensor.detach()
