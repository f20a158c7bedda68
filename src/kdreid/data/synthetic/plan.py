"""Who is seen where: identities, cameras, tracklets, frames and splits of one domain, before any pixel exists.

The plan is a struct of arrays with one entry per image. It fixes the split sizes (at --scale 1 those of the
dataset a domain mimics, exactly where the protocol allows), the file names and every per-tracklet latent factor
(walking direction, phase, panorama, time of day). Per-image jitter is drawn later, per chunk.

Nuisances never depend on pid: cameras per identity are drawn uniformly, panoramas, frame bases, sequences, box
indices and time of day per tracklet, all from the plan's own stream.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from kdreid.data.synthetic.domains import DomainPreset
from kdreid.errors import KdreidError

# Stream ids: every random draw comes from np.random.default_rng([seed, crc32(domain), stream]).
STREAM_IDENTITIES = 1
STREAM_PLAN = 2
STREAM_CAMERAS = 3
STREAM_SCENES = 1_000  # + camera index
STREAM_CHUNKS = 1_000_000  # + chunk index

SPLITS = ("train", "query", "gallery")
KINDS = ("person", "background", "junk")  # background = a distractor crop with nobody in it
PANORAMAS_PER_CAMERA = (2, 4)  # inclusive range
FRAME_STEPS = (3, 12)  # frames between two images of a tracklet (inclusive)
PHASE_PER_FRAME = 0.26  # radians: a walking cycle takes ~24 frames at 25 fps


def stream(seed: int, domain: str, stream_id: int) -> np.random.Generator:
    """The one way to get randomness: stable across processes and Python versions (no hash(), no global RNG)."""
    return np.random.default_rng([seed, zlib.crc32(domain.encode()), stream_id])


@dataclass
class Plan:
    """One entry per image (all arrays (n_images,)), plus per-domain facts."""

    domain: str
    split: np.ndarray  # index into SPLITS
    kind: np.ndarray  # index into KINDS
    pid: np.ndarray  # as written: >= 1 person, 0 distractor, -1 junk
    camera: np.ndarray  # physical camera, 0-based (its style)
    camid: np.ndarray  # camera id written in the file name (1-based; the view 1/2 for camera pairs)
    seq: np.ndarray
    frame: np.ndarray
    box: np.ndarray
    tracklet: np.ndarray  # unique per tracklet in the domain
    identity: np.ndarray  # row of the identity table
    step: np.ndarray  # index of the image inside its tracklet
    # per-tracklet latent factors, repeated per image
    theta: np.ndarray
    phase: np.ndarray
    scale: np.ndarray
    panorama: np.ndarray
    pano_offset: np.ndarray  # fraction of the panorama's free width at the first frame
    pano_speed: np.ndarray  # fraction per image step
    time_of_day: np.ndarray  # index into camera.TIME_OF_DAY_NAMES for MSMT-like domains, else -1
    exposure: np.ndarray  # per-tracklet exposure jitter (time of day for the other domains)
    num_identities: int
    num_panoramas: np.ndarray  # (C,)

    def __len__(self) -> int:
        return len(self.pid)

    def file_name(self, i: int) -> str:
        """Market-1501 naming: `0002_c1s3_000451_01.jpg`; junk is `-1_...` (the camera may take two digits)."""
        pid = "-1" if self.pid[i] < 0 else f"{self.pid[i]:04d}"
        return f"{pid}_c{self.camid[i]}s{self.seq[i]}_{self.frame[i]:06d}_{self.box[i]:02d}.jpg"


def _split_counts(rng: np.random.Generator, total: int, parts: int, minimum: int) -> np.ndarray:
    """`total` split into `parts` counts, each >= minimum, the rest multinomial with gamma(1.5) weights."""
    base = np.full(parts, minimum, dtype=np.int64)
    rest = total - base.sum()
    if rest <= 0:
        return base
    weights = rng.gamma(1.5, size=parts)
    return base + rng.multinomial(rest, weights / weights.sum())


def _counts_with_sum(rng: np.random.Generator, n: int, low: int, high: int, target: int) -> np.ndarray:
    """n integers in [low, high], uniform at first, then nudged one at a time until they sum to target
    (clipped to the reachable range)."""
    counts = rng.integers(low, high + 1, size=n)
    target = int(np.clip(target, low * n, high * n))
    while counts.sum() != target:
        up = counts.sum() < target
        movable = np.flatnonzero(counts < high) if up else np.flatnonzero(counts > low)
        counts[rng.choice(movable)] += 1 if up else -1
    return counts


class _Builder:
    """Collects tracklets (who, where, how many frames); `build()` draws their latent factors in one vectorised
    pass and expands everything to per-image arrays."""

    def __init__(self, rng: np.random.Generator, preset: DomainPreset, views: np.ndarray, num_panoramas: np.ndarray):
        self.rng, self.preset, self.views, self.num_panoramas = rng, preset, views, num_panoramas
        self.tracklets: list[tuple[int, int, int, int, int, int, int]] = []

    def add(self, *, split: int, kind: int, pid: int, camera: int, identity: int, length: int, query_at: int = -1):
        """One tracklet of `length` consecutive frames; image `query_at` of it goes to the query split."""
        self.tracklets.append((split, kind, pid, camera, identity, length, query_at))

    def build(self) -> dict[str, np.ndarray]:
        rng, preset = self.rng, self.preset
        columns = (np.array(c, dtype=np.int64) for c in zip(*self.tracklets))
        split, kind, pid, camera, identity, length, query_at = columns
        t = len(length)
        # per-tracklet factors, drawn for all tracklets at once (none of them looks at pid)
        frame_step = rng.integers(FRAME_STEPS[0], FRAME_STEPS[1] + 1, size=t)
        first_frame = (rng.random(t) * (999_999 - frame_step * length)).astype(np.int64)
        seq = rng.integers(1, 7, size=t)
        box = rng.choice(np.array([1, 1, 1, 1, 2, 3]), size=t)
        theta = self.views[camera] + rng.normal(0, preset.view_spread, size=t)
        phase = rng.uniform(0, 2 * np.pi, size=t)
        scale = rng.uniform(preset.scale[0], preset.scale[1], size=t)
        panorama = (rng.random(t) * self.num_panoramas[camera]).astype(np.int64)
        pano_offset = rng.uniform(0, 1, size=t)
        pano_speed = np.sin(theta) * frame_step * rng.uniform(0.004, 0.01, size=t)
        time_of_day = rng.integers(0, 3, size=t) if preset.time_of_day < 0 else np.full(t, -1)
        exposure = np.exp(rng.normal(0, max(preset.time_of_day, 0.0), size=t))
        if preset.camera_pairs:  # CUHK03 style: the file's camera is the view, its sequence the pair
            camid, seq = camera % 2 + 1, camera // 2 + 1
        else:
            camid = camera + 1

        per_image = lambda values: np.repeat(values, length)  # noqa: E731
        starts = np.cumsum(length) - length
        step = np.arange(length.sum()) - per_image(starts)  # index of each image inside its tracklet
        image_split = per_image(split)
        has_query = query_at >= 0
        image_split[starts[has_query] + query_at[has_query]] = SPLITS.index("query")
        return dict(
            split=image_split, kind=per_image(kind), pid=per_image(pid), camera=per_image(camera),
            camid=per_image(camid), seq=per_image(seq), frame=per_image(first_frame) + per_image(frame_step) * step,
            box=per_image(box), tracklet=per_image(np.arange(t)), identity=per_image(identity), step=step,
            theta=per_image(theta), phase=per_image(phase) + per_image(PHASE_PER_FRAME * frame_step) * step,
            scale=per_image(scale), panorama=per_image(panorama), pano_offset=per_image(pano_offset),
            pano_speed=per_image(pano_speed), time_of_day=per_image(time_of_day), exposure=per_image(exposure),
        )


def identity_counts(preset: DomainPreset, scale: float) -> tuple[int, int]:
    """(train ids, test ids) of `preset` at `scale`."""
    return max(2, round(preset.sizes.train_ids * scale)), max(2, round(preset.sizes.test_ids * scale))


def check_pid_capacity(preset: DomainPreset, scale: float) -> None:
    """One line when the domain's pids do not fit the 4 digits of Market-1501 names (cheap: callers check every
    domain before rendering any)."""
    needed = sum(identity_counts(preset, scale))
    if needed > 9999:
        limit = math.floor(100 * 9999 / (preset.sizes.train_ids + preset.sizes.test_ids)) / 100
        raise KdreidError(
            f"{preset.name} at --scale {scale} needs {needed} pids, more than the 4 digits of the Market-1501 "
            f"layout hold; use --scale {limit:g} or less"
        )


def plan_domain(preset: DomainPreset, scale: float, seed: int, views: np.ndarray) -> Plan:
    """Lay out every image of a domain. `views` (C,) holds each camera's dominant walking direction."""
    rng = stream(seed, preset.name, STREAM_PLAN)
    sizes, cams = preset.sizes, preset.num_cameras
    check_pid_capacity(preset, scale)
    n_train, n_test = identity_counts(preset, scale)
    n_gallery = max(2, round(sizes.gallery_images * scale))
    n_distractor_images = round(n_gallery * preset.distractor_fraction)
    n_junk = round(n_gallery * preset.junk_fraction)
    num_panoramas = rng.integers(PANORAMAS_PER_CAMERA[0], PANORAMAS_PER_CAMERA[1] + 1, size=cams)
    builder = _Builder(rng, preset, views, num_panoramas)

    # pids: train and test disjoint, interleaved at random so a pid's value says nothing about its split
    pids = rng.permutation(np.arange(1, n_train + n_test + 1))
    # identity rows: people are shuffled so look-alikes (which copy earlier rows) fall in any split
    n_distractor_people = max(1, n_distractor_images)
    n_rows = n_train + n_test + n_distractor_people + n_junk
    rows = rng.permutation(n_rows)
    train_rows, test_rows = rows[:n_train], rows[n_train:n_train + n_test]
    distractor_rows = rows[n_train + n_test:n_train + n_test + n_distractor_people]
    junk_rows = rows[n_train + n_test + n_distractor_people:]

    def cameras_of(count: int) -> np.ndarray:
        if preset.camera_pairs:
            pair = int(rng.integers(cams // 2))
            return np.array([2 * pair, 2 * pair + 1])
        return np.sort(rng.choice(cams, size=count, replace=False))

    def add_person(split: int, pid: int, row: int, cameras: np.ndarray, images_per_camera: np.ndarray,
                   with_query: bool) -> None:
        for camera, count in zip(cameras, images_per_camera):
            lengths = _split_counts(rng, int(count), int(min(count, rng.integers(1, 4))), 1)
            query_tracklet = int(rng.integers(len(lengths))) if with_query else -1
            for k, length in enumerate(lengths):
                query_at = int(rng.integers(length)) if k == query_tracklet else -1
                builder.add(split=split, kind=0, pid=pid, camera=int(camera), identity=int(row),
                            length=int(length), query_at=query_at)

    low, high = preset.cameras_per_id
    high = min(high, cams)
    # train: cameras per id uniform in the preset's range, images spread over (id, camera) pairs
    train_cams = [cameras_of(int(k)) for k in rng.integers(low, high + 1, size=n_train)]
    n_pairs = sum(len(c) for c in train_cams)
    per_pair = _split_counts(rng, max(round(sizes.train_images * scale), n_pairs), n_pairs, 1)
    at = 0
    for i in range(n_train):
        k = len(train_cams[i])
        add_person(0, int(pids[i]), int(train_rows[i]), train_cams[i], per_pair[at:at + k], False)
        at += k

    # test: >= 2 cameras per id (every query needs a cross-camera match); one query per (id, camera), so the
    # camera counts are chosen to sum to the published number of queries
    test_counts = _counts_with_sum(rng, n_test, max(2, low), high, round(sizes.query_images * scale))
    test_cams = [cameras_of(int(k)) for k in test_counts]
    n_pairs = sum(len(c) for c in test_cams)
    gallery_per_pair = _split_counts(rng, max(n_gallery - n_distractor_images, n_pairs), n_pairs, 1)
    at = 0
    for i in range(n_test):
        k = len(test_cams[i])
        add_person(2, int(pids[n_train + i]), int(test_rows[i]), test_cams[i], gallery_per_pair[at:at + k] + 1, True)
        at += k

    # distractors (pid 0, gallery only): people seen by one camera, and crops with nobody in them
    left, d = n_distractor_images, 0
    while left > 0:
        background_only = rng.random() < 0.1
        length = 1 if background_only else int(min(left, rng.integers(1, 7)))
        builder.add(split=2, kind=1 if background_only else 0, pid=0, camera=int(rng.integers(cams)),
                    identity=int(distractor_rows[d % len(distractor_rows)]), length=length)
        left, d = left - length, d + 1
    # junk (pid -1, gallery folder, dropped by readers): less than a third of a person
    for j in range(n_junk):
        builder.add(split=2, kind=2, pid=-1, camera=int(rng.integers(cams)), identity=int(junk_rows[j]), length=1)

    columns = builder.build()
    _make_names_unique(columns)
    return Plan(domain=preset.name, num_identities=n_rows, num_panoramas=num_panoramas, **columns)


def _make_names_unique(columns: dict[str, np.ndarray]) -> None:
    """Two tracklets may draw the same (pid, camera, sequence, frame, box); bump the box index of the later one."""
    fields = ("pid", "camid", "seq", "frame", "box")
    while True:
        keys = np.stack([columns[f] for f in fields], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        duplicate = np.arange(len(keys)) != first[inverse.ravel()]
        if not duplicate.any():
            return
        columns["box"][duplicate] += 1
