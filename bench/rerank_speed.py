"""k-reciprocal re-ranking: time and peak extra memory, from distance matrices and from features.

    python bench/rerank_speed.py                          # Market size (3,368 x 15,913, 512-d), 2 threads
    python bench/rerank_speed.py --sizes small --torchreid  # + torchreid's re_ranking on a small problem

Extra memory is the peak resident set during the call minus the resident set before it (Linux: VmHWM after
resetting it through /proc/self/clear_refs); it includes the (Q, G) float32 result (214 MB at Market size) but not
the inputs. torchreid's version (DESIGN §7: 72 s and 8.9 GB at Market size on 2 cores) holds dense N x N matrices;
it is run here only on request (--torchreid), and at Market size only with --torchreid-market.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdreid.evaluation.distance import compute_distance_matrix  # noqa: E402
from kdreid.evaluation.rerank import re_ranking, re_ranking_features  # noqa: E402

SIZES = {"market": (3368, 15913), "small": (800, 3000), "tiny": (200, 800)}
DIM = 512


def features(num_q: int, num_g: int, seed: int = 0):
    """Identities as clusters (~20 images each), so the neighbourhoods are those of a trained model."""
    rng = np.random.default_rng(seed)
    num_ids = max(2, (num_q + num_g) // 20)
    centres = rng.normal(size=(num_ids, DIM)).astype(np.float32)
    qf = centres[rng.integers(0, num_ids, num_q)] + 0.8 * rng.normal(size=(num_q, DIM)).astype(np.float32)
    gf = centres[rng.integers(0, num_ids, num_g)] + 0.8 * rng.normal(size=(num_g, DIM)).astype(np.float32)
    return torch.from_numpy(qf), torch.from_numpy(gf)


def _status_mb(key: str) -> float | None:
    try:
        match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(match.group(1)) / 1024 if match else None


def measure(fn, cuda: bool):
    """(seconds, extra peak MB, result)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
        before = _status_mb("VmRSS")
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak = _status_mb("VmHWM")
        extra = peak - before if peak is not None and before is not None else float("nan")
    return seconds, extra, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["market"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--torchreid", action="store_true", help="also run torchreid's re_ranking (not at Market size)")
    parser.add_argument("--torchreid-market", action="store_true", help="run torchreid's at Market size too (~9 GB)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(device) if cuda else f'CPU, {args.threads} threads'}")

    for size in args.sizes:
        num_q, num_g = SIZES[size]
        qf, gf = (x.to(device) for x in features(num_q, num_g))
        print(f"\n{size} size: {num_q} queries x {num_g} gallery, {DIM}-d features")
        seconds, extra, from_features = measure(lambda: re_ranking_features(qf, gf), cuda)
        print(f"  kdreid re_ranking_features  {seconds:8.2f} s   extra peak {extra:8.0f} MB")
        q_g, q_q, g_g = (compute_distance_matrix(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf)))
        q_q, g_g = (q_q + q_q.T) / 2, (g_g + g_g.T) / 2  # exactly symmetric, as torchreid's reading assumes
        print(f"  (input matrices: {sum(m.numel() for m in (q_g, q_q, g_g)) * 4 / 2**20:.0f} MB)")
        seconds, extra, from_matrices = measure(lambda: re_ranking(q_g, q_q, g_g), cuda)
        print(f"  kdreid re_ranking (matrices) {seconds:7.2f} s   extra peak {extra:8.0f} MB")
        print(f"  features vs matrices: max |diff| {float((from_features - from_matrices).abs().max()):.1e}")
        if args.torchreid and (size != "market" or args.torchreid_market):
            from tests.reference import load_torchreid_module

            reference = load_torchreid_module("torchreid/reid/utils/rerank.py")
            host = [m.cpu().numpy() for m in (q_g, q_q, g_g)]
            seconds_ref, extra_ref, expected = measure(lambda: reference.re_ranking(*host), False)
            diff = float(np.abs(expected - from_matrices.cpu().numpy()).max())
            print(f"  torchreid re_ranking         {seconds_ref:7.2f} s   extra peak {extra_ref:8.0f} MB")
            print(f"  max |ours - torchreid| {diff:.1e}; speed-up {seconds_ref / seconds:.1f}x")
        elif size == "market":
            print("  torchreid re_ranking: not run at Market size (quoted: 72 s, 8.9 GB on 2 cores); "
                  "--torchreid-market runs it")


if __name__ == "__main__":
    main()
