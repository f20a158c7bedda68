"""What the seed's three scripts share: their common flags (as the original spelled them), the mapping of those
flags onto kdreid's stage configs, and the one-line error handling of the `kdreid` command.

The scripts are thin wrappers: they build the same config objects `kdreid train-source/adapt/distill` build and
call the same `run` functions. Flags the original parsed but never used, and the two that have no kdreid
counterpart (`-j`, `--features`), are still accepted, so old command lines keep working, and a note says they have
no effect and why.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from kdreid.errors import CheckpointError, ConfigError, KdreidError

# Accepted without effect here, each with the reason its note gives (the original's flags: reference/original-
# system.md §3). `--dropout` and `--momentum` (a memory momentum copied from SpCL) did nothing there either.
IGNORED = {
    "workers": (("-j", "--workers"), "kdreid decodes every image once into a cache; there are no loader workers"),
    "features": (("--features",), "the embedding is the backbone's pooled width with a BNNeck (a seed checkpoint's "
                                  "`feat` layer is read from the file)"),
    "dropout": (("--dropout",), "the original did not use it either"),
    "momentum": (("--momentum",), "the original did not use it either (SGD's momentum is 0.9)"),
    "print_freq": (("--print-freq",), "kdreid logs each epoch"),
    "tensorboard": (("--tensorboard",), "kdreid always writes TensorBoard scalars to RUN/tensorboard/"),
}


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    # The original README wrote `-data-dir`, its code `--data-dir`: both work.
    p.add_argument("-data-dir", "--data-dir", dest="data_dir", default="reid-data",
                   help="parent folder of the datasets (default: reid-data, as the original used)")
    p.add_argument("--new-cuhk", action="store_true",
                   help="CUHK03: the new 767/700 protocol instead of the classic split (labeled boxes, as the seed)")
    p.add_argument("-b", "--batch-size", type=int, help="P×K images per domain and step")
    p.add_argument("--num-instances", type=int, help="K, images per identity in a batch")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["adam", "amsgrad", "adamw", "sgd"])
    p.add_argument("--eval-freq", type=int, help="evaluate every N epochs (0: at the end only)")
    p.add_argument("--scheduler", choices=["single_step", "multi_step", "cosine"],
                   help="the original's schedules, without warm-up: single_step = the rate times 0.1 every "
                        "--step-size epochs; cosine = down to 0 over --epochs (the original's T_max=1 alternated "
                        "between the full rate and 0); without it (and --step-size) the preset's schedule")
    p.add_argument("--step-size", type=int, help="epochs between two decays of single_step (implies it)")
    # What kdreid adds.
    p.add_argument("--out", help="run folder (default: a folder named after the settings under runs/)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--preset", default="paper", help="kdreid settings under the flags: paper (default) or quick")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    for dest, (flags, _) in IGNORED.items():
        if dest == "tensorboard":
            p.add_argument(*flags, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            p.add_argument(*flags, dest=dest, help=argparse.SUPPRESS)
    return p


def note_ignored(args: argparse.Namespace, extra: dict[str, tuple[tuple[str, ...], str]] | None = None) -> None:
    for dest, (flags, why) in {**IGNORED, **(extra or {})}.items():
        if getattr(args, dest, None) not in (None, False):
            print(f"note: {flags[-1]} is accepted for compatibility with the original scripts and has no effect: {why}",
                  file=sys.stderr)


def schedule_overrides(args: argparse.Namespace, step_size: int) -> dict:
    """The original's `--scheduler` / `--step-size` as kdreid settings ({} without either: the preset decides).
    `step_size` is the script's default (50; 5 for KD). The original had no warm-up, so none is added. Its KD engine
    stepped the scheduler once per target in each epoch; here a step is an epoch, in every script."""
    scheduler = args.scheduler or ("single_step" if args.step_size is not None else None)
    if scheduler is None:
        return {}
    if scheduler == "multi_step":
        raise ConfigError("--scheduler multi_step needs a list of epochs, which the original's flag could not take "
                          "(it failed there too); use --scheduler single_step --step-size N, or `kdreid` with a "
                          "--config file holding train.optim.milestones")
    if scheduler == "cosine":
        if args.step_size is not None:
            raise ConfigError(f"--step-size {args.step_size} belongs to --scheduler single_step, not cosine; leave one "
                              "of them out")
        return {"train.optim.scheduler": "cosine", "train.optim.min_lr_factor": 0.0, "train.optim.warmup_epochs": 0}
    return {"train.optim.scheduler": "step", "train.optim.gamma": 0.1, "train.optim.warmup_epochs": 0,
            "train.optim.step_size": step_size if args.step_size is None else args.step_size}


def common_overrides(args: argparse.Namespace, *, step_size: int = 50) -> dict:
    """The shared flags as kdreid settings; `step_size`: the script's default for --scheduler single_step."""
    return schedule_overrides(args, step_size) | {
        "data.root": args.data_dir,
        # The seed always read CUHK03's labeled boxes, on the classic split unless --new-cuhk.
        "data.cuhk03_labeled": True,
        "data.cuhk03_classic_split": not args.new_cuhk,
        "train.batch_size": args.batch_size,
        "train.num_instances": args.num_instances,
        "train.height": args.height,
        "train.width": args.width,
        "train.epochs": args.epochs,
        "train.optim.lr": args.lr,
        "train.optim.optimizer": args.optimizer,
        "train.eval_freq": args.eval_freq,
        "train.device": args.device,
        "train.seed": args.seed,
    }


def checkpoint_arch(path: str) -> str | None:
    """The architecture a kdreid checkpoint records; None for a plain state dict (torchreid's model-best.pth.tar and
    the like), which records none."""
    from kdreid.models import read_checkpoint

    try:
        return str(read_checkpoint(path)["arch"])
    except CheckpointError as error:
        if "not a kdreid checkpoint" in str(error):
            return None
        raise


def is_kdreid_checkpoint(path: str) -> bool:
    """True for a kdreid checkpoint; False for a plain state dict (torchreid's model-best.pth.tar and the like)."""
    return checkpoint_arch(path) is not None


def arch_of(given: str | None, path: str | None) -> str:
    """The architecture of the model in `path`: `given` (the script's -a / -as); else the one a kdreid checkpoint
    records; else the seed's default, resnet50 (a plain state dict records none). A flag that contradicts the
    checkpoint is refused by the stage, in one line under the script's flag names."""
    if given:
        return given
    return (checkpoint_arch(path) if path else None) or SEED_ARCH


SEED_ARCH = "resnet50"  # the seed's default for -a, -as and -at


def pretrained_flag(p: argparse.ArgumentParser, whose: str) -> None:
    p.add_argument("--pretrained", default=None,
                   help=f"{whose} start: imagenet (default, as the original's pretrained=True: a local file, never "
                        "downloaded), none (random weights) or a weights file")


# kdreid's flags as the scripts spell them, in the one-line errors (a `kdreid ...` command quoted there keeps its
# own). Per script: the flags it names differently.
COMMON_FLAGS = {"--root": "-data-dir", "-s": "-ds", "-t": "-dt"}
_QUOTED = re.compile(r"`[^`]*`|\(kdreid [^)]*\)")


def script_message(message: str, flags: dict[str, str]) -> str:
    """`message` with kdreid's flag names replaced by the script's (`flags` over COMMON_FLAGS), outside quoted
    `kdreid ...` commands."""
    names = {**COMMON_FLAGS, **flags}
    alternatives = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    pattern = re.compile(rf"(?<![\w-])({alternatives})(?![\w-])")
    parts, last = [], 0
    for quoted in _QUOTED.finditer(message):
        parts.append(pattern.sub(lambda m: names[m.group(1)], message[last:quoted.start()]))
        parts.append(quoted.group(0))
        last = quoted.end()
    parts.append(pattern.sub(lambda m: names[m.group(1)], message[last:]))
    return "".join(parts)


def run_main(body: Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
             argv: list[str] | None, flags: dict[str, str] | None = None) -> int:
    """Parse, run `body` (which returns the run folder) and print where the run is; a KdreidError is one line
    and exit code 2, as with the `kdreid` command, naming the script's flags (`flags`: kdreid's name -> the
    script's, over COMMON_FLAGS). Stopped (Ctrl-C, SIGTERM) where no training loop handles it, one line and 130/143,
    as `kdreid` exits."""
    args = parser.parse_args(argv)
    prog = Path(parser.prog).name
    try:
        out = body(args)
    except KdreidError as error:
        print(f"{prog}: error: {script_message(str(error), flags or {})}", file=sys.stderr)
        return getattr(error, "exit_code", 2)  # a run stopped by SIGINT/SIGTERM: 130/143, as `kdreid` exits
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM while reading the data (errors.Terminated)
        print(f"{prog}: interrupted", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)
    print(f"run folder: {out}")
    return 0
