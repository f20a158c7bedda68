"""Decode every training image once into a uint8 tensor (N, 3, H, W), so that an epoch costs index lookups
instead of JPEG decodes. The cache sits in RAM, and on the GPU when training on CUDA and it fits there
(Market-1501's 12,936 training images at 256×128 take 1.3 GB; kdreid.stages.data.BatchSource decides)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdreid.errors import DatasetError


def read_image(path: str, height: int | None = None, width: int | None = None) -> np.ndarray:
    """One RGB image, resized to height×width (bilinear, antialiased) when both are given -> (H, W, 3) uint8.
    A missing, corrupt or truncated file raises DatasetError naming it."""
    try:
        with Image.open(path) as image:
            if image.mode == "I" or image.mode.startswith("I;16"):
                # 16-bit (or 32-bit integer) grey: PIL's convert clips it to white; keep its top 8 bits instead.
                wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
                image = Image.fromarray((wide >> 8).astype(np.uint8), "L")
            image = image.convert("RGB")
            if height is not None and width is not None and image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image {path} does not exist; was the dataset moved after it was listed?") from None
    except PermissionError:
        raise DatasetError(f"image {path} is not readable (permission denied); fix its permissions") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(
            f"image {path} cannot be decoded ({error}); re-extract the dataset or remove the file"
        ) from None


def decode_images(
    paths: Sequence[str], height: int, width: int, *, workers: int = 2, progress: bool = False
) -> torch.Tensor:
    """All images as one (N, 3, H, W) uint8 tensor on the CPU, decoded by `workers` threads (PIL releases the
    GIL while decoding)."""
    out = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
    view = out.numpy()  # shares memory with `out`

    def fill(index: int) -> None:
        view[index] = read_image(paths[index], height, width).transpose(2, 0, 1)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), desc="decoding images", unit="img", leave=False, disable=None)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(fill, range(len(paths))):
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return out
