"""Batch augmentation on the training device: horizontal flip, pad-and-crop and random erasing, each with
its own randomness per sample, on a uint8 batch from the image cache. Normalisation lives in the model.

These are the re-ID augmentations of torchreid/fast-reid practice (Zhong et al., "Random Erasing Data
Augmentation", 2017, for the erasing); colour jitter is deliberately absent: it would erase the camera-style
gap that adaptation is meant to bridge. Each draw follows the distribution of the CPU transforms it replaces
(torchvision's RandomHorizontalFlip, Pad + RandomCrop, and torchreid's RandomErasing with its defaults): see
tests/data/test_augment.py. The erased rectangle is filled with the ImageNet mean colour on [0, 1] images (0 after
the model's normalisation), as fast-reid does; torchreid's builder writes the same numbers into the normalised tensor.
Nothing here reads a value back to the host, so a CUDA step never waits on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdreid.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


@dataclass
class AugmentConfig:
    flip: float = 0.5  # probability of a horizontal flip
    pad: int = 10  # pixels of zero padding before a random crop back to H×W; 0 = no crop
    erase: float = 0.5  # probability of random erasing
    erase_area: tuple[float, float] = (0.02, 0.4)  # erased fraction of the image
    erase_aspect: float = 0.3  # aspect ratio drawn from [r, 1/r]
    erase_attempts: int = 100  # rectangles tried per sample before giving up, as torchreid's RandomErasing

    def validate(self) -> None:
        """Values no augmentation can use: one ConfigError naming the key (a probability of 2 flipped always)."""
        for key in ("flip", "erase"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"train.augment.{key} is a probability, from 0 to 1; got {getattr(self, key)}")
        low, high = self.erase_area
        if not 0 <= low <= high <= 1:
            raise ConfigError(f"train.augment.erase_area must be two fractions 0 <= low <= high <= 1; got "
                              f"{list(self.erase_area)}")
        if not 0 < self.erase_aspect < math.inf:  # r and 1/r give the same range [min, max]
            raise ConfigError(f"train.augment.erase_aspect must be positive; got {self.erase_aspect}")
        for key in ("pad", "erase_attempts"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.augment.{key} must be 0 or more; got {getattr(self, key)}")


def augment_batch(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """images (B, 3, H, W) uint8 -> (B, 3, H, W) float in [0, 1], augmented on images.device, laid out in
    `memory_format` (channels_last for a CUDA model in that layout)."""
    x = images.float().div_(255.0)
    batch, _, height, width = x.shape
    device = x.device

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=device)

    if config.flip > 0:
        flip = uniform(batch) < config.flip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)

    if config.pad > 0:
        padded = F.pad(x, (config.pad,) * 4)  # (B, 3, H + 2p, W + 2p), zeros as torchvision's Pad
        top = (uniform(batch) * (2 * config.pad + 1)).long()
        left = (uniform(batch) * (2 * config.pad + 1)).long()
        rows = top[:, None] + torch.arange(height, device=device)  # (B, H)
        cols = left[:, None] + torch.arange(width, device=device)  # (B, W)
        b = torch.arange(batch, device=device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, 3, H, W)

    x = x.contiguous(memory_format=memory_format)
    if config.erase > 0:
        x = _random_erase(x, config, uniform)
    return x


def _random_erase(x: torch.Tensor, config: AugmentConfig, uniform) -> torch.Tensor:
    # Each sample draws up to `erase_attempts` rectangles and keeps the first that fits, as the reference
    # implementation retries (drawn all at once: (B, attempts)); a sample whose attempts all fail is left unerased.
    attempts = max(1, config.erase_attempts)
    batch, _, height, width = x.shape
    low, high = config.erase_area
    area = (low + (high - low) * uniform(batch, attempts)) * height * width
    aspect = config.erase_aspect + (1.0 / config.erase_aspect - config.erase_aspect) * uniform(batch, attempts)
    h = (area * aspect).sqrt().round().long()
    w = (area / aspect).sqrt().round().long()
    fits = (h < height) & (w < width)  # as torchreid: a rectangle rounded to zero size 'fits' and erases nothing
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros_like(fits[:, 0], dtype=torch.long))
    pick = torch.arange(batch, device=x.device)
    h, w = h[pick, first], w[pick, first]
    apply = (uniform(batch) < config.erase) & fits.any(1)
    top = (uniform(batch) * (height - h + 1)).long()
    left = (uniform(batch) * (width - w + 1)).long()
    rows = torch.arange(height, device=x.device)[None, :]
    cols = torch.arange(width, device=x.device)[None, :]
    inside_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # (B, H)
    inside_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # (B, W)
    mask = inside_rows[:, :, None] & inside_cols[:, None, :] & apply[:, None, None]  # (B, H, W)
    # One masked fill per channel with a Python scalar: a tensor of the means would be a host-to-device copy.
    for channel, mean in enumerate(IMAGENET_MEAN):
        x[:, channel].masked_fill_(mask, mean)
    return x
