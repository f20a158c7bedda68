#!/usr/bin/env python
"""Step 2 of the seed: D-MMD adaptation of a source-trained model to one target (a teacher), or to the union of
several targets (the blended baseline).

    python scripts/DMMD.py -ds msmt17 -dt market1501 -a resnet50 -data-dir $DATA -mp $MODEL_PATH

A thin wrapper over `kdreid adapt` (kdreid.stages.adapt.run) that keeps the seed's flags. `-mp` takes a kdreid
checkpoint, or a plain state dict (e.g. the seed's model-best.pth.tar), which is rebuilt as a kdreid checkpoint
of `-a` with the source's identities first (RUN/init.pt). Without `-a`, the architecture is the one a kdreid
checkpoint records, and the seed's resnet50 for a plain state dict.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _seed_args, when imported rather than run

from _seed_args import (  # noqa: E402
    arch_of,
    common_overrides,
    common_parser,
    is_kdreid_checkpoint,
    note_ignored,
    run_main,
)

from kdreid.stages.common import stage_runner  # noqa: E402


def build_parser():
    p = common_parser("D-MMD adaptation (the seed's scripts/DMMD.py, on kdreid)")
    p.add_argument("-ds", "--dataset-source", dest="sources", nargs="+", default=["msmt17"])
    p.add_argument("-dt", "--dataset-target", dest="targets", nargs="+", default=["market1501"],
                   help="the target; several targets adapt one blended model to their union, as the seed")
    p.add_argument("-a", "--arch",
                   help="default: the -mp checkpoint's, or resnet50 for a plain state dict (the seed's)")
    p.add_argument("-mp", "--model-path", dest="model_path", required=True,
                   help="the source-trained model to start from")
    p.add_argument("--grouping", choices=["tracklet", "pseudo", "oracle"],
                   help="target groups (kdreid): tracklets (default), pseudo-labels, or identity labels (oracle)")
    p.add_argument("--dmmd-start", type=int, help="first epoch (0-based) with the D-MMD terms")
    return p


def init_checkpoint(model_path: str, arch: str, config, out: Path, resume: bool) -> str:
    """`model_path` as a kdreid checkpoint: as it is, or a plain state dict of `arch` rebuilt with the source's
    label space and saved as OUT/init.pt (by the main process only; a resumed run keeps the one it started from)."""
    if is_kdreid_checkpoint(model_path):
        return model_path
    from kdreid import distributed
    from kdreid.models import build_model, save_checkpoint
    from kdreid.models.weights import embedding_dim_of
    from kdreid.stages.data import combine_train, load_datasets

    converted = out / "init.pt"
    if (resume and converted.is_file()) or not distributed.is_main():
        # The other processes read it once the main one has written it: the stage's start is a rendezvous.
        return str(converted)
    options = {name: config.data.reader_options(name) for name in config.sources}
    records = combine_train(load_datasets(config.sources, config.data.root, options))
    model = build_model(arch, 1 + max(r.pid for r in records), pretrained=model_path,
                        embedding_dim=embedding_dim_of(model_path))  # the seed's `feat` layer, when it has one
    return str(save_checkpoint(converted, model, datasets=list(config.sources),
                               extra={"stage": "source", "converted_from": model_path}))


@stage_runner
def adapt_from(config, *, resume: bool = False):
    """adapt.run from config.init, a kdreid checkpoint or a plain state dict converted first; the run folder is
    checked before anything is written there, and a failure before training leaves no folder behind."""
    from kdreid.stages import adapt
    from kdreid.stages.loop import refuse_occupied

    refuse_occupied(Path(config.out), resume)
    config.init = init_checkpoint(config.init, config.arch, config, Path(config.out), resume)
    return adapt.run(config, resume=resume)


def train(args) -> str:
    from kdreid.stages import adapt
    from kdreid.stages.presets import resolve_config

    note_ignored(args)
    args.arch = arch_of(args.arch, args.model_path)
    sources = "+".join(args.sources)
    out = args.out or str(Path("runs") / "DMMD" / f"{sources}{'_new_cuhk' if args.new_cuhk else ''}"
                          / f"{sources}_to_{'+'.join(args.targets)}_{args.arch}")
    overrides = common_overrides(args) | {
        "sources": args.sources, "targets": args.targets, "blend": len(args.targets) > 1, "arch": args.arch,
        "init": args.model_path, "out": out, "grouping": args.grouping, "dmmd_start": args.dmmd_start,
    }
    config = resolve_config(adapt.AdaptConfig, "adapt", preset=args.preset, overrides=overrides)
    return str(Path(adapt_from(config, resume=args.resume).model_path).parent)


def main(argv: list[str] | None = None) -> int:
    return run_main(train, build_parser(), argv, {"--init": "-mp"})


if __name__ == "__main__":
    sys.exit(main())
