"""Verifying that image files decode: what `kdreid data check` runs over every image of a dataset."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from PIL import Image

# The image files kdreid reads from a folder of images of any layout (a custom dataset, `extract`, `search`,
# export's check images): the formats every Pillow build decodes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Checked in blocks so a thread pool's per-task overhead stays small next to ~0.3 ms per decode of a 128×64 JPEG.
_BLOCK = 256


def image_problem(path: str) -> str | None:
    """Why `path` is not a usable image ("missing", "cannot decode (...)"), or None when it decodes fully.

    A full decode (`load`), not PIL's `verify()`: for JPEG `verify()` reads no pixel data and so misses a
    file cut short, which `load` reports as "image file is truncated"."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                # Decode at 1/8 scale: libjpeg still reads every entropy-coded byte (so a cut file is still
                # "truncated") but skips most of the inverse DCT.
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except FileNotFoundError:
        return "file is missing"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"cannot decode ({error})"
    return None


def find_unreadable_images(paths: Sequence[str], workers: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) for every image that does not decode, in the order of `paths`. Decoded by threads:
    PIL releases the GIL while decoding, so threads scale without the cost of processes."""
    workers = workers or min(8, os.cpu_count() or 1)
    blocks = [paths[start : start + _BLOCK] for start in range(0, len(paths), _BLOCK)]

    def check_block(block: Sequence[str]) -> list[tuple[str, str]]:
        return [(path, reason) for path in block if (reason := image_problem(path)) is not None]

    if workers == 1 or len(blocks) <= 1:
        return [problem for block in blocks for problem in check_block(block)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [problem for block_problems in pool.map(check_block, blocks) for problem in block_problems]
