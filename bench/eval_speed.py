"""Ranking speed: kdreid's evaluator against torchreid's Python evaluator on the same random distance matrices.

    python bench/eval_speed.py                       # Market size (3,368 x 15,913), 2 threads
    python bench/eval_speed.py --sizes market msmt   # + MSMT17 size (11,659 x 82,161; needs ~4 GB per matrix)

torchreid's Cython evaluator is not on PyPI; its figures (DESIGN §7) are quoted for reference: 5.3 s at Market
size on 2 CPU cores, 47 s at MSMT17 size on an H100 machine. Its Python evaluator (`evaluate_py`, loaded from the
sdist in .cache/reference/) runs here on the same matrices, and the numbers are checked to agree. At MSMT17 size
the Python evaluator takes many minutes on a CPU, so it is skipped unless --torchreid-msmt is given.
On CUDA, ours is timed from a matrix already on the GPU and from host features (distances + ranking). The cost
of `kdreid evaluate --verification` (pair histograms, ROC, TPR at FPR) is timed on the same matrix, as a ratio to
the ranking's, and so is `--aqe` (alpha query expansion of query and gallery features, 512-d and 2048-d: OSNet's
and ResNet-50's widths), which runs before the distances.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdreid.evaluation import evaluate  # noqa: E402
from kdreid.evaluation.distance import compute_distance_matrix  # noqa: E402
from kdreid.evaluation.query_expansion import alpha_query_expansion  # noqa: E402
from kdreid.evaluation.verification import verification_statistics  # noqa: E402

SIZES = {
    # name: (queries, gallery, identities, cameras, distractors in the gallery)
    "market": (3368, 15913, 750, 6, 2798),
    "msmt": (11659, 82161, 3060, 15, 0),
}
CYTHON_SECONDS = {"market": "5.3 s (2 CPU cores)", "msmt": "47 s (H100 machine)"}


def make_problem(name: str, seed: int = 0):
    num_q, num_g, num_ids, num_cams, distractors = SIZES[name]
    rng = np.random.default_rng(seed)
    # Each row a random order of distinct values: float32 random numbers would tie (24-bit mantissa), and with
    # ties torchreid's order is arbitrary while ours ranks them against the query.
    distmat = rng.permuted(np.broadcast_to(np.arange(num_g, dtype=np.float32), (num_q, num_g)), axis=1)
    distmat /= num_g
    q_pids = rng.integers(1, num_ids + 1, num_q)
    g_pids = rng.integers(1, num_ids + 1, num_g)
    g_pids[:distractors] = 0
    q_camids = rng.integers(1, num_cams + 1, num_q)
    g_camids = rng.integers(1, num_cams + 1, num_g)
    return distmat, q_pids, g_pids, q_camids, g_camids


def timed(fn, repeats: int, cuda: bool):
    best, result = float("inf"), None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=None,
                        help="default: market, plus msmt when CUDA is available")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch and the chunk pool)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours; the best is reported")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--no-torchreid", action="store_true", help="skip torchreid's Python evaluator")
    parser.add_argument("--torchreid-msmt", action="store_true", help="run torchreid's evaluator at MSMT17 size too")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    sizes = args.sizes or (["market", "msmt"] if cuda else ["market"])
    reference = None
    if not args.no_torchreid:
        from tests.reference import load_torchreid_module

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = load_torchreid_module("torchreid/reid/metrics/rank.py")
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}")

    for size in sizes:
        distmat, q_pids, g_pids, q_camids, g_camids = make_problem(size)
        num_q, num_g = distmat.shape
        print(f"\n{size} size: {num_q} x {num_g}")
        source = torch.from_numpy(distmat).to(device) if cuda else distmat
        ours_s, ours = timed(lambda: evaluate(source, q_pids, g_pids, q_camids, g_camids, device=device),
                             args.repeats, cuda)
        where = "from a GPU matrix" if cuda else "from a host matrix"
        print(f"  kdreid            {ours_s:8.3f} s  {where}   mAP {ours.mAP:.6f}  R1 {ours.cmc[0]:.6f}  "
              f"mINP {ours.mINP:.6f}")
        verify_s, verified = timed(lambda: verification_statistics(source, q_pids, g_pids, q_camids, g_camids),
                                   args.repeats, cuda)
        print(f"  kdreid --verification {verify_s:8.3f} s  ({verify_s / ours_s:.2f}x the ranking; "
              f"{verified.num_positive:,} positive, {verified.num_negative:,} negative pairs, AUC {verified.auc():.4f})")
        rng = np.random.default_rng(2)
        for dim in (512, 2048):
            qf = torch.from_numpy(rng.normal(size=(num_q, dim)).astype(np.float32)).to(device)
            gf = torch.from_numpy(rng.normal(size=(num_g, dim)).astype(np.float32)).to(device)
            aqe_s, _ = timed(lambda: alpha_query_expansion(qf, gf), args.repeats, cuda)
            print(f"  kdreid --aqe      {aqe_s:8.3f} s  ({aqe_s / ours_s:.2f}x the ranking; {dim}-d features, k 5)")
            del qf, gf
        if cuda:
            # From host features: distances on the GPU, then ranking.
            dim = 512
            rng = np.random.default_rng(1)
            qf = torch.from_numpy(rng.normal(size=(num_q, dim)).astype(np.float32))
            gf = torch.from_numpy(rng.normal(size=(num_g, dim)).astype(np.float32))
            host_s, _ = timed(lambda: evaluate(compute_distance_matrix(qf.to(device), gf.to(device)), q_pids, g_pids,
                                               q_camids, g_camids, device=device), args.repeats, cuda)
            print(f"  kdreid            {host_s:8.3f} s  from host features ({dim}-d, distances included)")
            del source
            torch.cuda.empty_cache()
        print(f"  torchreid Cython  (quoted) {CYTHON_SECONDS[size]}")
        if reference is None:
            continue
        if size == "msmt" and not args.torchreid_msmt:
            print("  torchreid Python  skipped at MSMT17 size (many minutes on a CPU; pass --torchreid-msmt)")
            continue
        start = time.perf_counter()
        ref_cmc, ref_map = reference.evaluate_py(distmat, q_pids, g_pids, q_camids, g_camids, 50, False)
        ref_s = time.perf_counter() - start
        cmc_diff = float(np.abs(ref_cmc - ours.cmc).max())
        map_diff = abs(float(ref_map) - ours.mAP)
        agree = cmc_diff < 1e-6 and map_diff < 1e-6
        print(f"  torchreid Python  {ref_s:8.3f} s                     mAP {ref_map:.6f}  R1 {ref_cmc[0]:.6f}")
        print(f"  speed-up over torchreid Python: {ref_s / ours_s:.1f}x; numbers agree: {agree} "
              f"(max |cmc diff| {cmc_diff:.1e}, |mAP diff| {map_diff:.1e})")
        if not agree:
            sys.exit(1)


if __name__ == "__main__":
    main()
