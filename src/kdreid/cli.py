"""The `kdreid` command: parses arguments and calls the public functions; nothing else lives here.

Each command is a pair: `_add_<name>(subparsers)` declares its flags, `_run_<name>(args)` calls the library
and returns the exit code. Imports of heavy modules happen inside the `_run_` functions so that `kdreid --help`
stays fast. A `KdreidError` (a user mistake) is printed as one line, exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from kdreid import __version__
from kdreid.errors import KdreidError

USAGE_ERROR = 2


# ---------------------------------------------------------------------------------------------- data synth
def _add_data_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic domains (synth_market, synth_duke, synth_cuhk, synth_msmt)")
    p.add_argument("--out", required=True, help="parent folder; each domain goes to OUT/<name>/")
    p.add_argument("--domains", nargs="+", default=None, help="domain names (default: all four)")
    p.add_argument("--scale", type=float, default=1.0, help="1.0 = as many ids/images as the dataset it mimics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="HxW of the written images (default: each domain's own size)")
    p.add_argument("--gap", type=float, default=1.0, help="style gap dial: 0 = no domain style, 1 = full preset")
    p.add_argument("--workers", type=int, default=None, help="processes (default: number of CPU cores)")
    p.set_defaults(run=_run_data_synth)


def _run_data_synth(args) -> int:
    from kdreid.data.synthetic import synth_command

    return synth_command(args)


# ---------------------------------------------------------------------------------------------- data check
def _add_data_check(sub) -> None:
    p = sub.add_parser("check", help="parse a dataset layout, print its statistics and list problems")
    p.add_argument("--root", required=True, help="parent folder of the datasets (as in torchreid)")
    p.add_argument("-d", "--dataset", required=True, help="dataset name, e.g. market1501 or synth_duke")
    p.add_argument("--json", action="store_true", help="print only the statistics as JSON")
    p.add_argument("--cuhk03-labeled", action="store_true", help="CUHK03: use the labeled boxes (default detected)")
    p.add_argument("--cuhk03-classic-split", action="store_true", help="CUHK03: the classic 20-split protocol")
    p.add_argument("--split-id", type=int, default=0, help="CUHK03: which split to read")
    p.add_argument("--no-verify", action="store_true", help="do not decode every image (faster)")
    p.set_defaults(run=_run_data_check)


def _run_data_check(args) -> int:
    from kdreid.data.check import check_command

    return check_command(args)


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
    data.set_defaults(run=lambda args: _missing_subcommand(data))

    for add in _COMMANDS:
        add(commands)
    return parser


# Top-level commands other than `data`, in the order `kdreid --help` lists them.
_COMMANDS: list = []


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        return int(args.run(args) or 0)
    except KdreidError as error:
        print(f"kdreid: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("kdreid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
