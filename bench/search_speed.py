"""Gallery search speed: one query (and a batch of queries) against 1M 512-d features on the CPU.

    python bench/search_speed.py                          # 1,000,000 x 512, k = 10, 2 threads
    python bench/search_speed.py --gallery 200000 --threads 1

Times kdreid.deploy.FeatureIndex (exact: gallery norms computed once, then one matrix product per gallery chunk
and a merged top-k) against the plain path of computing the full distance row with
kdreid.evaluation.distance.compute_distance_matrix and sorting it, and checks both return the same neighbours.
With faiss installed its flat (exact) index is timed too. The gallery needs 2 GB of memory per million 512-d
features. Target (issue 8): a query over 1M 512-d features well under a second on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdreid.deploy import FeatureIndex  # noqa: E402
from kdreid.evaluation.distance import compute_distance_matrix  # noqa: E402


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100, help="size of the query batch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"gallery {args.gallery:,} x {args.dim}, k={args.k}, {args.threads} threads; "
          f"load: {os.popen('uptime').read().strip()}")

    gen = torch.Generator().manual_seed(0)
    gallery = torch.randn(args.gallery, args.dim, generator=gen)
    queries = torch.randn(args.queries, args.dim, generator=gen)
    one = queries[:1]

    rows = []
    for metric in ("euclidean", "cosine"):
        build, index = best_time(lambda: FeatureIndex(gallery, metric, use_faiss=False), 1)
        single, (distances, indices) = best_time(lambda: index.search(one, args.k), args.repeats)
        batch, _ = best_time(lambda: index.search(queries, args.k), max(1, args.repeats // 2))
        plain, (plain_d, plain_i) = best_time(
            lambda: compute_distance_matrix(one, gallery, metric=metric).topk(args.k, dim=1, largest=False),
            args.repeats)
        assert torch.equal(indices, plain_i), "index and brute force disagree"
        rows.append((f"kdreid index, torch ({metric})", build, single, batch))
        rows.append((f"distance row + top-k ({metric})", 0.0, plain, float("nan")))
        try:
            import faiss  # noqa: F401

            build, fast = best_time(lambda: FeatureIndex(gallery, metric, use_faiss=True), 1)
            single, (_, fast_i) = best_time(lambda: fast.search(one, args.k), args.repeats)
            batch, _ = best_time(lambda: fast.search(queries, args.k), max(1, args.repeats // 2))
            assert torch.equal(fast_i, indices), "faiss and torch disagree"
            rows.append((f"faiss flat ({metric})", build, single, batch))
        except ImportError:
            pass

    print(f"\n{'search':<36} {'build s':>8} {'1 query ms':>11} {f'{args.queries} queries ms':>16} {'per query ms':>13}")
    for name, build, single, batch in rows:
        per_query = batch / args.queries * 1e3
        print(f"{name:<36} {build:>8.2f} {single * 1e3:>11.1f} {batch * 1e3:>16.1f} {per_query:>13.2f}")


if __name__ == "__main__":
    main()
