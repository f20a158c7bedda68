"""What the seed's three scripts share: their common flags (as the original spelled them), the mapping of those
flags onto kdreid's stage configs, and the one-line error handling of the `kdreid` command.

The scripts are thin wrappers: they build the same config objects `kdreid train-source/adapt/distill` build and
call the same `run` functions. Flags the original parsed but never used are still accepted, so old command lines
keep working, and a note says they have no effect.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable

from kdreid.errors import CheckpointError, KdreidError

# Parsed by the original scripts but without effect there or here (see reference/original-system.md §3).
IGNORED = {
    "workers": ("-j", "--workers"),
    "features": ("--features",),
    "dropout": ("--dropout",),
    "momentum": ("--momentum",),
    "scheduler": ("--scheduler",),
    "step_size": ("--step-size",),
    "print_freq": ("--print-freq",),
    "tensorboard": ("--tensorboard",),
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
    # What kdreid adds.
    p.add_argument("--out", help="run folder (default: a folder named after the settings under runs/)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--preset", default="paper", help="kdreid settings under the flags: paper (default) or quick")
    p.add_argument("--seed", type=int)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    for dest, flags in IGNORED.items():
        if dest == "tensorboard":
            p.add_argument(*flags, dest=dest, action="store_true", help=argparse.SUPPRESS)
        else:
            p.add_argument(*flags, dest=dest, help=argparse.SUPPRESS)
    return p


def note_ignored(args: argparse.Namespace, extra: dict[str, tuple[str, ...]] | None = None) -> None:
    for dest, flags in {**IGNORED, **(extra or {})}.items():
        if getattr(args, dest, None) not in (None, False):
            print(f"note: {flags[-1]} is accepted for compatibility with the original scripts and has no effect",
                  file=sys.stderr)


def common_overrides(args: argparse.Namespace) -> dict:
    return {
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


def is_kdreid_checkpoint(path: str) -> bool:
    """True for a kdreid checkpoint; False for a plain state dict (torchreid's model-best.pth.tar and the like)."""
    from kdreid.models import read_checkpoint

    try:
        read_checkpoint(path)
    except CheckpointError as error:
        if "not a kdreid checkpoint" in str(error):
            return False
        raise
    return True


def run_main(body: Callable[[argparse.Namespace], str], parser: argparse.ArgumentParser,
             argv: list[str] | None) -> int:
    """Parse, run `body` (which returns the run folder) and print where the run is; a KdreidError is one line
    and exit code 2, as with the `kdreid` command."""
    args = parser.parse_args(argv)
    prog = Path(parser.prog).name
    try:
        out = body(args)
    except KdreidError as error:
        # kdreid's messages name its --root flag; this script's is -data-dir (a `kdreid ...` command they quote
        # keeps --root).
        message = re.sub(r"(with |^|; )--root\b", r"\1-data-dir", str(error))
        print(f"{prog}: error: {message}", file=sys.stderr)
        return getattr(error, "exit_code", 2)  # a run stopped by SIGINT/SIGTERM: 130/143, as `kdreid` exits
    print(f"run folder: {out}")
    return 0
