#!/usr/bin/env python
"""The seed's file name for scripts/KD-REID.py (its README and its code disagreed); runs the same code."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

_IMPLEMENTATION = Path(__file__).resolve().parent / "KD-REID.py"


def main(argv: list[str] | None = None) -> int:
    return runpy.run_path(str(_IMPLEMENTATION), run_name="kd_reid")["main"](argv)


if __name__ == "__main__":
    sys.exit(main())
