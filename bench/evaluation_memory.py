"""Peak extra memory of an evaluation (`evaluate_features`, CPU) against the estimate its one-line refusal uses.

    python bench/evaluation_memory.py                     # Market size (3,368 x 15,913), 512- and 2048-d
    python bench/evaluation_memory.py --sizes wide --rerank-only

Each case runs in its own process twice: with glibc's defaults, and with a fixed mmap threshold
(MALLOC_MMAP_THRESHOLD_=65536), under which freed buffers go back to the system at once, so the peak is that of the
live tensors. `evaluation_memory` estimates the live peak; glibc's default heap may keep more of what was freed
(re-ranking's many chunk-sized buffers), which the estimate does not predict. Extra memory is the peak resident set
(VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call, the features already held.
Random features: re-ranking's sparse V is largest for them (~75 non-zeros a row against ~20 for clustered ones).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdreid.evaluation.features import Features, evaluate_features, evaluation_memory  # noqa: E402

SIZES = {"market": (3368, 15913), "wide": (500, 40000), "small": (800, 3000)}
# (metric, normalize, rerank)
CASES = (("euclidean", False, False), ("cosine", True, False), ("euclidean", False, True), ("cosine", True, True))


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(num_q: int, num_g: int, dim: int, metric: str, normalize: bool, rerank: bool) -> int:
    """Peak extra resident bytes of one evaluate_features call on the CPU (Linux only)."""
    generator = torch.Generator().manual_seed(0)

    def features(count: int) -> Features:
        return Features(torch.randn(count, dim, generator=generator), torch.randint(0, 700, (count,)),
                        torch.randint(0, 6, (count,)), [""] * count)

    query, gallery = features(num_q), features(num_g)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current resident set
    before = _status_bytes("VmRSS")
    evaluate_features(query, gallery, metric=metric, normalize=normalize, rerank=rerank, device="cpu")
    return _status_bytes("VmHWM") - before


def _child(args: list[str]) -> None:
    """Prints the peak and the estimate, this process's thread count being the one both use."""
    num_q, num_g, dim = (int(value) for value in args[:3])
    metric, normalize, rerank = args[3], args[4] == "1", args[5] == "1"
    peak = measure(num_q, num_g, dim, metric, normalize, rerank)
    estimate = evaluation_memory(num_q, num_g, dim, torch.device("cpu"), metric=metric, normalize=normalize,
                                 rerank=rerank)
    print(peak, estimate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["market"])
    parser.add_argument("--dims", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rerank-only", action="store_true")
    args = parser.parse_args()
    print(f"{'case':<44} {'estimate':>9} {'live peak':>10} {'est/live':>9} {'glibc default':>14}")
    for size in args.sizes:
        num_q, num_g = SIZES[size]
        for dim in args.dims:
            for metric, normalize, rerank in CASES:
                if args.rerank_only and not rerank:
                    continue
                case = [str(num_q), str(num_g), str(dim), metric, str(int(normalize)), str(int(rerank))]
                peaks = []
                for extra_env in ({"MALLOC_MMAP_THRESHOLD_": "65536"}, {}):
                    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": str(args.threads)}
                    out = subprocess.run([sys.executable, __file__, "--child", *case], env=env, check=True,
                                         capture_output=True, text=True).stdout
                    peak, estimate = (int(value) for value in out.split()[-2:])
                    peaks.append(peak)
                name = (f"{num_q}x{num_g} {dim}-d {metric}{' normalized' if normalize else ''}"
                        f"{' rerank' if rerank else ''}")
                print(f"{name:<44} {estimate / 1e9:>7.3f}GB {peaks[0] / 1e9:>8.3f}GB {estimate / peaks[0]:>9.2f} "
                      f"{peaks[1] / 1e9:>12.3f}GB", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main()
