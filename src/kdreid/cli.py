"""The `kdreid` command: parses arguments and calls the public functions; nothing else lives here.

Each command is a pair: `_add_<name>(subparsers)` declares its flags, `_run_<name>(args)` calls the library
and returns the exit code. Imports of heavy modules happen inside the `_run_` functions so that `kdreid --help`
stays fast. A `KdreidError` (a user mistake) is printed as one line, exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from kdreid import __version__
from kdreid.errors import ConfigError, KdreidError, sigterm_interrupts

USAGE_ERROR = 2


class _ListGivenOnce(argparse.Action):
    """A list flag (-s, -t, --teachers, ...) given a second time is refused: argparse kept the last one, so
    `-t market1501 -t cuhk03` dropped market1501 silently, and adding them up would silently train on both where a
    flag appended to a command was meant to replace the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None:
            given = f"{' '.join(map(str, earlier))}; {' '.join(map(str, values))}"
            raise argparse.ArgumentError(self, f"given twice ({given}): name all of them after one {option_string}")
        setattr(namespace, self.dest, values)


SEVERAL = {"nargs": "+", "action": _ListGivenOnce}
SEVERAL_OR_NONE = {"nargs": "*", "action": _ListGivenOnce}


# ---------------------------------------------------------------------------------------------- data synth
def _add_data_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic domains (synth_market, synth_duke, synth_cuhk, synth_msmt)")
    p.add_argument("--out", type=_path, required=True, help="parent folder; each domain goes to OUT/<name>/")
    p.add_argument("--domains", **SEVERAL, help="domain names (default: all four)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="1.0 (default) = as many ids/images as the dataset it mimics")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--size", default=None, help="HxW of the written images (default: each domain's own size)")
    p.add_argument("--gap", type=float, default=1.0,
                   help="style gap dial: 0 = no domain style, 1 = full preset (default)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: number of CPU cores)")
    p.set_defaults(run=_run_data_synth)


def _run_data_synth(args) -> int:
    from kdreid.data.synthetic import synth_command

    return synth_command(args)


# ---------------------------------------------------------------------------------------------- data check
def _add_data_check(sub) -> None:
    p = sub.add_parser("check", help="parse a dataset layout, print its statistics and list problems")
    p.add_argument("--root", type=_path, required=True, help="parent folder of the datasets (as in torchreid)")
    p.add_argument("-d", "--dataset", required=True, help="dataset name, e.g. market1501, synth_duke or custom:FOLDER")
    p.add_argument("--json", action="store_true", help="print only the statistics as JSON")
    _add_cuhk03_flags(p)
    p.add_argument("--no-verify", action="store_true", help="only check that the images exist; do not decode them")
    p.set_defaults(run=_run_data_check)


def _add_cuhk03_flags(p) -> None:
    p.add_argument("--cuhk03-labeled", action="store_true", help="CUHK03: use the labeled boxes (default detected)")
    p.add_argument("--cuhk03-classic-split", action="store_true", help="CUHK03: the classic 20-split protocol")
    p.add_argument("--split-id", type=int, default=0, help="CUHK03 classic protocol: which of the 20 splits (0..19)")


def _run_data_check(args) -> int:
    from kdreid.data.check import check_command

    return check_command(args)


# ---------------------------------------------------------------------------------------------- models
def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the architectures with parameter counts and MACs at 256x128")
    p.add_argument("names", nargs="*", help="only these models (default: all)")
    p.add_argument("--tiny", action="store_true", help="also list the test-size variants")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    import json

    from kdreid.models.registry import describe_models

    rows = describe_models(list(dict.fromkeys(args.names)) or None, include_tiny=args.tiny)  # each name once
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18} {'params':>8} {'MACs@256x128':>13} {'embedding':>9}  {'stage widths':<22} imagenet file")
    for row in rows:
        widths = ",".join(str(c) for c in row["stage_channels"])
        print(
            f"{row['name']:<18} {row['params'] / 1e6:>7.2f}M {row['macs'] / 1e9:>12.3f}G {row['embedding_dim']:>9}  "
            f"{widths:<22} {row['imagenet'] or '-'}"
        )
    print("params without a classifier; MACs of one 256x128 image in eval mode (convolutions and linear layers)")
    return 0


# ---------------------------------------------------------------------------------------------- data baseline
def _add_data_baseline(sub) -> None:
    p = sub.add_parser("baseline", help="colour-histogram retrieval baseline (mAP, rank-1) of a dataset's query/gallery")
    p.add_argument("--root", type=_path, required=True, help="parent folder of the datasets (as in torchreid)")
    p.add_argument("-d", "--dataset", required=True, help="dataset name, e.g. synth_market")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_cuhk03_flags(p)
    p.set_defaults(run=_run_data_baseline)


def _run_data_baseline(args) -> int:
    from kdreid.evaluation.color_histogram import baseline_command

    return baseline_command(args)


def _path(text: str) -> str:
    """A path flag's value: an empty one is refused (it would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or folder (. for the current one)")
    # `--out=~/run` and a quoted "~/run" reach us unexpanded (the shell expands only a word that starts with ~):
    # expanded here, as --root always was, not written to a folder named `~` in the current one.
    return os.path.expanduser(text)


# ---------------------------------------------------------------------------------------------- stages
def _add_stage_flags(p, preset_default: str = "none: the built-in defaults", pipeline: bool = False,
                     out_default: str = "") -> None:
    """The flags every training stage takes; unset flags leave the preset/--config value alone."""
    p.add_argument("--root", type=_path, help="parent folder of the datasets (as in torchreid; default: data)")
    p.add_argument("--out", type=_path,
                   help=f"run folder (config.yaml, log.txt, results.md, metrics.json, student.pt and the other "
                        f"final models, and stages/: one training run folder per stage; default: {out_default})"
                   if pipeline else
                   f"run folder (config.yaml, log.txt, checkpoints/, model.pt, metrics.json, results.md; default: "
                   f"{out_default})")
    p.add_argument("--config", type=_path, help="YAML file of settings (applied over --preset, under the flags)")
    p.add_argument("--preset", help=f"named settings: quick (CPU minutes) or paper (default {preset_default})")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="P×K images per domain and step")
    p.add_argument("--num-instances", type=int, help="K, images per identity/tracklet in a batch")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["adam", "amsgrad", "adamw", "sgd"])
    p.add_argument("--seed", type=int)
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, help="deterministic kernels (slower)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--eval-freq", type=int, help="evaluate every N epochs (0: at the end only)")
    p.add_argument("--compile", choices=["auto", "off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile the trained model, and in adapt the D-MMD terms (reduce-overhead: CUDA "
                        "graphs, for small models on a GPU); "
                        "auto: reduce-overhead for OSNet in the source stage on a GPU, off otherwise; falls back "
                        "to eager with a warning if compilation fails")
    p.add_argument("--select", choices=["last", "source-val", "target-clusters"],
                   help="which epoch's weights to keep: the last, the best on held-out source identities, or the "
                        "best label-free clustering score of the targets' training images; never on target test "
                        "labels")
    p.add_argument("--resume", action="store_true",
                   help="implied: finished stages are reused, an interrupted one continues" if pipeline else
                   "continue from OUT/checkpoints/last.pt if it exists")
    p.add_argument("--cuhk03-labeled", action=argparse.BooleanOptionalAction)
    p.add_argument("--cuhk03-classic-split", action=argparse.BooleanOptionalAction)
    p.add_argument("--split-id", type=int, help="CUHK03 classic protocol: which of the 20 splits to train on (0..19)")


def _stage_overrides(args) -> dict:
    if args.split_id is not None and "cuhk03" not in [*args.sources, *(getattr(args, "targets", None) or [])]:
        # Refused here, not in the stage: a pipeline passes it to every stage, and only some read cuhk03.
        raise ConfigError(f"--split-id {args.split_id} applies only to -s/-t cuhk03; leave it out")
    return {
        "out": args.out,
        "data.root": args.root,
        "data.cuhk03_labeled": args.cuhk03_labeled,
        "data.cuhk03_classic_split": args.cuhk03_classic_split,
        "data.cuhk03_split_id": args.split_id,
        "train.epochs": args.epochs,
        "train.batch_size": args.batch_size,
        "train.num_instances": args.num_instances,
        "train.height": args.height,
        "train.width": args.width,
        "train.optim.lr": args.lr,
        "train.optim.optimizer": args.optimizer,
        "train.seed": args.seed,
        "train.deterministic": args.deterministic,
        "train.device": args.device,
        "train.compile": args.compile,
        "train.eval_freq": args.eval_freq,
        "train.select": args.select,
    }


def _add_train_source(commands) -> None:
    p = commands.add_parser("train-source", help="stage 1: supervised training on the labelled source")
    p.add_argument("-s", "--sources", **SEVERAL, required=True, help="source dataset name(s), combined")
    p.add_argument("-t", "--targets", **SEVERAL_OR_NONE,
                   help="target datasets to evaluate on (the source-only rows)")
    p.add_argument("-a", "--arch", help="architecture (see `kdreid models`)")
    p.add_argument("--pretrained", type=_path, help="none, imagenet or a weights file")
    p.add_argument("--combineall", action=argparse.BooleanOptionalAction, help="train on query/gallery ids too")
    _add_stage_flags(p, out_default="runs/source")
    p.set_defaults(run=_run_train_source)


def _run_train_source(args) -> int:
    from kdreid.stages import source
    from kdreid.stages.presets import resolve_config

    overrides = _stage_overrides(args) | {
        "sources": args.sources, "targets": args.targets, "arch": args.arch, "pretrained": args.pretrained,
        "data.combineall": args.combineall,
    }
    config = resolve_config(
        source.SourceConfig, "source", preset=args.preset, config_file=args.config, overrides=overrides
    )
    source.run(config, resume=args.resume)
    return 0


# ---------------------------------------------------------------------------------------------- evaluate
def _add_evaluate(commands) -> None:
    p = commands.add_parser("evaluate", help="mAP, rank-1/5/10/20 and mINP of a model on each target's query/gallery")
    p.add_argument("--model", type=_path, required=True,
                   help="a kdreid checkpoint (model.pt), a plain state dict with -a, or an .onnx / TorchScript file "
                        "from export")
    p.add_argument("-a", "--arch", default=None, help="architecture of a plain state dict from another toolkit")
    _add_last_stride(p)
    p.add_argument("-t", "--targets", **SEVERAL, required=True, help="dataset names, e.g. market1501 synth_duke")
    p.add_argument("--root", type=_path, required=True, help="parent folder of the datasets")
    p.add_argument("--out", type=_path, default=None,
                   help="run folder: writes OUT/metrics.json (merged into an existing one)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3)")
    p.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
    p.add_argument("--flip", action="store_true", help="average the embeddings of each image and its mirror")
    p.add_argument("--aqe", action="store_true",
                   help="alpha query expansion of query and gallery features (fast-reid's TEST.AQE), before the "
                        "distances")
    p.add_argument("--aqe-k", type=int, default=None, metavar="K", help="neighbours summed, itself included "
                   "(default 5; with --aqe)")
    p.add_argument("--aqe-alpha", type=float, default=None, metavar="A",
                   help="weight = similarity ** A (default 3; with --aqe)")
    p.add_argument("--protocol", choices=("market", "cuhk03"), default=None,
                   help="one protocol for every target (default: per target, as the training stages score it: "
                        "cuhk03 = single-gallery-shot CMC for -t cuhk03 --cuhk03-classic-split, else market)")
    p.add_argument("--json", action="store_true", help="print only the metrics as JSON")
    _add_input_size(p)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--cuhk03-labeled", action="store_true", help="CUHK03: use the labeled boxes (default detected)")
    p.add_argument("--cuhk03-classic-split", action="store_true", help="CUHK03: the classic 20-split protocol")
    p.add_argument("--split-id", type=int, default=0, help="CUHK03: which split to read")
    p.add_argument("--visrank", type=int, nargs="?", const=8, default=0, metavar="N",
                   help="draw the ranked results of N queries per target (default 8) into OUT/visrank/*.png")
    p.add_argument("--visrank-topk", type=int, default=None, metavar="K",
                   help="gallery images per query (default 10; with --visrank)")
    p.add_argument("--visactmap", type=int, nargs="?", const=8, default=0, metavar="N",
                   help="draw where the model looks (activation maps) on N query images per target (default 8) "
                        "into OUT/actmap/*.png")
    p.add_argument("--verification", action="store_true",
                   help="same-person verification: TPR at FPR 1e-4..1e-1 with each distance threshold, ROC AUC; "
                        "with --out, positive/negative distance histograms and the ROC in OUT/verification/*.png")
    p.set_defaults(run=_run_evaluate)


def _add_last_stride(p) -> None:
    """--last-stride of the commands that take a plain state dict with -a."""
    p.add_argument("--last-stride", type=int, choices=[1, 2], default=None,
                   help="with -a: the last-stage stride the plain state dict was trained with (default 1: fast-reid, "
                        "SpCL, OpenUnReID; 2: torchreid's ResNets)")


def _add_input_size(p, default: str = "the checkpoint's, else 256x128") -> None:
    """--height/--width of the commands that embed images with a model."""
    p.add_argument("--height", type=int, default=None, help=f"input height (default: {default})")
    p.add_argument("--width", type=int, default=None, help=f"input width (default: {default})")



def _require_positive(args, *flags: str) -> None:
    """Sizes and counts below 1 would fail deep inside with a traceback, or (--height 0) silently mean the
    default: refuse them here, in one line; an input side beyond the bound training has too."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
        if flag in ("--height", "--width") and value is not None:
            from kdreid.stages.loop import check_input_side

            check_input_side(flag, value)


def _run_evaluate(args) -> int:
    from kdreid.evaluation.features import evaluate_command

    _require_positive(args, "--height", "--width", "--batch-size", "--workers")
    return evaluate_command(args)


def _add_adapt(commands) -> None:
    p = commands.add_parser("adapt", help="stage 2: D-MMD adaptation to one unlabelled target (a teacher)")
    p.add_argument("-s", "--sources", **SEVERAL, required=True, help="labelled source dataset(s)")
    p.add_argument("-t", "--targets", **SEVERAL, required=True, help="the target (several only with --blend)")
    p.add_argument("-a", "--arch", help="architecture; must match the --init checkpoint")
    p.add_argument("--init", type=_path, required=True,
                   help="source-trained kdreid checkpoint (train-source's model.pt)")
    p.add_argument("--grouping", choices=["tracklet", "pseudo", "oracle"],
                   help="target groups: tracklets (default), pseudo-labels, or identity labels (oracle ablation)")
    p.add_argument("--dmmd-start", type=int, help="first epoch (0-based) with the D-MMD terms")
    p.add_argument("--dmmd-weight", type=float, help="weight of the D-MMD terms")
    p.add_argument("--dmmd-terms", **SEVERAL, metavar="TERM",
                   help="D-MMD terms in the loss: within between features (default all three)")
    p.add_argument("--dmmd-source-groups", choices=["identity", "tracklet"],
                   help="how the source batch's distances split into within/between classes for D-MMD: by "
                        "identity (default, the paper) or by tracklet (same person and camera), like-for-like "
                        "with tracklet-grouped targets")
    p.add_argument("--dmmd-normalize", action=argparse.BooleanOptionalAction,
                   help="L2-normalise the embeddings inside the D-MMD terms (scale-free; not in the paper)")
    p.add_argument("--dmmd-copies", choices=["count", "exclude"],
                   help="two copies of one image (a group smaller than K repeats some): a within-class pair, as in "
                        "the original (count, default), or none (exclude)")
    p.add_argument("--blend", action=argparse.BooleanOptionalAction, help="adapt one model to the union of the targets")
    p.add_argument("--combineall", action=argparse.BooleanOptionalAction, help="train on source query/gallery ids too")
    _add_stage_flags(p, out_default="runs/adapt")
    p.set_defaults(run=_run_adapt)


def _run_adapt(args) -> int:
    from kdreid.stages import adapt
    from kdreid.stages.presets import resolve_config

    overrides = _stage_overrides(args) | {
        "sources": args.sources, "targets": args.targets, "arch": args.arch, "init": args.init,
        "grouping": args.grouping, "dmmd_start": args.dmmd_start, "dmmd_weight": args.dmmd_weight,
        "dmmd_terms": args.dmmd_terms, "dmmd_source_groups": args.dmmd_source_groups,
        "dmmd_normalize": args.dmmd_normalize, "dmmd_copies": args.dmmd_copies,
        "blend": args.blend, "data.combineall": args.combineall,
    }
    config = resolve_config(adapt.AdaptConfig, "adapt", preset=args.preset, config_file=args.config,
                            overrides=overrides)
    adapt.run(config, resume=args.resume)
    return 0


def _add_distill(commands) -> None:
    p = commands.add_parser("distill", help="stage 3: distil one teacher per target into one student (KD-ReID)")
    p.add_argument("-s", "--sources", **SEVERAL, required=True, help="labelled source dataset(s)")
    p.add_argument("-t", "--targets", **SEVERAL, required=True, help="the targets, in the order of --teachers")
    p.add_argument("-a", "--arch", help="student architecture (default: that of --student-init, else osnet_x0_25)")
    p.add_argument("--teachers", type=_path, **SEVERAL, required=True,
                   help="one teacher checkpoint per target, same order")
    p.add_argument("--teacher-arch",
                   help="the teachers are plain state dicts of this architecture (other toolkits); kdreid "
                        "checkpoints among them keep the architecture and stride they record")
    p.add_argument("--teacher-last-stride", type=int, choices=[1, 2],
                   help="with --teacher-arch: the last-stage stride the teachers were trained with (default 1: "
                        "SpCL, fast-reid; 2: torchreid's ResNets, the original KD-ReID code)")
    p.add_argument("--teacher-mode", choices=["eval", "train"],
                   help="eval (default); train = the original code's BatchNorm behaviour, for ablation")
    p.add_argument("--student-init", type=_path,
                   help="source-trained kdreid checkpoint of the student (train-source's model.pt)")
    p.add_argument("--pretrained", type=_path, help="student weights without --student-init: none, imagenet or a file")
    p.add_argument("--target-alt", choices=["batch", "full"],
                   help="batch: one step per target in each iteration; full: a whole target epoch at a time")
    p.add_argument("--target-order", choices=["random", "fixed", "shift"],
                   help="order of the targets: random, as given, or by ascending domain shift (MMD)")
    p.add_argument("--kd-style", choices=["outputs", "feats", "all"],
                   help="outputs: embedding distances; feats: stage maps (margin loss); all: both")
    p.add_argument("--kd-feature", choices=["embedding", "neck"],
                   help="the vectors outputs-KD compares: embedding (before BNNeck, default) or neck (after it)")
    p.add_argument("--lkdt-weight", type=float, help="weight of KD on target images (default 1)")
    p.add_argument("--lkds-weight", type=float, help="weight of KD on source images (default 0)")
    p.add_argument("--lda-weight", type=float, help="weight of the student's own D-MMD + CE + triplet (default 0)")
    p.add_argument("--multi-head", action=argparse.BooleanOptionalAction, help="one classifier per target")
    p.add_argument("--combineall", action=argparse.BooleanOptionalAction, help="train on source query/gallery ids too")
    _add_stage_flags(p, out_default="runs/distill")
    p.set_defaults(run=_run_distill)


def _run_distill(args) -> int:
    from kdreid.stages import distill
    from kdreid.stages.presets import resolve_config

    overrides = _stage_overrides(args) | {
        "sources": args.sources, "targets": args.targets, "arch": args.arch, "teachers": args.teachers,
        "teacher_arch": args.teacher_arch, "teacher_last_stride": args.teacher_last_stride,
        "teacher_mode": args.teacher_mode, "student_init": args.student_init,
        "pretrained": args.pretrained, "target_alt": args.target_alt, "target_order": args.target_order,
        "kd_style": args.kd_style, "kd_feature": args.kd_feature, "lkdt_weight": args.lkdt_weight,
        "lkds_weight": args.lkds_weight, "lda_weight": args.lda_weight, "multi_head": args.multi_head,
        "data.combineall": args.combineall,
    }
    config = resolve_config(distill.DistillConfig, "distill", preset=args.preset, config_file=args.config,
                            overrides=overrides)
    distill.run(config, resume=args.resume)
    return 0


def _add_pipeline(commands) -> None:
    p = commands.add_parser(
        "pipeline", help="all stages: source, one D-MMD teacher per target, blend baseline, KD-ReID student (cached)"
    )
    p.add_argument("-s", "--sources", **SEVERAL, required=True, help="labelled source dataset(s)")
    p.add_argument("-t", "--targets", **SEVERAL, required=True, help="the unlabelled targets")
    p.add_argument("--teacher-arch", help="architecture of the source model and the teachers (default: the "
                                          "preset's: resnet50, resnet18 under --preset quick)")
    p.add_argument("--student-arch", help="architecture of the student and the blend (default osnet_x0_25)")
    p.add_argument("--pretrained", choices=["none", "imagenet"],
                   help="where both source trainings start: none (default) or ImageNet weights (a local file "
                        "per architecture, never downloaded; the paper's start)")
    p.add_argument("--blend-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="train the blend, the baseline row the student is compared with (default yes; "
                        "--no-blend-baseline saves that adaptation stage)")
    _add_stage_flags(p, preset_default="paper", pipeline=True, out_default="runs/pipeline")
    p.set_defaults(run=_run_pipeline)


def _run_pipeline(args) -> int:
    from pathlib import Path

    from kdreid import distributed
    from kdreid.config import flatten
    from kdreid.stages import pipeline

    # The stage flags go to every stage, after the stage sections of --config ("overrides"); --out/--root/--preset/
    # --config are the pipeline's own. --resume is implied: finished stages are reused and an interrupted one
    # continues.
    stage_flags = {k: v for k, v in _stage_overrides(args).items() if v is not None and k not in ("out", "data.root")}
    overrides = {
        "sources": args.sources, "targets": args.targets, "teacher_arch": args.teacher_arch,
        "student_arch": args.student_arch, "root": args.root, "out": args.out, "preset": args.preset,
        "blend_baseline": args.blend_baseline,
    }
    config = pipeline.resolve_pipeline_config(preset=args.preset, config_file=args.config, overrides=overrides)
    if args.pretrained is not None:  # the source stages' own setting, over the --config file's `source` section
        config.source = {**flatten(config.source), "pretrained": args.pretrained}
    config.validate()  # the stage sections are mappings before the flags are merged into one
    if stage_flags:
        config.overrides = {**flatten(config.overrides), **stage_flags}
    result = pipeline.run(config)
    if distributed.is_main():  # under torchrun the main process writes the table, and prints it once
        print(f"run folder: {result.out} (results.md, metrics.json, student.pt)")
        print((Path(result.out) / "results.md").read_text(), end="")
    return 0


# ---------------------------------------------------------------------------------------------- deployment
def _add_export(commands) -> None:
    p = commands.add_parser("export", help="export a model to ONNX / TorchScript / torchreid, checked against PyTorch")
    p.add_argument("--model", type=_path, required=True,
                   help="a kdreid checkpoint (model.pt), or a plain state dict with -a")
    p.add_argument("-a", "--arch", default=None, help="architecture of a plain state dict from another toolkit")
    _add_last_stride(p)
    p.add_argument("--format", required=True, choices=("onnx", "torchscript", "torchreid"))
    p.add_argument("--out", type=_path, required=True, help="file to write (atomically, only after the check passes)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batches of 1)")
    p.add_argument("--fp16", action="store_true", help="half-precision weights and compute (float32 in and out)")
    p.add_argument("--images", type=_path, default=None, help="folder of images to check on (default: random images)")
    p.add_argument("--opset", type=int, help="ONNX opset, 7 to 20 (default 18)")
    _add_input_size(p)
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from kdreid.export import export_command

    _require_positive(args, "--height", "--width")
    return export_command(args)


def _add_extract(commands) -> None:
    p = commands.add_parser("extract", help="features of a folder of images into a .npz (for `kdreid search`)")
    p.add_argument("--model", type=_path, required=True,
                   help="a kdreid checkpoint, or an .onnx / TorchScript file from export")
    p.add_argument("-a", "--arch", default=None, help="architecture of a plain state dict from another toolkit")
    _add_last_stride(p)
    p.add_argument("--images", type=_path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", type=_path, required=True, help="features file to write, e.g. gallery.npz")
    p.add_argument("--flip", action="store_true", help="average the features of each image and its mirror")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    p.add_argument("--device", default=None, help="checkpoints only: cpu, cuda (default: cuda when available)")
    _add_input_size(p, default="the checkpoint's or the exported file's, else 256x128")
    p.set_defaults(run=_run_extract)


def _run_extract(args) -> int:
    from kdreid.deploy import extract_command

    _require_positive(args, "--height", "--width", "--batch-size", "--workers")
    return extract_command(args)


def _add_search(commands) -> None:
    p = commands.add_parser("search", help="rank a gallery features file for query images (or a query .npz)")
    p.add_argument("--gallery", type=_path, required=True, help="features file from `kdreid extract`")
    p.add_argument("--query", type=_path, required=True, help="an image, a folder of images, or a features .npz")
    p.add_argument("--model", type=_path, default=None, help="model that embeds query images (default: the gallery's)")
    p.add_argument("-a", "--arch", default=None, help="architecture of a plain state dict from another toolkit")
    _add_last_stride(p)
    p.add_argument("--topk", type=int, default=10, help="gallery images listed per query (default 10)")
    p.add_argument("--max-distance", type=float, default=None, metavar="D",
                   help="list only gallery images closer than D (a threshold from `kdreid evaluate --verification`)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (galleries up to 50,000 images)")
    p.add_argument("--metric", choices=("euclidean", "cosine"), default="euclidean")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="flip-average query images (default: as the gallery was extracted)")
    p.add_argument("--faiss", action="store_true", help="search with a faiss flat index (exact; needs faiss-cpu)")
    p.add_argument("--json", action="store_true", help="print the rankings as JSON")
    _add_input_size(p, default="the size the gallery was extracted at")
    p.set_defaults(run=_run_search)


def _run_search(args) -> int:
    from kdreid.deploy import search_command

    _require_positive(args, "--height", "--width", "--topk")
    if args.max_distance is not None and not 0 < args.max_distance < float("inf"):
        raise ConfigError(f"--max-distance must be a positive distance, got {args.max_distance}")
    return search_command(args)


# ---------------------------------------------------------------------------------------------- report
def _add_report(commands) -> None:
    p = commands.add_parser("report", help="RUN/report.html: the tables and pictures of a run (static page)")
    p.add_argument("run_dir", type=_path, metavar="RUN",
                   help="a run folder: a pipeline's, a stage's, or `kdreid evaluate --out`'s")
    # Defaults None (4, 8, 8 in kdreid.report): an evaluation folder's page, which draws nothing, names them given.
    p.add_argument("--visrank", type=int, default=None, metavar="N",
                   help="ranked results of N queries per target with the run's final model (0: none; default 4)")
    p.add_argument("--visrank-topk", type=int, default=None, metavar="K", help="gallery images per query (default 8)")
    p.add_argument("--actmap", type=int, default=None, metavar="N",
                   help="activation maps (where each model looks) on N query images per target (0: none; default 8)")
    p.add_argument("--root", type=_path, default=None,
                   help="data root for the ranked results and activation maps (default: the one the run used)")
    p.add_argument("--device", default=None,
                   help="for the ranked results and activation maps: cpu, cuda (default: cuda when available)")
    p.set_defaults(run=_run_report)


def _run_report(args) -> int:
    from kdreid.report import report_command

    return report_command(args)


def _add_aggregate(commands) -> None:
    p = commands.add_parser("aggregate", help="mean ± std of each model's numbers over runs that differ in their "
                                              "seed (a results table of `mean ± std` cells)")
    p.add_argument("runs", type=_path, nargs="+", metavar="RUN",
                   help="run folders of one command: pipelines, stage runs or `kdreid evaluate --out` folders")
    p.add_argument("--out", type=_path, default=None, help="also write the table (or the JSON) to this file")
    p.add_argument("--json", action="store_true", help="every metric's mean, std and per-run values as JSON")
    p.set_defaults(run=_run_aggregate)


def _run_aggregate(args) -> int:
    from kdreid.aggregate import aggregate_command

    return aggregate_command(args)


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdreid",
        description="Multi-target domain adaptation for person re-ID by knowledge distillation.",
    )
    parser.add_argument("--version", action="version", version=f"kdreid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = commands.add_parser("data", help="synthetic domains and dataset checks")
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND")
    _add_data_synth(data_commands)
    _add_data_check(data_commands)
    _add_data_baseline(data_commands)
    data.set_defaults(run=lambda args: _missing_subcommand(data))

    for add in _COMMANDS:
        add(commands)
    return parser


# Top-level commands other than `data`, in the order `kdreid --help` lists them.
_COMMANDS: list = [_add_models, _add_train_source, _add_adapt, _add_distill, _add_evaluate, _add_export,
                   _add_extract, _add_search, _add_pipeline, _add_report, _add_aggregate]


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        # File names need not be UTF-8 (a zip from another system): print them as the bytes they are, not crash.
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) == "strict":
            stream.reconfigure(errors="surrogateescape")
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    ended_together = False  # with the other processes under torchrun: see distributed.cleanup
    # SIGTERM (`kill`, `timeout`, a scheduler) stops every command as Ctrl-C does: what it was writing is cleaned
    # up, and it exits 143 with one line. The training commands install this themselves, where they clean up (a
    # stage on its main process only, a pipeline on every process), and hand it to the training loop's handling.
    own_handling = getattr(args, "command", None) in _TRAINING_COMMANDS
    try:
        _refuse_other_commands_under_torchrun(args)
        with contextlib.nullcontext() if own_handling else sigterm_interrupts():
            code = int(args.run(args) or 0)
        ended_together = code == 0
        return code
    except KdreidError as error:
        stopped_training = hasattr(error, "exit_code")  # TrainingInterrupted: after its checkpoint, at a signal
        # Every process stops training at the same step; an error that the processes agreed on (an image of one
        # process's share of an evaluation that does not decode) is raised by all of them at the same point.
        ended_together = stopped_training or getattr(error, "on_every_process", False)
        interrupt = None if stopped_training else _interrupt_behind(error)
        if interrupt is not None:  # Ctrl-C while a library loaded, which it reported as an ImportError
            print("kdreid: interrupted", file=sys.stderr)
            return getattr(interrupt, "exit_code", 130)
        _traceback_if_asked()
        print(f"kdreid: error: {error}", file=sys.stderr)
        # Training stopped by SIGINT/SIGTERM (after its checkpoint) exits 128 + signal, as shells expect.
        return getattr(error, "exit_code", USAGE_ERROR)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM outside training (errors.Terminated)
        print("kdreid: interrupted", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)
    except BrokenPipeError:
        # The reader of the output stopped early (`kdreid models | head -1`): nothing is wrong, say nothing. Python
        # would flush stdout again at exit and fail once more, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by it
    except OSError as error:
        from kdreid.rundir import describe_environment_error

        message = describe_environment_error(error)  # a full disk, a file where a folder should be, ...
        if message is None:
            raise
        _traceback_if_asked()
        print(f"kdreid: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    finally:
        if "kdreid.distributed" in sys.modules:  # a torchrun process: how it leaves the process group at exit
            sys.modules["kdreid.distributed"].mark_ended_together(ended_together)


def command() -> int:
    """The `kdreid` command (its script, `python -m kdreid`, `python -m kdreid.cli`): `main`, and a process that
    torchrun started ends by `distributed.end_process`, not through Python's teardown, where gloo aborted it now
    and then after a command that had succeeded. `main` itself returns, so that a script can call it again."""
    code = main()
    distributed = sys.modules.get("kdreid.distributed")
    if distributed is not None and distributed.is_distributed():
        distributed.end_process(code)
    return code


# The commands whose stages handle SIGTERM themselves (kdreid.stages.common, kdreid.stages.pipeline).
_TRAINING_COMMANDS = ("train-source", "adapt", "distill", "pipeline")


def _refuse_other_commands_under_torchrun(args) -> None:
    """Only the training commands share their work among torchrun's processes. Any other one ran whole on every
    process: they raced for the same output (one was refused as "in use by another kdreid process", its own twin),
    printed everything once per process, and torchrun stopped the others when one failed. One line instead."""
    world, command = os.environ.get("WORLD_SIZE", ""), getattr(args, "command", None)
    if command in _TRAINING_COMMANDS or "TORCHELASTIC_RUN_ID" not in os.environ or not world.isdigit() \
            or int(world) < 2:
        return
    name = " ".join(filter(None, [command, getattr(args, "data_command", None)]))
    raise ConfigError(f"kdreid {name} runs as one process, and torchrun started {world}: run it without torchrun "
                      f"(only {', '.join(_TRAINING_COMMANDS)} share their work among torchrun's processes)")


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C, or SIGTERM as errors.Terminated) that `error` was raised from, if any: a
    signal that arrives while a compiled extension initialises (onnxruntime, faiss: pybind11) becomes its
    ImportError("initialization failed"), which kdreid would otherwise report as a missing package."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return current
        pending += [current.__cause__, current.__context__]
    return None


TRACEBACK_VARIABLE = "KDREID_TRACEBACK"


def _traceback_if_asked() -> None:
    """With KDREID_TRACEBACK=1, the traceback above the one-line error: for a bug report, or to tell a bug in kdreid
    from the bad input its message names."""
    if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
        traceback.print_exc(file=sys.stderr)


if __name__ == "__main__":
    sys.exit(command())
