"""Camera style and the sensor pipeline: where most of a domain's look comes from.

Each camera draws its settings once from its domain's ranges (`draw_cameras`); `apply_sensor` runs a float batch
through exposure, a lateral light ramp, colour cross-talk and white balance, gamma, contrast, saturation, haze,
resolution loss with blur, and shot-like noise, then quantises to uint8 (JPEG at the camera's quality is applied
when the file is written). Order and severities follow ImageNet-C style units (design study §2.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from kdreid.data.synthetic.domains import NEUTRAL_BACKGROUND, DomainPreset

# MSMT17's three periods: exposure gain and white-balance tint (R, G, B) of morning, noon and afternoon light.
TIME_OF_DAY_NAMES = ("morning", "noon", "afternoon")
TIME_OF_DAY_GAIN = np.array([0.78, 1.12, 0.9], dtype=np.float32)
TIME_OF_DAY_TINT = np.array([(1.08, 1.0, 0.88), (0.97, 1.0, 1.06), (1.12, 1.0, 0.84)], dtype=np.float32)


@dataclass
class CameraStyle:
    """Per-camera sensor settings of one domain; every field is indexed by the camera (0-based)."""

    gain: np.ndarray  # (C,)
    colour: np.ndarray  # (C, 3, 3) cross-talk then white balance, applied as x @ colour.T
    gamma: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    haze: np.ndarray
    light_ramp: np.ndarray  # lateral light gradient, -r..r across the crop
    resolution: np.ndarray
    blur: np.ndarray  # sigma in pixels at 128x64
    noise: np.ndarray
    jpeg_quality: np.ndarray  # (C,) int
    view_mean: np.ndarray  # each camera's dominant walking direction (radians)
    background: list[str]  # panorama kind per camera
    written_hw: list[tuple[int, int]]  # image size written to disk per camera

    @property
    def count(self) -> int:
        return len(self.gain)


def draw_cameras(rng: np.random.Generator, preset: DomainPreset, gap: float) -> CameraStyle:
    """Draw every camera's settings from the (gap-adjusted) preset's ranges."""
    c = preset.num_cameras
    uniform = lambda r: rng.uniform(r[0], r[1], size=c).astype(np.float32)  # noqa: E731
    crosstalk = np.eye(3, dtype=np.float32) + rng.normal(0, 0.3 * preset.cast, size=(c, 3, 3)).astype(np.float32)
    crosstalk /= crosstalk.sum(axis=2, keepdims=True)  # rows sum to 1: grey stays grey before white balance
    balance = np.exp(rng.normal(0, preset.cast, size=(c, 3))).astype(np.float32)
    balance /= balance[:, 1:2]  # normalised to green, as a camera's AWB would be
    own_background = rng.random(c) < gap  # the gap dial mixes the domain's scenes with the neutral one
    return CameraStyle(
        gain=uniform(preset.gain),
        colour=balance[:, :, None] * crosstalk,
        gamma=uniform(preset.gamma),
        contrast=uniform(preset.contrast),
        saturation=uniform(preset.saturation),
        haze=uniform(preset.haze),
        light_ramp=rng.uniform(-preset.light_ramp, preset.light_ramp, size=c).astype(np.float32),
        resolution=uniform(preset.resolution),
        blur=uniform(preset.blur),
        noise=uniform(preset.noise),
        jpeg_quality=rng.integers(preset.jpeg_quality[0], preset.jpeg_quality[1] + 1, size=c),
        view_mean=rng.uniform(0, 2 * np.pi, size=c).astype(np.float32),
        background=[preset.backgrounds[i % len(preset.backgrounds)] if own_background[i] else NEUTRAL_BACKGROUND
                    for i in range(c)],
        written_hw=[preset.sizes_hw[i % len(preset.sizes_hw)] for i in range(c)],
    )


@lru_cache(maxsize=256)
def resample_blur_matrix(n: int, resolution: float, sigma: float) -> np.ndarray:
    """(n, n) linear operator along one axis: antialiased down-sampling by `resolution`, bilinear up-sampling
    back to n, then a Gaussian blur of `sigma` pixels. Rows sum to 1 (borders renormalised)."""
    low = max(2, int(round(n * resolution)))
    ratio = low / n
    # down: output i (low grid) takes a triangle of width 1/ratio around its centre in input coordinates
    centres = (np.arange(low) + 0.5) / ratio - 0.5
    down = np.maximum(0.0, 1.0 - np.abs(np.arange(n)[None, :] - centres[:, None]) * min(1.0, ratio))
    down /= down.sum(axis=1, keepdims=True)
    positions = (np.arange(n) + 0.5) * ratio - 0.5
    up = np.maximum(0.0, 1.0 - np.abs(np.arange(low)[None, :] - np.clip(positions, 0, low - 1)[:, None]))
    up /= up.sum(axis=1, keepdims=True)
    operator = _product(up, down)
    if sigma > 0.05:
        offsets = np.arange(n)[:, None] - np.arange(n)[None, :]
        blur = np.exp(-0.5 * (offsets / sigma) ** 2)
        blur[np.abs(offsets) > 3 * sigma + 1] = 0.0
        blur /= blur.sum(axis=1, keepdims=True)
        operator = _product(blur, operator)
    return operator.astype(np.float32)


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b without BLAS: a threaded BLAS sums in an order that depends on its thread count (OMP_NUM_THREADS, the
    number of cores), which moves a few pixels across a rounding boundary; numpy's own einsum loop does not."""
    return np.einsum("ij,jk->ik", a, b, optimize=False)


@lru_cache(maxsize=256)
def _diagonals(n: int, resolution: float, sigma: float) -> tuple[tuple[int, int, int, np.ndarray], ...]:
    """The non-zero diagonals of `resample_blur_matrix` (a band a few pixels wide): (offset, first, stop, weights)."""
    operator = resample_blur_matrix(n, resolution, sigma)
    rows, cols = np.nonzero(operator)
    diagonals = []
    for offset in np.unique(cols - rows).tolist():
        first, stop = max(0, -offset), min(n, n - offset)
        index = np.arange(first, stop)
        diagonals.append((offset, first, stop, operator[index, index + offset]))
    return tuple(diagonals)


def _filter_rows(x: np.ndarray, resolution: float, sigma: float) -> np.ndarray:
    """`resample_blur_matrix` applied along axis 1 of x (N, n, ...), as one elementwise multiply-add per diagonal of
    its band, in a fixed order: the same float32 result on any machine with any number of threads (a BLAS matmul's
    is not), at about the speed of the dense matmul for a band this narrow."""
    out, product = np.zeros_like(x), np.empty_like(x)
    for offset, first, stop, weights in _diagonals(x.shape[1], resolution, sigma):
        into, term = out[:, first:stop], product[:, first:stop]
        weights = weights.reshape((1, stop - first) + (1,) * (x.ndim - 2))
        np.multiply(weights, x[:, first + offset:stop + offset], out=term)
        np.add(into, term, out=into)
    return out


def _mix_channels(x: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """x (N, H, W, 3) times each image's 3x3 `colour` (N, 3, 3) as x @ colour.T, elementwise in a fixed order: a BLAS
    matmul picks its kernel (FMA or not) by CPU, so its last bits, and a few pixels, would depend on the machine."""
    out, term = np.empty_like(x), np.empty(x.shape[:3], dtype=x.dtype)
    for d in range(3):
        into = out[..., d]
        np.multiply(x[..., 0], colour[:, d, 0, None, None], out=into)
        for s in (1, 2):
            np.multiply(x[..., s], colour[:, d, s, None, None], out=term)
            np.add(into, term, out=into)
    return out


def apply_sensor(
    rng: np.random.Generator,
    images: np.ndarray,
    cameras: np.ndarray,
    exposure: np.ndarray,
    tint: np.ndarray,
    style: CameraStyle,
) -> np.ndarray:
    """images (N, H, W, 3) float32 in [0, 1], each seen by camera `cameras[i]` with a per-image exposure factor
    (N,) and white-balance tint (N, 3) (time of day). Returns uint8 (N, H, W, 3). `images` is modified."""
    n, height, width, _ = images.shape
    at = lambda values: values[cameras].reshape(n, 1, 1, 1)  # noqa: E731
    x = images
    # 1-2. exposure and a lateral light ramp
    across = np.linspace(-1.0, 1.0, width, dtype=np.float32).reshape(1, 1, width, 1)
    x *= at(style.gain) * exposure.reshape(n, 1, 1, 1).astype(np.float32) * (1.0 + at(style.light_ramp) * across)
    # 3. cross-talk and white balance (with the time-of-day tint), one 3x3 matrix per image
    colour = style.colour[cameras] * tint.astype(np.float32)[:, :, None]  # (N, 3, 3)
    x = _mix_channels(x, colour)
    # 4-7. gamma, contrast about the mean, saturation about grey, haze towards light grey
    x = np.exp(np.log(np.clip(x, 1e-4, 1.5)) * at(style.gamma))
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = mean + at(style.contrast) * (x - mean)
    grey = x.mean(axis=3, keepdims=True)
    x = grey + at(style.saturation) * (x - grey)
    haze = at(style.haze)
    x = x * (1.0 - haze) + haze * 0.75
    # 8-9. resolution loss and blur: one separable linear operator per camera (blur given at 128 px height)
    for camera in np.unique(cameras):
        members = np.flatnonzero(cameras == camera)
        res, sigma = float(style.resolution[camera]), float(style.blur[camera])
        group = _filter_rows(x[members], res, sigma * height / 128)  # (g, H, W, 3)
        group = _filter_rows(np.ascontiguousarray(group.transpose(0, 2, 1, 3)), res, sigma * height / 128)
        x[members] = group.transpose(0, 2, 1, 3)
    # 10. shot-like noise, drawn from the chunk's stream
    sigma = at(style.noise) * (0.5 + np.sqrt(np.clip(x, 0.0, None)))
    x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
    # 11. quantise
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
