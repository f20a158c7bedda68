"""CMC, mAP and mINP from a query-gallery distance matrix (market and cuhk03 protocols).

The numbers are torchreid's (`eval_market1501`, `eval_cuhk03` in `torchreid/reid/metrics/rank.py`): for each
query, gallery images of the same identity *and* the same camera are dropped ("junk"), queries left without a
true match are skipped, CMC and AP are averaged over the rest. Identity 0 (Market's distractors) gets no special
treatment: it is just another identity, as in torchreid.

How it is computed without a per-query argsort. The only ranks that matter are those of the true matches, and
the rank of a match among the kept gallery items is

    rank_k = #{kept items with distance <= d_k}
           = #{all items <= d_k}  -  #{junk items <= d_k}

Each query row is sorted by value (a SIMD value sort, no indices), then the few match distances are looked up in
it with `searchsorted`; the matches and junk of a query are the gallery images of its own identity, found through
the gallery grouped by identity, so they are a handful of gathers per query. Everything else is O(G) per query.

Ties. torchreid's `np.argsort` orders tied distances arbitrarily; here a tie is resolved *against* the query: a
non-match tied with a match ranks before it, and tied matches rank after everything else at that distance. A
degenerate model (all distances equal) therefore scores the minimum, never a lucky order.

cuhk03 protocol (single gallery shot): for each query and each of `num_repeats` (10) repeats, one kept image is
drawn uniformly for each gallery identity, and the CMC is that of the sampled list; mAP and mINP are computed on
the full kept list, as torchreid does. The draws come from a local `np.random.default_rng(seed)` (seed 0 by
default), `rng.random((num_queries, num_repeats, num_gallery_ids))` in query order (gallery ids ascending): the
image taken for identity p is its `floor(u * n_p)`-th kept image in gallery order. Results are therefore
reproducible and independent of chunking and device, but not draw-for-draw equal to torchreid's (which uses the
global NumPy generator).
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from kdreid.errors import EvaluationError

PROTOCOLS = ("market", "cuhk03")
CUHK03_REPEATS = 10  # torchreid's num_repeats
CUHK03_SEED = 0

# Elements of the distance matrix handled per chunk of query rows: a CPU chunk stays cache-friendly; a GPU chunk
# (sort keeps values + int64 indices, ~20 bytes an element) stays near 1 GB, so MSMT17 (11,659 x 82,161) fits.
_CPU_CHUNK_ELEMENTS = 1 << 22
_CUDA_CHUNK_ELEMENTS = 1 << 26
# Bytes a chunk holds per distance while it is ranked: NumPy's sorted copy and the NaN mask on the CPU (9 measured
# at Market size); torch.sort's values and int64 indices on CUDA.
_CPU_BYTES_PER_DISTANCE = 12
_CUDA_BYTES_PER_DISTANCE = 20


class EvaluationWarning(UserWarning):
    """Some (or all) queries have no true match from another camera and were skipped."""


# The CMC ranks every results table shows (as the re-ID papers' tables), and the tables' columns: (title, key
# of `RankResult.summary()` and of metrics.json).
CMC_RANKS = (1, 5, 10, 20)
METRIC_COLUMNS = (("mAP", "mAP"), *((f"R{r}", f"rank{r}") for r in CMC_RANKS), ("mINP", "mINP"))


@contextlib.contextmanager
def evaluation_warnings_to(say: Callable[[str], None]) -> Iterator[None]:
    """Inside, each EvaluationWarning (queries skipped for want of a true match...) goes to `say` as its bare
    message, for the caller to name its dataset, instead of Python's warning line with a source path; any other
    warning passes on as it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", EvaluationWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, EvaluationWarning):
            say(str(warning.message))
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@dataclass
class RankResult:
    """Ranking metrics as fractions in [0, 1] (tables show percent).

    cmc: (R,) with R = min(max_rank, num_gallery); cmc[r] = fraction of valid queries whose first true match is
    within the top r+1. NaN everywhere (and mAP, mINP NaN) when no query is valid.
    """

    cmc: np.ndarray
    mAP: float
    mINP: float
    num_valid_queries: int
    num_queries: int
    # Positive/negative pair histograms, when asked for (kdreid.evaluation.verification.VerificationResult).
    verification: object | None = None

    def rank(self, r: int) -> float:
        """CMC at rank r (1-based), as a fraction; the last entry when the gallery is shorter than r."""
        return float(self.cmc[min(r, len(self.cmc)) - 1])

    def summary(self) -> dict[str, float]:
        """mAP, CMC at `CMC_RANKS` and mINP in percent, the shape of `metrics.json` (the keys of `METRIC_COLUMNS`)."""
        return {
            "mAP": 100.0 * self.mAP,
            **{f"rank{r}": 100.0 * self.rank(r) for r in CMC_RANKS},
            "mINP": 100.0 * self.mINP,
        }


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, use_metric_cuhk03: bool = False,
                  use_cython: bool = True):
    """torchreid's `evaluate_rank`, a drop-in: its signature (`use_cython` is accepted and has nothing to choose
    here) and its return, `(cmc, mAP)`; see `evaluate` for everything else."""
    result = evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank,
                      protocol="cuhk03" if use_metric_cuhk03 else "market")
    return result.cmc, result.mAP


def evaluate(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank: int = 50,
    protocol: str = "market",
    *,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    seed: int = CUHK03_SEED,
    num_repeats: int = CUHK03_REPEATS,
) -> RankResult:
    """Rank every query against the gallery and return CMC, mAP and mINP.

    distmat: (Q, G) numpy array or torch tensor, smaller = more similar. float64 input is kept in float64,
        anything else is computed in float32. A CUDA tensor is evaluated where it is.
    device: where to compute; default: the tensor's device, else CUDA when available, else CPU. Rows move to it
        one chunk at a time, so a host matrix never needs to fit on the GPU at once.
    chunk_size: query rows per chunk (default: ~4M elements on CPU, ~64M on CUDA); results do not depend on it.
    seed, num_repeats: the cuhk03 protocol's sampling (see the module docstring).
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if max_rank < 1:
        raise EvaluationError(f"max_rank must be at least 1, got {max_rank}")
    distmat = _as_float_tensor(distmat)
    q_pids, g_pids, q_camids, g_camids = (_as_int_array(a, name) for a, name in (
        (q_pids, "q_pids"), (g_pids, "g_pids"), (q_camids, "q_camids"), (g_camids, "g_camids")))
    num_q, num_g = distmat.shape
    if num_q == 0:
        raise EvaluationError("empty query set: the distance matrix has no rows; check the query split of the dataset")
    if num_g == 0:
        raise EvaluationError("empty gallery: the distance matrix has no columns; check the gallery split")
    for name, values, expected in (("q_pids", q_pids, num_q), ("q_camids", q_camids, num_q),
                                   ("g_pids", g_pids, num_g), ("g_camids", g_camids, num_g)):
        if len(values) != expected:
            raise EvaluationError(
                f"{name} has {len(values)} entries but the distance matrix is {num_q} x {num_g}; "
                "pass one pid and one camid per query row and per gallery column")

    if device is None:
        device = distmat.device if distmat.is_cuda else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if chunk_size is None:
        chunk_size = _default_chunk_size(num_g, device)
    gallery = _GalleryIndex(g_pids, g_camids, device)
    max_rank = min(max_rank, num_g)

    q_pids_t = torch.from_numpy(q_pids).to(device)
    q_camids_t = torch.from_numpy(q_camids).to(device)
    starts = range(0, num_q, chunk_size)

    def run_chunk(start: int) -> _ChunkResult:
        stop = min(start + chunk_size, num_q)
        rows = distmat[start:stop].to(device, non_blocking=True)
        if torch.isnan(rows).any():
            first = start + int(torch.isnan(rows).any(dim=1).nonzero()[0])
            raise EvaluationError(f"the distance matrix holds NaN (first in query row {first}); check the features")
        return _rank_chunk(rows, q_pids_t[start:stop], q_camids_t[start:stop], gallery)

    workers = _chunks_at_once(len(starts), device)
    if workers > 1:
        # NumPy's sort releases the GIL: one chunk per core runs the O(Q*G) part in parallel.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            chunks = list(pool.map(run_chunk, starts))
    else:
        chunks = [run_chunk(start) for start in starts]
    ranks = _ChunkResult.cat(chunks)

    valid = ranks.num_matches > 0
    num_valid = int(valid.sum())
    _warn_skipped(num_q, num_valid)
    if num_valid == 0:
        nan = float("nan")
        return RankResult(np.full(max_rank, nan), nan, nan, 0, num_q)

    if protocol == "market":
        first = ranks.first_rank[valid]
        # cmc[r] = #queries with first match at rank <= r+1; ranks beyond max_rank fall into one overflow bin.
        hits = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
        cmc = np.cumsum(hits) / num_valid
    else:
        cmc = _cuhk03_cmc(distmat, q_pids, q_camids, gallery, valid, max_rank, device, chunk_size, seed, num_repeats)
    mean_ap = float(ranks.average_precision[valid].astype(np.float64).mean())
    mean_inp = float((ranks.num_matches[valid] / ranks.last_rank[valid]).mean())
    return RankResult(cmc.astype(np.float64), mean_ap, mean_inp, num_valid, num_q)


def ranked_order(distances: torch.Tensor, is_match: torch.Tensor) -> torch.Tensor:
    """Indices of one query's gallery items nearest first, in the order `evaluate` counts them: ties resolved
    against the query (a non-match before a tied match), otherwise gallery order. distances, is_match: (G,)."""
    non_matches_first = torch.argsort(is_match.to(torch.uint8), stable=True)
    return non_matches_first[torch.argsort(distances[non_matches_first], stable=True)]


# ------------------------------------------------------------------------------------------------ internals
class _GalleryIndex:
    """The gallery grouped by identity: group p holds the gallery indices of `ids[p]` in gallery order."""

    def __init__(self, g_pids: np.ndarray, g_camids: np.ndarray, device: torch.device):
        order = np.argsort(g_pids, kind="stable")
        ids, starts, counts = np.unique(g_pids[order], return_index=True, return_counts=True)
        self.device = device
        self.ids = torch.from_numpy(ids).to(device)  # (P,) ascending
        self.starts = torch.from_numpy(starts).to(device)  # (P,)
        self.counts = torch.from_numpy(counts).to(device)  # (P,)
        self.order = torch.from_numpy(order).to(device)  # (G,) gallery indices grouped by identity
        self.camids = torch.from_numpy(g_camids).to(device)  # (G,)

    def own_identity(self, q_pids: torch.Tensor):
        """For each query, its identity's group: (C,) start, count (0 when absent from the gallery)."""
        group = torch.searchsorted(self.ids, q_pids).clamp_(max=len(self.ids) - 1)
        present = self.ids[group] == q_pids
        return self.starts[group], torch.where(present, self.counts[group], torch.zeros_like(group))


@dataclass
class _ChunkResult:
    num_matches: np.ndarray  # (C,) true matches (same identity, other camera)
    first_rank: np.ndarray  # (C,) 1-based rank of the first match among kept items (0 when none)
    last_rank: np.ndarray  # (C,) 1-based rank of the hardest match (mINP)
    average_precision: np.ndarray  # (C,) float32

    @staticmethod
    def cat(chunks: list[_ChunkResult]) -> _ChunkResult:
        return _ChunkResult(*(np.concatenate([getattr(c, f) for c in chunks]) for f in
                              ("num_matches", "first_rank", "last_rank", "average_precision")))


def _same_identity(rows: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, gallery: _GalleryIndex):
    """Gallery images of each query's own identity: (C, S) gallery indices, is-match and is-junk masks."""
    start, count = gallery.own_identity(q_pids)
    width = max(int(count.max()), 1)
    slot = torch.arange(width, device=rows.device)
    in_group = slot[None, :] < count[:, None]  # (C, S)
    members = gallery.order[(start[:, None] + slot[None, :]).clamp_(max=len(gallery.order) - 1)]  # (C, S)
    same_camera = gallery.camids[members] == q_camids[:, None]
    return members, in_group & ~same_camera, in_group & same_camera


def ranking_memory(num_q: int, num_g: int, device: torch.device) -> int:
    """Bytes `evaluate` takes beside the distance matrix on `device` (its default chunks): the chunks ranked at once."""
    chunk_size = min(_default_chunk_size(num_g, device), num_q)
    at_once = _chunks_at_once(-(-num_q // chunk_size), device)
    per_distance = _CUDA_BYTES_PER_DISTANCE if device.type == "cuda" else _CPU_BYTES_PER_DISTANCE
    return at_once * chunk_size * num_g * per_distance


def _default_chunk_size(num_g: int, device: torch.device) -> int:
    return max(1, (_CUDA_CHUNK_ELEMENTS if device.type == "cuda" else _CPU_CHUNK_ELEMENTS) // num_g)


def _chunks_at_once(num_chunks: int, device: torch.device) -> int:
    """CPU chunks run one per thread (NumPy's sort releases the GIL); CUDA ones one after another."""
    if device.type != "cpu" or num_chunks < 2:
        return 1
    return min(num_chunks, torch.get_num_threads())


def _sorted_values(rows: torch.Tensor) -> torch.Tensor:
    if rows.device.type == "cpu":
        # NumPy's value sort is SIMD (x86-simd-sort) and several times faster than torch.sort on CPU.
        return torch.from_numpy(np.sort(rows.numpy(), axis=1))
    return torch.sort(rows, dim=1).values


def _rank_chunk(rows: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor, gallery: _GalleryIndex):
    """Ranks of the true matches of C queries. rows: (C, G) distances."""
    inf = torch.tensor(float("inf"), dtype=rows.dtype, device=rows.device)
    members, is_match, is_junk = _same_identity(rows, q_pids, q_camids, gallery)
    member_dist = rows.gather(1, members)  # (C, S)
    match_dist = torch.where(is_match, member_dist, inf).sort(dim=1).values  # (C, S), real matches first
    junk_dist = torch.where(is_junk, member_dist, inf).sort(dim=1).values
    num_matches = is_match.sum(1)  # (C,)
    num_junk = is_junk.sum(1)

    sorted_rows = _sorted_values(rows)  # (C, G)
    all_le = torch.searchsorted(sorted_rows, match_dist, right=True)  # (C, S) items with distance <= d_k
    # Padding (inf) in junk_dist must not count, even against a match at inf: clamp to the real junk.
    junk_le = torch.minimum(torch.searchsorted(junk_dist, match_dist, right=True), num_junk[:, None])
    kept_le = all_le - junk_le
    # Ties among matches: the k-th of a tied group ranks (last - k) places before the group's end.
    last_tied = torch.minimum(torch.searchsorted(match_dist, match_dist, right=True), num_matches[:, None]) - 1
    slot = torch.arange(match_dist.shape[1], device=rows.device)
    rank = kept_le - (last_tied - slot[None, :])  # (C, S) 1-based rank of the k-th match among kept items
    is_real = slot[None, :] < num_matches[:, None]

    precision = torch.where(is_real, (slot[None, :] + 1).to(torch.float32) / rank.clamp(min=1), 0.0)
    average_precision = precision.sum(1) / num_matches.clamp(min=1)
    last = (num_matches - 1).clamp(min=0)
    return _ChunkResult(
        num_matches=num_matches.cpu().numpy(),
        first_rank=torch.where(num_matches > 0, rank[:, 0], 0).cpu().numpy(),
        last_rank=torch.where(num_matches > 0, rank.gather(1, last[:, None])[:, 0], 1).cpu().numpy(),
        average_precision=average_precision.cpu().numpy(),
    )


def _cuhk03_cmc(distmat, q_pids, q_camids, gallery: _GalleryIndex, valid, max_rank, device, chunk_size, seed,
                num_repeats) -> np.ndarray:
    """Single-gallery-shot CMC: mean over repeats and valid queries of [rank in the sampled list <= r]."""
    rng = np.random.default_rng(seed)
    num_q = distmat.shape[0]
    num_ids = len(gallery.ids)
    hits = np.zeros(max_rank + 1, dtype=np.int64)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        # Drawn for every query, valid or not, so the stream does not depend on chunking.
        draws = torch.from_numpy(rng.random((stop - start, num_repeats, num_ids))).to(device)  # (C, R, P)
        keep_rows = torch.from_numpy(valid[start:stop]).to(device)
        if not bool(keep_rows.any()):
            continue
        rows = distmat[start:stop].to(device)[keep_rows]  # (C', G)
        draws = draws[keep_rows]
        chunk_pids = torch.from_numpy(q_pids[start:stop]).to(device)[keep_rows]
        chunk_cams = torch.from_numpy(q_camids[start:stop]).to(device)[keep_rows]

        # One image per identity: the floor(u * n_p)-th of the group (all images kept for other identities).
        pick = torch.minimum((draws * gallery.counts.to(draws.dtype)).floor().long(), gallery.counts - 1)
        picked = gallery.order[gallery.starts + pick]  # (C', R, P) gallery indices
        picked_dist = rows.gather(1, picked.flatten(1)).view_as(picked)

        # The query's own identity: the floor(u * n)-th *match* (junk excluded), in gallery order.
        members, is_match, _ = _same_identity(rows, chunk_pids, chunk_cams, gallery)
        own = torch.searchsorted(gallery.ids, chunk_pids)  # (C',) valid queries have their id in the gallery
        own_u = draws.gather(2, own[:, None, None].expand(-1, num_repeats, 1))[:, :, 0]  # (C', R)
        num_matches = is_match.sum(1, keepdim=True)
        nth = torch.minimum((own_u * num_matches).floor().long(), num_matches - 1)  # (C', R) 0-based
        match_slot = torch.searchsorted(is_match.long().cumsum(1), nth + 1)  # (C', R) slot of the nth match
        own_dist = rows.gather(1, members.gather(1, match_slot))  # (C', R)

        others = torch.arange(num_ids, device=device)[None, None, :] != own[:, None, None]
        # Ties against the query, as in the market protocol.
        rank = 1 + ((picked_dist <= own_dist[:, :, None]) & others).sum(2)  # (C', R) 1-based
        hits += np.bincount(np.minimum(rank.flatten().cpu().numpy(), max_rank + 1) - 1, minlength=max_rank + 1)
    return np.cumsum(hits[:max_rank]) / (int(valid.sum()) * num_repeats)


def _warn_skipped(num_queries: int, num_valid: int) -> None:
    skipped = num_queries - num_valid
    if num_valid == 0:
        warnings.warn(
            f"none of the {num_queries} queries has a true match in the gallery from another camera; all were "
            "skipped and the metrics are NaN (check that query and gallery share identities across cameras)",
            EvaluationWarning, stacklevel=3)
    elif skipped:
        warnings.warn(
            f"{skipped} of {num_queries} queries have no true match in the gallery from another camera and were "
            "skipped (as torchreid does)", EvaluationWarning, stacklevel=3)


def _as_float_tensor(distmat) -> torch.Tensor:
    if isinstance(distmat, np.ndarray):
        distmat = torch.from_numpy(distmat)
    elif not isinstance(distmat, torch.Tensor):
        distmat = torch.as_tensor(np.asarray(distmat))
    if distmat.dim() != 2:
        raise EvaluationError(f"the distance matrix must be 2-D (queries x gallery), got shape {tuple(distmat.shape)}")
    distmat = distmat.detach()
    if distmat.dtype != torch.float64:
        distmat = distmat.to(torch.float32)
    return distmat if distmat.is_cuda else distmat.contiguous()


def _as_int_array(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise EvaluationError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.number):  # e.g. string ids: one line, not a TypeError
        raise EvaluationError(f"{name} must hold integers (identity / camera numbers), got dtype {array.dtype}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise EvaluationError(f"{name} must hold integers (identity / camera numbers), got dtype {array.dtype}")
    return array.astype(np.int64)
