"""`python -m kdreid ...`: the `kdreid` command, for environments where its script is not on PATH."""

import sys

from kdreid.cli import command

sys.exit(command())
