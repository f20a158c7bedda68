"""What D-MMD costs per adaptation step: the three terms with their backward pass (a teacher's step) against the
terms without a graph (what a control run, `--dmmd-weight 0`, computes to log them), side by side.

    python bench/dmmd_cost.py                      # CPU, batches of 32 and 64 (P x 4), 512- and 2048-d embeddings
    python bench/dmmd_cost.py --device cuda --repeats 200
    python bench/dmmd_cost.py --compiled           # also the terms through torch.compile (fused kernels), with backward

For a batch of N images there are N(N-1)/2 distance samples per domain, and each kernel block evaluates
(N(N-1)/2)^2 x 19 Gaussians: the cost grows with N^4. Eagerly each block is materialised 19 wide; compiled, the
19 Gaussians and their sum fuse into one pass (compilation, once per shape, is not in the timings).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a checkout, kdreid not installed

from kdreid.losses import dmmd_terms  # noqa: E402


def timed(step, repeats: int, device: torch.device) -> float:
    """Milliseconds per call, after two warm-up calls."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile of the terms")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"## D-MMD terms per step, {name}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'batch':>5} {'dim':>5} {'with backward (ms)':>19} {'no graph (ms)':>14} {'ratio':>6}"
    print(header + (f" {'compiled, with backward (ms)':>29} {'speed-up':>8}" if args.compiled else ""))
    for batch in args.batch_sizes:
        groups = torch.arange(batch // 4, device=device).repeat_interleave(4)
        for dim in args.dims:
            source = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
            target = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()

            def with_backward():
                sum(dmmd_terms(source, groups, target, groups).values()).backward()

            def no_graph():
                with torch.no_grad():
                    dmmd_terms(source, groups, target, groups)

            full, logged = timed(with_backward, args.repeats, device), timed(no_graph, args.repeats, device)
            row = f"{batch:>5} {dim:>5} {full:>19.1f} {logged:>14.1f} {full / logged:>5.2f}x"
            if args.compiled:
                compiled_terms = torch.compile(dmmd_terms)

                def compiled_with_backward():
                    sum(compiled_terms(source, groups, target, groups).values()).backward()

                fused = timed(compiled_with_backward, args.repeats, device)  # its warm-up calls compile
                row += f" {fused:>29.1f} {full / fused:>7.2f}x"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
