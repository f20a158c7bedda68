"""Throughput of the synthetic generator, JPEG writing included: images per second.

    .venv/bin/python bench/synth_speed.py [--domain synth_market] [--scale 0.1] [--size 128x64] [--workers 1 2]

Issue 2's bar: >= 100 images/s on 2 cores at 128x64. Every file a domain writes counts (train, query, gallery,
distractors, junk); the plan, manifest, truth.json and contact sheet are included in the time. Besides wall-clock
images/s it prints images per CPU-second (this process and its workers), which does not depend on what else the
machine is running.
"""


from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from kdreid.data.synthetic import generate, parse_size


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="synth_market")
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--size", default="128x64")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.domain} at --scale {args.scale}, {args.size}, {os.cpu_count()} CPU cores visible")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as out:
            started, cpu_started = time.perf_counter(), cpu_seconds()
            (summary,) = generate(out, [args.domain], scale=args.scale, seed=args.seed, size=parse_size(args.size),
                                  workers=workers)
            seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        rate = summary.images / seconds
        print(f"workers={workers}: {summary.images} images in {seconds:.1f} s = {rate:.0f} images/s "
              f"({summary.images / cpu:.0f} images per CPU-second)")


if __name__ == "__main__":
    main()
