"""How many of D-MMD's within-class pairs would be two copies of one image, when a target is grouped by tracklet.

    python bench/tracklet_copies.py [--scale 1.0] [-p 8] [-k 4]

A group with fewer than K images repeats some in its P×K chunk (drawn with replacement, as torchreid's sampler
does), and tracklets are small. For each synthetic domain (planned, not rendered: seconds) this runs one epoch of
the P×K sampler over the training tracklets and counts, among the same-group pairs of its batches, those of two
copies of one image: the pairs `kdreid.losses.dmmd_terms` leaves out when told which image each row is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kdreid.data.samplers import PKSampler  # noqa: E402
from kdreid.data.synthetic.domains import DOMAIN_NAMES  # noqa: E402
from kdreid.data.synthetic.generate import build_domain  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="domain size (1.0: Market-1501's 12,936 images)")
    parser.add_argument("-p", type=int, default=8, help="groups per batch")
    parser.add_argument("-k", type=int, default=4, help="images per group")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"one epoch of {args.p}x{args.k} batches by tracklet, training images of each domain at scale {args.scale}")
    for name in DOMAIN_NAMES:
        plan = build_domain(name, scale=args.scale, seed=args.seed).plan
        tracklets = plan.tracklet[(plan.split == 0) & (plan.pid > 0)]
        sizes = np.unique(tracklets, return_counts=True)[1]
        copies = pairs = 0
        for batch in PKSampler(tracklets, args.p * args.k, args.k, seed=args.seed, what="tracklets"):
            for chunk in np.asarray(batch).reshape(-1, args.k):
                first, second = np.triu_indices(args.k, 1)
                pairs += len(first)
                copies += int((chunk[first] == chunk[second]).sum())
        print(f"{name}: {len(tracklets)} images, {len(sizes)} tracklets (median {np.median(sizes):.0f} images, "
              f"{(sizes < args.k).mean():.0%} under K, {(sizes == 1).mean():.0%} of one image); "
              f"copies {copies} of {pairs} within-class pairs = {copies / pairs:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
