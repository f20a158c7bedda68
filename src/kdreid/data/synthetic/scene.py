"""Where people walk: per-camera background panoramas and the occluders drawn in front of people.

A camera owns 2-4 panoramas (4x the crop width); a view's background is a crop of one of them at an offset that
moves as the person walks. Panoramas belong to the camera, never to an identity (no identity leak). Clutter and
occluders take their colours from the clothing vocabulary, so they can be mistaken for clothing.
"""

from __future__ import annotations

import numpy as np

from kdreid.data.synthetic.people import COLOUR_TABLE

BACKGROUND_KINDS = ("street", "campus", "indoor")
OCCLUDERS = ("none", "object", "pole", "walker")

_FACADES = np.array([(0.75, 0.70, 0.62), (0.62, 0.60, 0.58), (0.66, 0.42, 0.33), (0.80, 0.78, 0.74),
                     (0.52, 0.55, 0.58)], dtype=np.float32)
_LEAVES = np.array([(0.16, 0.34, 0.12), (0.25, 0.42, 0.16), (0.12, 0.26, 0.12)], dtype=np.float32)
_WALLS = np.array([(0.88, 0.86, 0.80), (0.82, 0.84, 0.86), (0.90, 0.88, 0.84), (0.78, 0.76, 0.70)],
                  dtype=np.float32)


def value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells x cells*width/height) grid, bilinearly upsampled. -> (H, W)."""
    gh, gw = cells + 1, max(2, int(round(cells * width / height))) + 1
    grid = rng.random((gh, gw)).astype(np.float32)
    ys = np.linspace(0, gh - 1, height, dtype=np.float32)
    xs = np.linspace(0, gw - 1, width, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), gh - 2), np.minimum(xs.astype(int), gw - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _octaves(rng, height, width, base_cells=3, octaves=3) -> np.ndarray:
    total = sum(value_noise(rng, height, width, base_cells * 2**k) / 2**k for k in range(octaves))
    return total / sum(1 / 2**k for k in range(octaves))


def _rect(image: np.ndarray, y0, y1, x0, x1, colour) -> None:
    h, w = image.shape[:2]
    y0, y1 = max(0, int(y0)), min(h, int(y1))
    x0, x1 = max(0, int(x0)), min(w, int(x1))
    if y1 > y0 and x1 > x0:
        image[y0:y1, x0:x1] = colour


def make_panorama(rng: np.random.Generator, kind: str, height: int, width: int, clutter: float) -> np.ndarray:
    """One background panorama (H, 4W, 3) float32 of the given kind (§2.5 of the design study)."""
    pano_w = 4 * width
    image = np.empty((height, pano_w, 3), dtype=np.float32)
    horizon = int(height * rng.uniform(0.35, 0.6))
    texture = _octaves(rng, height, pano_w)[..., None]  # (H, Wp, 1)
    if kind == "street":
        facade = _FACADES[rng.integers(len(_FACADES))] * rng.uniform(0.85, 1.1)
        image[:horizon] = facade * (0.85 + 0.3 * texture[:horizon])
        window = facade * rng.uniform(0.35, 0.6)
        step_x, step_y = int(width * rng.uniform(0.3, 0.5)), int(height * rng.uniform(0.12, 0.2))
        for y in range(int(step_y * 0.5), horizon - step_y // 2, step_y):
            for x in range(int(rng.integers(0, step_x)), pano_w, step_x):
                _rect(image, y, y + step_y * 0.55, x, x + step_x * 0.5, window)
        pavement = np.float32(rng.uniform(0.45, 0.65))
        image[horizon:] = pavement * (0.9 + 0.2 * texture[horizon:])
        tile = max(3, height // 14)
        image[horizon::tile] *= 0.85
    elif kind == "campus":
        sky = np.array([0.70, 0.78, 0.86], dtype=np.float32)
        image[:horizon] = sky * (0.92 + 0.1 * texture[:horizon])
        brick = np.array([0.55, 0.33, 0.25], dtype=np.float32) * rng.uniform(0.8, 1.1)
        for _ in range(rng.integers(1, 3)):
            x0 = rng.integers(0, pano_w)
            _rect(image, horizon * rng.uniform(0.2, 0.5), horizon, x0, x0 + width * rng.uniform(0.8, 2.0), brick)
        canopy = _octaves(rng, height, pano_w, base_cells=4)
        leaves = (canopy > 0.52) & (np.arange(height)[:, None] < horizon * 1.05)
        leaf = _LEAVES[rng.integers(len(_LEAVES))]
        image[leaves] = leaf * (0.7 + 0.6 * canopy[leaves][:, None])
        path = np.array([0.62, 0.58, 0.50], dtype=np.float32)
        grass = np.array([0.30, 0.48, 0.20], dtype=np.float32)
        patches = (_octaves(rng, height, pano_w, base_cells=2) > 0.5)[horizon:, :, None]
        image[horizon:] = np.where(patches, grass, path) * (0.85 + 0.3 * texture[horizon:])
    elif kind == "indoor":
        wall = _WALLS[rng.integers(len(_WALLS))]
        image[:horizon] = wall * (0.94 + 0.08 * texture[:horizon])
        for _ in range(rng.integers(2, 6)):  # doors, pillars, shop fronts
            x0 = rng.integers(0, pano_w)
            shade = wall * rng.uniform(0.55, 0.85)
            _rect(image, horizon * rng.uniform(0.0, 0.3), horizon, x0, x0 + width * rng.uniform(0.2, 0.6), shade)
        floor = np.float32(rng.uniform(0.65, 0.8))
        tile = max(4, height // 10)
        checker = ((np.arange(height)[:, None] // tile + np.arange(pano_w)[None, :] // tile) % 2).astype(np.float32)
        image[horizon:] = (floor * (0.93 + 0.07 * checker[horizon:]))[..., None] * (0.95 + 0.1 * texture[horizon:])
    else:
        raise ValueError(f"unknown background kind {kind!r}; known: {', '.join(BACKGROUND_KINDS)}")
    # clutter: cars, bins, signs in clothing colours standing on the ground
    for _ in range(rng.poisson(clutter)):
        colour = COLOUR_TABLE[rng.integers(len(COLOUR_TABLE))] * rng.uniform(0.8, 1.05)
        w = width * rng.uniform(0.15, 1.2)
        h = height * rng.uniform(0.06, 0.3)
        x0 = rng.uniform(0, pano_w)
        base = horizon + rng.uniform(0, height - horizon) * 0.6
        _rect(image, base - h, base, x0, x0 + w, colour)
    return np.clip(image, 0.0, 1.0)


def draw_occluders(rng: np.random.Generator, images: np.ndarray, kinds: np.ndarray) -> None:
    """Paint an occluder in place on each image whose kind (index into OCCLUDERS) is not 0. images (N, H, W, 3)."""
    n, height, width, _ = images.shape
    params = rng.random((n, 6))  # drawn for every image so the stream does not depend on which are occluded
    colours = COLOUR_TABLE[rng.integers(len(COLOUR_TABLE), size=n)]
    for i in np.flatnonzero(kinds):
        p = params[i]
        if kinds[i] == 1:  # a car, bench or bin rising from the bottom
            h = height * (0.18 + 0.27 * p[0])
            x0 = width * (-0.3 + 0.8 * p[1])
            _rect(images[i], height - h, height, x0, x0 + width * (0.5 + 0.8 * p[2]), colours[i])
            _rect(images[i], height - h, height - h + max(1, h * 0.12), x0, x0 + width * (0.5 + 0.8 * p[2]),
                  colours[i] * 0.7)
        elif kinds[i] == 2:  # a pole or trunk
            w = width * (0.06 + 0.1 * p[0])
            x0 = width * p[1] - w / 2
            grey = np.float32(0.25 + 0.4 * p[2])
            _rect(images[i], 0, height, x0, x0 + w, np.array([grey, grey * 0.95, grey * 0.9], np.float32))
        else:  # part of another walker entering from one side
            w = width * (0.22 + 0.2 * p[0])
            x0 = 0 if p[1] < 0.5 else width - w
            _rect(images[i], height * (0.15 + 0.1 * p[2]), height * 0.62, x0, x0 + w, colours[i])
            _rect(images[i], height * 0.62, height, x0 + w * 0.15, x0 + w * 0.85,
                  COLOUR_TABLE[int(p[3] * len(COLOUR_TABLE)) % len(COLOUR_TABLE)])
