"""Operators dispatched per training step: kdreid's step (inside `fit`, data path included) against the bare model
step, counted with torch.profiler. On a GPU each top-level ATen operator is roughly one kernel launch, so for a
launch-bound model (OSNet x0.25) this says how much of the eager gap between the two is extra launches.

    python bench/step_ops.py                            # CPU, OSNet x0.25, batch 64 at 256x128 (about a minute)
    python bench/step_ops.py --arch resnet50 --device cuda

Construction, warm-up and the epoch's bookkeeping are removed by differencing two runs of different lengths.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_speed  # noqa: E402  (its paths are what this counts)


def top_level_ops(fn) -> collections.Counter:
    """ATen operators called by `fn` that no other ATen operator called (one dispatch each)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            counts[event.name] += 1
    return counts


def per_step(short: collections.Counter, long: collections.Counter, steps: int) -> dict[str, float]:
    return {name: (long[name] - short[name]) / steps for name in set(short) | set(long)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="osnet_x0_25")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="256x128")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--data", default=None, help="folder of the synthetic domains (generated there if absent)")
    options = parser.parse_args()

    args = train_speed.parse_args(["--device", options.device, "--size", options.size, "--batch", str(options.batch),
                                   "--models", options.arch, "--log-freq", "1000", "--workers", "2"])
    with tempfile.TemporaryDirectory(prefix="step_ops_") as work:
        count(options, args, Path(work))
    return 0


def count(options, args, work: Path) -> None:
    root = Path(options.data) if options.data else work / "data"
    train_speed.ensure_data(root, [train_speed.SOURCE], 0.05, args.workers, (args.height, args.width))
    dataset, records = train_speed.train_records(root)
    cache = train_speed.decode_images([r.path for r in records], args.height, args.width, workers=args.workers)
    if options.device.startswith("cuda"):
        cache = cache.to(options.device)

    def kdreid(steps: int) -> collections.Counter:  # fit runs two epochs of `steps`
        args.steps = steps
        return top_level_ops(lambda: train_speed.kdreid_speed(args, options.arch, records, cache, "off", work))

    def bare(steps: int) -> collections.Counter:  # one warm-up step, then `steps`
        args.steps, args.warmup = steps, 1
        return top_level_ops(lambda: train_speed.bare_speed(args, options.arch, dataset.num_train_pids))

    kd = per_step(kdreid(3), kdreid(6), 6)
    bare_ops = per_step(bare(3), bare(6), 3)
    print(f"{options.arch}, batch {args.batch} at {args.height}x{args.width}, {options.device}: top-level ATen "
          f"operators a step: kdreid {sum(kd.values()):,.0f}, bare step {sum(bare_ops.values()):,.0f}")
    excess = sorted(((kd.get(n, 0) - bare_ops.get(n, 0), n) for n in set(kd) | set(bare_ops)), reverse=True)
    print("kdreid's most frequent extra operators:", ", ".join(f"{n} {v:+.0f}" for v, n in excess[:10] if v > 0))


if __name__ == "__main__":
    sys.exit(main())
