#!/usr/bin/env python
"""Step 3 of the seed: KD-ReID, one adapted teacher per target distilled into one student.

    python scripts/KD-REID.py -ds msmt17 -dt market1501 dukemtmcreid cuhk03 -as osnet_x0_25 -at resnet50 \
        -data-dir $DATA -mps $STUDENT -mpt $T1 $T2 $T3

A thin wrapper over `kdreid distill` (kdreid.stages.distill.run) that keeps the seed's flags, both its spellings
(`--lkds_weight` and `--lkds-weight`, `--kd-style only_outputs` and `outputs`) and its file name
(`scripts/KD_REID.py` runs this file). `-mpt` and `-mps` take kdreid checkpoints or plain state dicts of `-at`
and `-as` (the seed's model-best.pth.tar files). Without `-as`/`-at`, a kdreid checkpoint's own architecture is
used, and the seed's resnet50 for a plain state dict; an `-at` that a kdreid teacher contradicts is refused. Without
`-mps` the student starts from ImageNet weights, as the seed's did (`--pretrained none|FILE` otherwise).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _seed_args, when imported rather than run

from _seed_args import (  # noqa: E402
    SEED_ARCH,
    checkpoint_arch,
    common_overrides,
    common_parser,
    note_ignored,
    pretrained_flag,
    run_main,
)

KD_STYLES = {"only_outputs": "outputs", "only_feats": "feats", "all": "all", "outputs": "outputs",
             "feats": "feats"}
UNUSED = {"log_loss": (("--log-loss",), "the original parsed it and did not use it")}


def build_parser():
    p = common_parser("KD-ReID multi-target distillation (the seed's scripts/KD-REID.py, on kdreid)")
    p.add_argument("-ds", "--dataset-source", dest="sources", nargs="+", default=["msmt17"])
    p.add_argument("-dt", "--dataset-target", dest="targets", nargs="+", default=["market1501"],
                   help="the targets, in the order of -mpt")
    p.add_argument("-as", "--arch-student", dest="arch_student",
                   help="default: the -mps checkpoint's, else resnet50 (the seed's)")
    p.add_argument("-at", "--arch-teacher", dest="arch_teacher",
                   help="the teachers' architecture: that of plain state dicts (default resnet50, the seed's); kdreid "
                        "checkpoints record theirs (they must agree with it)")
    p.add_argument("-mps", "--model-path-student", dest="student", help="source-trained student")
    pretrained_flag(p, "without -mps, the student's")
    p.add_argument("-mpt", "--model-path-teachers", dest="teachers", nargs="+", required=True,
                   help="one teacher per target, in the order of -dt")
    p.add_argument("--target-alt", choices=["batch", "full"],
                   help="batch: one step per target in each iteration; full: a whole target epoch at a time")
    p.add_argument("--kd-style", choices=list(KD_STYLES), help="only_outputs (default), only_feats or all")
    p.add_argument("--target-order", choices=["random", "fixed", "shift"])
    p.add_argument("--lkds_weight", "--lkds-weight", dest="lkds_weight", type=float, help="KD on source images")
    p.add_argument("--lda_weight", "--lda-weight", dest="lda_weight", type=float,
                   help="the student's own D-MMD + CE + triplet, weighted as written (the seed's batch "
                        "engine divided it by 100: its 1 is 0.01 here)")
    p.add_argument("--lkdt_weight", "--lkdt-weight", dest="lkdt_weight", type=float, help="KD on target images")
    p.add_argument("--multi-head", action="store_const", const=True, help="one classifier per target")
    p.add_argument("--stda", choices=["D-MMD", "SPCL"], default="D-MMD",
                   help="the teachers' method: kdreid/D-MMD checkpoints, or SpCL state dicts (DSBN)")
    p.add_argument("--teacher-mode", choices=["eval", "train"],
                   help="eval (default); train = the seed's BatchNorm behaviour, for ablation")
    p.add_argument("--log-loss", dest="log_loss", action="store_true", help="(no effect, as in the seed)")
    return p


def run_folder(args) -> str:
    """The seed's folder naming: {source}2{targets}/{teacher}_t_{student}_s/{settings}."""
    style = args.kd_style or "only_outputs"
    style = {"outputs": "only_outputs", "feats": "only_feats"}.get(style, style)
    parts = [
        "" if args.target_alt == "full" else f"_target_alt_{args.target_alt or 'batch'}",
        "_kd_style_outs_feats" if style == "all" else f"_kd_style_{style}",
        "" if (args.target_order or "random") == "random" else f"_{args.target_order}_order",
        f"_lkds_{args.lkds_weight}" if args.lkds_weight else "",
        f"_lda_{args.lda_weight}" if args.lda_weight else "",
    ]
    return str(Path("runs") / f"KD_ReID_{args.stda}"
               / f"{'+'.join(args.sources)}2{'+'.join(args.targets)}{'_new_cuhk' if args.new_cuhk else ''}"
               / f"{args.arch_teacher}_t_{args.arch_student}_s" / "".join(parts).lstrip("_"))


def train(args) -> str:
    from kdreid.errors import ConfigError
    from kdreid.stages import distill
    from kdreid.stages.presets import resolve_config

    note_ignored(args, UNUSED)
    if len(args.teachers) != len(args.targets):
        raise ConfigError(
            f"{len(args.teachers)} teacher(s) in -mpt for {len(args.targets)} target(s) in -dt "
            f"({' '.join(args.targets)}): pass one teacher per target, in the same order"
        )
    # The architectures: the flags, else what kdreid checkpoints record, else the seed's resnet50.
    student_arch = checkpoint_arch(args.student) if args.student else None  # None: a plain state dict
    args.arch_student = args.arch_student or student_arch or SEED_ARCH
    teacher_archs = [checkpoint_arch(path) for path in args.teachers]
    plain_teachers = args.stda == "SPCL" or None in teacher_archs
    if not plain_teachers and args.arch_teacher:
        for path, arch in zip(args.teachers, teacher_archs):
            if arch != args.arch_teacher:
                raise ConfigError(f"-mpt {path}: holds a {arch} model, not the {args.arch_teacher} that -at names; "
                                  f"pass -at {arch}, or leave -at out (a kdreid checkpoint records its architecture)")
    if plain_teachers:
        args.arch_teacher = args.arch_teacher or SEED_ARCH
    else:
        args.arch_teacher = args.arch_teacher or "+".join(dict.fromkeys(teacher_archs))
    if args.student and args.pretrained:
        raise ConfigError(f"--pretrained {args.pretrained} has no effect with -mps (the student starts from it); "
                          "leave one of them out")
    out = args.out or run_folder(args)
    overrides = common_overrides(args, step_size=5) | {  # the original KD's default step size
        "sources": args.sources, "targets": args.targets, "arch": args.arch_student, "teachers": args.teachers,
        "target_alt": args.target_alt, "target_order": args.target_order,
        "kd_style": KD_STYLES[args.kd_style] if args.kd_style else None, "lkdt_weight": args.lkdt_weight,
        "lkds_weight": args.lkds_weight, "lda_weight": args.lda_weight, "multi_head": args.multi_head,
        "teacher_mode": args.teacher_mode, "out": out,
    }
    config = resolve_config(distill.DistillConfig, "distill", preset=args.preset, overrides=overrides)
    config.validate()  # the teacher/target count before any file is read
    # Plain state dicts (the seed's files, SpCL's) load as -at; kdreid checkpoints carry their architecture.
    if plain_teachers:
        config.teacher_arch = args.arch_teacher
    if args.student:
        if student_arch:
            config.student_init = args.student
        else:
            config.pretrained = args.student
    else:  # the seed built its student with ImageNet weights
        config.pretrained = args.pretrained or "imagenet"
    return str(Path(distill.run(config, resume=args.resume).model_path).parent)


def main(argv: list[str] | None = None) -> int:
    return run_main(train, build_parser(), argv, {"--student-init": "-mps", "--teachers": "-mpt",
                                                  "--teacher-arch": "-at"})


if __name__ == "__main__":
    sys.exit(main())
