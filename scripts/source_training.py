#!/usr/bin/env python
"""Step 1 of the seed: supervised training on the labelled source (CE with label smoothing + triplet).

    python scripts/source_training.py -ds msmt17 -a resnet50 -data-dir $DATA

A thin wrapper over `kdreid train-source` (kdreid.stages.source.run) that keeps the seed's flags. Unlike the
seed, `-data-dir` is honoured and `-dt` names target datasets evaluated at the end (the "source only" rows). As the
seed (`pretrained=True`), the model starts from ImageNet weights, read from the local torch cache (never downloaded);
`--pretrained none` starts from random weights, `--pretrained FILE` from a weights file.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _seed_args, when imported rather than run

from _seed_args import common_overrides, common_parser, note_ignored, pretrained_flag, run_main  # noqa: E402


def build_parser():
    p = common_parser("Source training (the seed's scripts/source_training.py, on kdreid)")
    p.add_argument("-ds", "--dataset-source", dest="sources", nargs="+", default=["msmt17"],
                   help="source dataset(s), combined")
    p.add_argument("-dt", "--dataset-target", dest="targets", nargs="*", default=[],
                   help="target datasets to evaluate on (source-only baseline)")
    p.add_argument("-a", "--arch", default="resnet50")
    pretrained_flag(p, "the model's")
    return p


def train(args) -> str:
    from kdreid.stages import source
    from kdreid.stages.presets import resolve_config

    note_ignored(args)
    out = args.out or str(Path("runs") / "source_training"
                          / f"{'+'.join(args.sources)}{'_new_cuhk' if args.new_cuhk else ''}" / args.arch)
    overrides = common_overrides(args) | {
        "sources": args.sources, "targets": args.targets, "arch": args.arch, "out": out,
        "pretrained": args.pretrained or "imagenet",
    }
    config = resolve_config(source.SourceConfig, "source", preset=args.preset, overrides=overrides)
    return str(Path(source.run(config, resume=args.resume).model_path).parent)


def main(argv: list[str] | None = None) -> int:
    return run_main(train, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
