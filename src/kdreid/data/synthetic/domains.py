"""The frozen domain presets: what makes synth_market look like Market-1501 and not like MSMT17.

A preset fixes the *population* (split sizes at --scale 1, cameras, cameras per identity, clothing palette,
look-alike rate) and the *style* of its cameras (ranges each camera draws its sensor settings from: exposure,
colour cast, gamma, contrast, saturation, haze, resolution, blur, noise, JPEG quality), its backgrounds and its
per-image nuisances (occlusion rate, box jitter, scale). Starting values are the design study's §2.7 table with
the §2.9 rule applied: synth_msmt (the usual source) is narrow (street + mall, resolution >= 0.75, its own
palette), and every target keeps at least two style factors outside the source's range:

    synth_market  summer palette, saturation 1.15-1.4, box jitter 8 %         (msmt: 0.8-1.05, 6 %)
    synth_duke    campus + heavy clutter, gain 0.5-0.68, occlusion 35 %         (msmt: street/mall, 0.75-0.95, 20 %)
    synth_cuhk    resolution 0.45-0.6, contrast 0.65-0.85, casts 0.14 per view  (msmt: >= 0.75, 0.85-1.05, 0.12)

The CNN calibration of §2.9 (source-only at 0.25-0.5 of the target's in-domain mAP) belongs to the training
stages; when it moves a value, the value changes here and nowhere else. It moved one, once: synth_cuhk's cast,
0.06 -> 0.14 (docs/synthetic.md, "Calibration").

`with_gap(preset, G)` moves every style range towards `NEUTRAL` (bright, no cast, sharp, JPEG 92, mixed palette,
street background): G=1 is the preset, G=0 leaves domains that differ only in cameras and identities.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

Range = tuple[float, float]


@dataclass(frozen=True)
class SplitSizes:
    """Sizes of the real dataset a domain mimics, as torchreid counts them (junk excluded; gallery images
    include the distractors)."""

    train_ids: int
    train_images: int
    test_ids: int
    query_images: int
    gallery_images: int


@dataclass(frozen=True)
class DomainPreset:
    name: str
    imitates: str
    sizes: SplitSizes
    num_cameras: int  # physical cameras (each with its own style)
    cameras_per_id: tuple[int, int]  # inclusive range; test ids need >= 2 so every query has a match
    camera_pairs: bool = False  # CUHK03: cameras come in pairs, an id is seen by the two views of one pair
    distractor_fraction: float = 0.05  # share of the gallery written as 0000_ (one-camera people, bad crops)
    junk_fraction: float = 0.03  # extra -1_ crops (less than a third of a person), relative to the gallery
    # population
    palette: str = "mixed"
    twin_rate: float = 0.45  # look-alikes: copies of an earlier identity with 1-2 attributes re-drawn
    # scene
    backgrounds: tuple[str, ...] = ("street",)
    clutter: float = 4.0  # mean number of clothing-coloured objects per panorama
    # camera style: each camera draws its settings uniformly from these ranges
    gain: Range = (0.95, 1.05)
    cast: float = 0.03  # sigma of log white-balance gains; cross-talk sigma is 0.3 x this
    gamma: Range = (0.95, 1.05)
    contrast: Range = (0.95, 1.05)
    saturation: Range = (0.95, 1.05)
    haze: Range = (0.0, 0.02)
    light_ramp: float = 0.1  # max lateral light gradient across the crop
    time_of_day: float = 0.05  # sigma of per-tracklet log exposure; synth_msmt uses its 3-period table instead
    resolution: Range = (0.95, 1.0)
    blur: Range = (0.2, 0.4)  # gaussian sigma in pixels at 128x64
    noise: Range = (0.01, 0.015)
    jpeg_quality: tuple[int, int] = (90, 95)
    # per-image nuisance
    occlusion: float = 0.1
    box_jitter: float = 0.05  # sigma of the box centre/top offsets, as a fraction of the box
    scale: Range = (0.8, 1.02)  # person height / box height
    view_spread: float = 0.7  # radians around each camera's dominant walking direction
    # written image sizes (H, W); one per camera, cycled; synth_msmt mixes sizes per camera
    sizes_hw: tuple[tuple[int, int], ...] = ((128, 64),)


# Settings a domain moves towards as the gap dial goes to 0 (only the style fields; population sizes stay).
NEUTRAL = dict(
    gain=(1.0, 1.0),
    cast=0.0,
    gamma=(1.0, 1.0),
    contrast=(1.0, 1.0),
    saturation=(1.0, 1.0),
    haze=(0.0, 0.0),
    light_ramp=0.0,
    time_of_day=0.0,
    resolution=(1.0, 1.0),
    blur=(0.3, 0.3),
    noise=(0.01, 0.01),
    jpeg_quality=(92, 92),
    occlusion=0.1,
    box_jitter=0.05,
    scale=(0.85, 1.0),
    clutter=3.0,
)

NEUTRAL_BACKGROUND = "street"
NEUTRAL_PALETTE = "mixed"  # what a gap below 1 blends a domain's clothing palette towards (people.mix_palettes)

PRESETS: dict[str, DomainPreset] = {
    p.name: p
    for p in (
        DomainPreset(
            name="synth_market",
            imitates="Market-1501: summer street, 6 cameras, DPM boxes, 128x64",
            sizes=SplitSizes(751, 12936, 750, 3368, 15913),
            num_cameras=6,
            cameras_per_id=(2, 6),
            distractor_fraction=0.175,  # Market's 0000 crops are ~2.8k of the 15.9k gallery images
            junk_fraction=0.2,
            palette="summer",
            backgrounds=("street",),
            clutter=3.0,
            gain=(1.05, 1.2),
            cast=0.05,
            gamma=(0.95, 1.05),
            contrast=(0.95, 1.15),
            saturation=(1.15, 1.4),
            haze=(0.0, 0.03),
            light_ramp=0.15,
            time_of_day=0.05,
            resolution=(0.9, 1.0),
            blur=(0.2, 0.5),
            noise=(0.01, 0.02),
            jpeg_quality=(88, 95),
            occlusion=0.08,
            box_jitter=0.08,
            scale=(0.75, 1.05),
            view_spread=0.6,
            sizes_hw=((128, 64),),
        ),
        DomainPreset(
            name="synth_duke",
            imitates="DukeMTMC-reID: winter campus, 8 cameras, hand-drawn boxes, heavy occlusion",
            sizes=SplitSizes(702, 16522, 702, 2228, 17661),
            num_cameras=8,
            cameras_per_id=(2, 5),
            distractor_fraction=0.05,
            junk_fraction=0.0,  # Duke ships no junk crops
            palette="winter",
            backgrounds=("campus",),
            clutter=9.0,
            gain=(0.5, 0.68),
            cast=0.10,
            gamma=(1.05, 1.25),
            contrast=(0.75, 0.95),
            saturation=(0.7, 0.95),
            haze=(0.05, 0.2),
            light_ramp=0.25,
            time_of_day=0.05,
            resolution=(0.8, 1.0),
            blur=(0.4, 0.8),
            noise=(0.02, 0.035),
            jpeg_quality=(78, 88),
            occlusion=0.35,
            box_jitter=0.04,
            scale=(0.85, 1.0),
            view_spread=0.8,
            sizes_hw=((256, 128),),
        ),
        DomainPreset(
            name="synth_cuhk",
            imitates="CUHK03 (new protocol): 5 camera pairs, each id in the two views of one pair, indoor, low-res",
            sizes=SplitSizes(767, 7365, 700, 1400, 5332),
            num_cameras=10,
            cameras_per_id=(2, 2),
            camera_pairs=True,
            distractor_fraction=0.03,
            junk_fraction=0.0,
            palette="mixed",
            backgrounds=("indoor",),
            clutter=2.0,
            gain=(0.8, 1.0),
            # Strong per-view casts (design study's 0.14), set by the CNN calibration: at 0.06 the source-only
            # model matched this domain better than its own in-domain model (docs/synthetic.md, "Calibration").
            cast=0.14,
            gamma=(1.0, 1.1),
            contrast=(0.65, 0.85),
            saturation=(0.9, 1.1),
            haze=(0.0, 0.05),
            light_ramp=0.1,
            time_of_day=0.05,
            resolution=(0.45, 0.6),
            blur=(0.6, 1.0),
            noise=(0.03, 0.05),
            jpeg_quality=(65, 78),
            occlusion=0.12,
            box_jitter=0.06,
            scale=(0.8, 1.02),
            view_spread=0.5,
            sizes_hw=((160, 64),),
        ),
        DomainPreset(
            name="synth_msmt",
            imitates="MSMT17: 15 cameras (12 outdoor street, 3 indoor mall), 3 times of day, many ids",
            sizes=SplitSizes(1041, 32621, 3060, 11659, 82161),
            num_cameras=15,
            cameras_per_id=(2, 5),
            distractor_fraction=0.05,
            junk_fraction=0.0,
            palette="mixed_winter",
            backgrounds=("street",) * 12 + ("indoor",) * 3,  # per camera, cycled
            clutter=4.0,
            gain=(0.75, 0.95),
            cast=0.12,
            gamma=(0.9, 1.25),
            contrast=(0.85, 1.05),
            saturation=(0.8, 1.05),
            haze=(0.0, 0.08),
            light_ramp=0.2,
            time_of_day=-1.0,  # < 0: morning / noon / afternoon table (camera.TIME_OF_DAY)
            resolution=(0.75, 1.0),
            blur=(0.3, 0.9),
            noise=(0.02, 0.04),
            jpeg_quality=(70, 90),
            occlusion=0.20,
            box_jitter=0.06,
            scale=(0.8, 1.02),
            view_spread=0.7,
            sizes_hw=((128, 64), (160, 64), (192, 96), (256, 128)),
        ),
    )
}

DOMAIN_NAMES = tuple(PRESETS)


def _lerp(neutral, value, g: float):
    if isinstance(value, tuple):
        return tuple(_lerp(n, v, g) for n, v in zip(neutral, value))
    if isinstance(value, int) and isinstance(neutral, int):
        return int(round(neutral + (value - neutral) * g))
    return float(neutral + (value - neutral) * g)


def with_gap(preset: DomainPreset, gap: float) -> DomainPreset:
    """The preset with every style range moved towards NEUTRAL: gap=1 unchanged, gap=0 fully neutral.
    Palette and background are mixed with probability `gap` at sampling time (see `GapMix`)."""
    if not 0.0 <= gap <= 1.0:
        raise ValueError(f"gap must be in [0, 1], got {gap}")
    changes = {}
    for name, neutral in NEUTRAL.items():
        value = getattr(preset, name)
        if name == "time_of_day" and value < 0:
            continue  # the 3-period table is scaled by the gap where it is applied
        changes[name] = _lerp(neutral, value, gap)
    return dataclasses.replace(preset, **changes)
