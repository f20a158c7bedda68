"""From a plan to pixels: one chunk of images at a time, each chunk with its own random stream.

A chunk is CHUNK_SIZE consecutive plan entries; its stream is `stream(seed, domain, STREAM_CHUNKS + index)`, so the
images do not depend on how many processes render them or in which order (design study §2.8, determinism).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdreid.data.synthetic.camera import TIME_OF_DAY_GAIN, TIME_OF_DAY_TINT, CameraStyle, apply_sensor, draw_cameras
from kdreid.data.synthetic.domains import PRESETS, DomainPreset, with_gap
from kdreid.data.synthetic.people import draw_identities, mix_palettes, take
from kdreid.data.synthetic.plan import (
    KINDS,
    STREAM_CAMERAS,
    STREAM_CHUNKS,
    STREAM_IDENTITIES,
    STREAM_SCENES,
    Plan,
    plan_domain,
    stream,
)
from kdreid.data.synthetic.render import Views, render_people
from kdreid.data.synthetic.scene import OCCLUDERS, draw_occluders, make_panorama
from kdreid.errors import KdreidError

CHUNK_SIZE = 256
RENDER_MAX_HEIGHT = 160  # taller written sizes are rendered at half size and resized (4x cheaper)


@dataclass
class Domain:
    """Everything needed to render any chunk of one domain (picklable, so worker processes can receive it)."""

    preset: DomainPreset  # with the gap applied
    gap: float
    seed: int
    plan: Plan
    people: dict[str, np.ndarray]
    cameras: CameraStyle
    render_hw: tuple[int, int]

    @property
    def num_chunks(self) -> int:
        return (len(self.plan) + CHUNK_SIZE - 1) // CHUNK_SIZE


def render_size(written_hw: list[tuple[int, int]]) -> tuple[int, int]:
    """The size people are rendered at: the smallest written size, halved while taller than RENDER_MAX_HEIGHT."""
    height, width = min(written_hw)
    while height > RENDER_MAX_HEIGHT:
        height, width = height // 2, width // 2
    return height, width


def build_domain(name: str, *, scale: float, seed: int, gap: float = 1.0,
                 size: tuple[int, int] | None = None) -> Domain:
    """Identities, cameras and the plan of domain `name` (cheap: no pixels yet)."""
    if name not in PRESETS:
        raise KdreidError(f"unknown synthetic domain {name!r}; known: {', '.join(PRESETS)}")
    preset = with_gap(PRESETS[name], gap)
    cameras = draw_cameras(stream(seed, name, STREAM_CAMERAS), preset, gap)
    if size is not None:
        cameras.written_hw = [tuple(size)] * cameras.count
    plan = plan_domain(preset, scale, seed, cameras.view_mean)
    palette = mix_palettes(preset.palette, gap)
    people = draw_identities(stream(seed, name, STREAM_IDENTITIES), palette, plan.num_identities, preset.twin_rate)
    return Domain(preset, gap, seed, plan, people, cameras, render_size(cameras.written_hw))


_PANORAMA_CACHE: dict[tuple, list[np.ndarray]] = {}


def panoramas(domain: Domain, camera: int) -> list[np.ndarray]:
    """The camera's panoramas at render size (cached per process; drawn from the camera's own stream)."""
    key = (domain.preset, domain.seed, domain.gap, camera, domain.render_hw, domain.cameras.background[camera])
    if key not in _PANORAMA_CACHE:
        if len(_PANORAMA_CACHE) > 64:  # a process that builds many domains (tests) keeps only recent cameras
            _PANORAMA_CACHE.clear()
        rng = stream(domain.seed, domain.preset.name, STREAM_SCENES + camera)
        kind = domain.cameras.background[camera]
        _PANORAMA_CACHE[key] = [
            make_panorama(rng, kind, *domain.render_hw, domain.preset.clutter)
            for _ in range(domain.plan.num_panoramas[camera])
        ]
    return _PANORAMA_CACHE[key]


def render_chunk(domain: Domain, chunk: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Images of plan entries [chunk*CHUNK_SIZE, ...) as uint8 (n, h, w, 3) at render size, and the per-image
    latent factors drawn for them (for the manifest)."""
    plan, preset = domain.plan, domain.preset
    index = np.arange(chunk * CHUNK_SIZE, min(len(plan), (chunk + 1) * CHUNK_SIZE))
    n = len(index)
    height, width = domain.render_hw
    rng = stream(domain.seed, preset.name, STREAM_CHUNKS + chunk)

    # per-image nuisance around the tracklet's values (all drawn for every image, in a fixed order)
    theta = plan.theta[index] + rng.normal(0, 0.12, n)
    scale = np.clip(plan.scale[index] + rng.normal(0, 0.02, n), 0.6, 1.15)
    dx = rng.normal(0, preset.box_jitter, n)
    dy = rng.normal(0, preset.box_jitter, n)
    occluded = rng.random(n) < preset.occlusion
    occluder = np.where(occluded, rng.integers(1, len(OCCLUDERS), n), 0)
    junk_scale = rng.uniform(3.1, 4.0, n)
    junk_top = rng.uniform(0, 1, n)
    kind = plan.kind[index]
    is_junk = kind == KINDS.index("junk")
    # junk: the box holds less than a third of the person (a head, or a pair of legs)
    scale = np.where(is_junk, junk_scale, scale)
    top = np.where(is_junk, -junk_top * (junk_scale - 1.0), 0.5 - scale / 2 + dy)
    centre_x = dx * (width / height)
    views = Views(theta=theta, phase=plan.phase[index], scale=scale, top=top, centre_x=centre_x,
                  visible=(kind != KINDS.index("background")).astype(np.float32))
    rgb, alpha = render_people(take(domain.people, plan.identity[index]), views, height, width)

    # background: a crop of one of the camera's panoramas that moves as the person walks
    camera = plan.camera[index]
    offset = (plan.pano_offset[index] + plan.pano_speed[index] * plan.step[index]) % 2.0
    offset = np.where(offset > 1.0, 2.0 - offset, offset)  # walk back and forth across the panorama
    columns = (offset * 3 * width).astype(np.int64)
    for i in range(n):
        background = panoramas(domain, int(camera[i]))[plan.panorama[index[i]]]
        rgb[i] += (1.0 - alpha[i, :, :, None]) * background[:, columns[i]:columns[i] + width]
    draw_occluders(rng, rgb, occluder)

    # camera: exposure and tint of the time of day (MSMT-like) or a small per-tracklet exposure jitter
    tod = plan.time_of_day[index]
    exposure = plan.exposure[index].astype(np.float32)
    tint = np.ones((n, 3), dtype=np.float32)
    has_tod = tod >= 0
    if has_tod.any():
        g = domain.gap
        exposure[has_tod] *= 1.0 + (TIME_OF_DAY_GAIN[tod[has_tod]] - 1.0) * g
        tint[has_tod] = 1.0 + (TIME_OF_DAY_TINT[tod[has_tod]] - 1.0) * g
    images = apply_sensor(rng, rgb, camera, exposure, tint, domain.cameras)
    factors = dict(view=np.mod(theta, 2 * np.pi), phase=np.mod(plan.phase[index], 2 * np.pi), scale=scale,
                   dx=dx, dy=dy, occluder=occluder, pano_column=columns)
    return images, factors


def render_entries(domain: Domain, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, render size, before JPEG) of the plan entries where `wanted` (bool, per entry) is true,
    rendering only the chunks that hold them. Returns (entry indices, images)."""
    chunks = np.unique(np.flatnonzero(wanted) // CHUNK_SIZE)
    indices, images = [], []
    for chunk in chunks:
        chunk_images, _ = render_chunk(domain, int(chunk))
        entries = np.arange(chunk * CHUNK_SIZE, chunk * CHUNK_SIZE + len(chunk_images))
        keep = wanted[entries]
        indices.append(entries[keep])
        images.append(chunk_images[keep])
    return np.concatenate(indices), np.concatenate(images)
