"""The batch renderer: a batch of people drawn at once with soft-edged primitives (numpy, float32).

Every primitive is a signed distance (in pixels) turned into anti-aliased coverage `clip(0.5 - d/0.8, 0, 1)`, so
no hard aliasing edge exists for a CNN to latch on to. Parameters are (N, 1, 1) arrays, the pixel grid is
(1, H, 1) x (1, 1, W), so one numpy expression draws a body part for the whole batch.

Person coordinates: v = 0 at the top of the head, v = 1 under the feet; u = 0 on the body axis, in the same unit
(the person's height). A view's box maps them to the image with `scale` (person height / image height), `top`
(image row of the head top, as a fraction of H) and `centre_x` (horizontal offset, in units of H).

The view angle theta decides what is seen: 0 = facing the camera, pi = walking away, +-pi/2 = profile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Views:
    """Per-image pose and box of a batch, each (N,) float32 except `visible`."""

    theta: np.ndarray  # walking direction relative to the camera
    phase: np.ndarray  # walking phase (radians); advances along a tracklet
    scale: np.ndarray  # person height / image height (> 1 cuts off head or feet)
    top: np.ndarray  # head top, fraction of the image height
    centre_x: np.ndarray  # body axis offset from the image centre, in units of the image height
    visible: np.ndarray  # 0 = background-only crop, 1 = a person


class Layer:
    """A primitive's signed distance over the pixel region it can touch (batch-wide bounding box)."""

    def __init__(self, distance: np.ndarray, region: tuple[slice, slice], **extras: np.ndarray):
        self.distance = distance  # (N, h, w) over `region` of the canvas
        self.region = region
        for key, value in extras.items():
            setattr(self, key, value)


class Canvas:
    """The batch's pixel grid in person coordinates and the running rgb/alpha composite.

    Each primitive is computed only over the rows and columns it can touch in any image of the batch (head and
    shoes cover < 25 % of the rows), which halves the rendering time."""

    def __init__(self, views: Views, height: int, width: int):
        n = len(views.scale)
        col = lambda a: np.asarray(a, dtype=np.float32).reshape(n, 1, 1)  # noqa: E731
        rows = ((np.arange(height, dtype=np.float32) + 0.5) / height).reshape(1, height, 1)
        cols = ((np.arange(width, dtype=np.float32) + 0.5 - width / 2) / height).reshape(1, 1, width)
        self.height, self.width = height, width
        self.scale, self.top, self.centre_x = col(views.scale), col(views.top), col(views.centre_x)
        self.v = (rows - self.top) / self.scale  # (N, H, 1)
        self.u = (cols - self.centre_x) / self.scale  # (N, 1, W)
        self.pixels_per_unit = self.scale * height  # (N, 1, 1): converts person units to pixels
        self.visible = col(views.visible)
        self.rgb = np.zeros((n, height, width, 3), dtype=np.float32)
        self.alpha = np.zeros((n, height, width), dtype=np.float32)

    def _region(self, v0, v1, u0, u1) -> tuple[slice, slice]:
        """Pixel rows/cols covering person-box [v0, v1] x [u0, u1] (arrays or scalars) in every image, + 2 px."""
        rows0 = self.height * (self.top + self.scale * v0)
        rows1 = self.height * (self.top + self.scale * v1)
        cols0 = self.width / 2 + self.height * (self.centre_x + self.scale * u0)
        cols1 = self.width / 2 + self.height * (self.centre_x + self.scale * u1)
        r0 = max(0, int(np.floor(np.min(rows0))) - 2)
        r1 = min(self.height, int(np.ceil(np.max(rows1))) + 2)
        c0 = max(0, int(np.floor(np.min(cols0))) - 2)
        c1 = min(self.width, int(np.ceil(np.max(cols1))) + 2)
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))

    def _grid(self, region):
        return self.v[:, region[0]], self.u[:, :, region[1]]

    def paint(self, layer: Layer, colour: np.ndarray, weight: np.ndarray | None = None) -> None:
        """Composite `colour` ((N,1,1,3) or (N,h,w,3) over the layer's region) with the layer's coverage, times
        a per-image `weight` (N,1,1) for optional parts (bags, hats...), which are painted only where present."""
        rows, cols = layer.region
        if rows.start == rows.stop or cols.start == cols.stop:
            return
        n = len(self.visible)
        strength = self.visible if weight is None else self.visible * weight  # (N, 1, 1)
        members = np.flatnonzero(strength.reshape(n) > 0)
        if len(members) == 0:
            return
        if len(members) > 0.6 * n:  # most images: work on the whole batch in place
            cover = np.clip(0.5 - layer.distance * (self.pixels_per_unit / 0.8), 0.0, 1.0) * strength
            rgb = self.rgb[:, rows, cols]
            rgb += cover[..., None] * (colour - rgb)
            alpha = self.alpha[:, rows, cols]
            alpha += cover * (1.0 - alpha)
            return
        cover = np.clip(0.5 - layer.distance[members] * (self.pixels_per_unit[members] / 0.8), 0.0, 1.0)
        cover *= strength[members]
        rgb = self.rgb[members, rows, cols]
        rgb += cover[..., None] * (colour[members] - rgb)
        self.rgb[members, rows, cols] = rgb
        alpha = self.alpha[members, rows, cols]
        alpha += cover * (1.0 - alpha)
        self.alpha[members, rows, cols] = alpha

    # --- primitives (signed distances in person units) -------------------------------------------------------
    def ellipse(self, cx, cy, rx, ry) -> Layer:
        region = self._region(cy - ry, cy + ry, cx - rx, cx + rx)
        v, u = self._grid(region)
        du, dv = (u - cx) / rx, (v - cy) / ry
        return Layer((np.sqrt(du * du + dv * dv) - 1.0) * np.minimum(rx, ry), region)

    def capsule(self, ax, ay, bx, by, radius) -> Layer:
        """Distance to the segment a-b minus `radius`; `t` is the position in [0, 1] along it."""
        region = self._region(np.minimum(ay, by) - radius, np.maximum(ay, by) + radius,
                              np.minimum(ax, bx) - radius, np.maximum(ax, bx) + radius)
        v, u = self._grid(region)
        ex, ey = bx - ax, by - ay
        length2 = ex * ex + ey * ey + 1e-9
        pu, pv = u - ax, v - ay
        t = np.clip((pu * ex + pv * ey) / length2, 0.0, 1.0)
        du, dv = pu - t * ex, pv - t * ey
        return Layer(np.sqrt(du * du + dv * dv) - radius, region, t=t)

    def trapezoid(self, cx, y0, y1, half_top, half_bottom) -> Layer:
        """A vertical trapezoid; `across` in [-1, 1] and `down` in [0, 1] are its local coordinates."""
        widest = np.maximum(half_top, half_bottom)
        region = self._region(y0, y1, cx - widest, cx + widest)
        v, u = self._grid(region)
        down = (v - y0) / (y1 - y0)  # (N, h, 1)
        half = half_top + (half_bottom - half_top) * np.clip(down, 0.0, 1.0)
        across = (u - cx) / half  # (N, h, w)
        d = np.maximum((np.abs(across) - 1.0) * half, np.maximum(y0 - v, v - y1))
        return Layer(d, region, across=across, down=down)


def _col(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a.reshape(a.shape[0], 1, 1)


def _rgb(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a.reshape(a.shape[0], 1, 1, 3)


def render_people(people: dict[str, np.ndarray], views: Views, height: int, width: int):
    """Draw the batch: people (attribute rows, see people.py) seen as `views`.
    Returns rgb (N, H, W, 3) float32 in [0, 1] (premultiplied by alpha) and alpha (N, H, W)."""
    c = Canvas(views, height, width)
    theta, phase = np.asarray(views.theta, np.float32), np.asarray(views.phase, np.float32)
    facing, side = _col(np.cos(theta)), _col(np.sin(theta))  # facing > 0: the front is seen
    front = np.clip(facing * 1.6, 0.0, 1.0)  # weight of front-only details
    back = np.clip(-facing * 1.6, 0.0, 1.0)  # weight of back-only details
    width_factor = 0.6 + 0.4 * np.abs(facing)  # a profile is narrower
    build, head_size, torso_len = _col(people["build"]), _col(people["head"]), _col(people["torso"]) * 0.29
    swing = _col(np.sin(phase))
    heading = np.where(side >= 0, 1.0, -1.0).astype(np.float32)
    stride = 0.085 * np.abs(side) + 0.012  # scissor gait in profile, small spread from the front

    skin, upper, upper2, lower = (_rgb(people[k]) for k in ("skin", "upper", "upper2", "lower"))
    lower_type, pattern, bag = (_col(people[k]) for k in ("lower_type", "pattern", "bag"))
    hair_style, coat = _col(people["hair_style"]), _col(people["coat"])

    y_shoulder = np.float32(0.165)
    y_hip = y_shoulder + torso_len
    y_feet = np.float32(0.965)
    half_shoulder = 0.1 * build * width_factor
    half_hip = 0.08 * build * width_factor
    head_x = 0.012 * side

    # legs: one swings +, the other -; trousers cover the leg, shorts its upper 42 %, a skirt none (skin below)
    leg_radius = 0.034 * build
    hip_offset = 0.038 * build * width_factor
    covered = np.where(lower_type == 0, 1.0, np.where(lower_type == 1, 0.42, 0.0)).astype(np.float32)
    for sign in (-1.0, 1.0):
        hip_x = sign * hip_offset
        foot_x = hip_x + sign * (stride * swing * heading + 0.006)
        foot_y = y_feet - 0.02 - 0.02 * np.abs(swing) * (sign * swing > 0)
        leg = c.capsule(hip_x, y_hip - 0.02, foot_x, foot_y, leg_radius)
        c.paint(leg, np.where((leg.t < covered)[..., None], lower, skin))
        shoe = c.ellipse(foot_x + 0.022 * side, foot_y + 0.01, 0.032 + 0.012 * np.abs(side), np.float32(0.017))
        c.paint(shoe, _rgb(people["shoes"]))
    # pelvis in the lower garment, or a skirt; a coat's tail
    c.paint(c.trapezoid(0.0, y_hip - 0.04, y_hip + 0.07, half_hip, half_hip * 1.05), lower,
            weight=(lower_type < 2).astype(np.float32))
    c.paint(c.trapezoid(0.0, y_hip - 0.04, y_hip + 0.2, half_hip, half_hip * 1.9), lower,
            weight=(lower_type == 2).astype(np.float32))
    tail = c.trapezoid(0.0, y_hip - 0.04, y_hip + 0.22, half_hip * 1.05, half_hip * 1.35)
    c.paint(tail, upper * (1 - 0.15 * tail.across[..., None] ** 2), weight=coat.astype(np.float32))

    # long hair hangs behind the shoulders: seen at the sides from the front, fully from the back
    hair = _rgb(people["hair"])
    c.paint(c.trapezoid(head_x, 0.05, 0.30, 0.05 * head_size, 0.065 * build), hair,
            weight=(hair_style == 1).astype(np.float32))

    # arms: shoulder to hand, swinging against the legs; sleeves in the upper colour
    arm_radius = 0.024 * build
    sleeve = _col(people["sleeve"])

    def arm(sign: float):
        shoulder_x = sign * (half_shoulder - 0.012)
        hand_x = shoulder_x + sign * 0.02 - sign * 0.07 * swing * heading * np.abs(side)
        layer = c.capsule(shoulder_x, y_shoulder + 0.02, hand_x, y_shoulder + 0.3, arm_radius)
        c.paint(layer, np.where((layer.t < sleeve)[..., None], upper, skin))
        return hand_x

    arm(-1.0)  # the far arm, before the torso

    # torso: pattern in the second colour (jacket band and chest print only from the front), cylinder shading
    torso = c.trapezoid(0.0, y_shoulder, y_hip, half_shoulder, half_hip)
    across, down = torso.across, torso.down
    freq = _col(people["pattern_freq"])
    wave_down = np.sin(2 * np.pi * freq * down)
    wave_across = np.sin(np.pi * freq * 0.6 * across)
    masks = {
        1: lambda: np.clip(0.5 + 3.0 * wave_down, 0, 1) + 0 * across,
        2: lambda: np.clip(0.5 + 3.0 * wave_across, 0, 1),
        3: lambda: np.clip(0.5 + 6.0 * wave_down * wave_across, 0, 1),
        4: lambda: np.clip(1.0 - (np.abs(across) - 0.3) * 8.0, 0, 1) * front,
        5: lambda: np.clip(1.0 - (np.sqrt(across**2 + ((down - 0.4) * 2.2) ** 2) - 0.45) * 8.0, 0, 1) * front,
    }
    second = np.zeros_like(across)
    for code, mask in masks.items():
        chosen = pattern == code
        if chosen.any():
            second += chosen * mask()
    shading = 1.0 - 0.18 * (across**2)[..., None]
    c.paint(torso, (upper + second[..., None] * (upper2 - upper)) * shading)

    # bags: a backpack body from behind and the side, its straps from the front; a shoulder bag with a strap
    bag_colour = _rgb(people["bag_colour"])
    is_backpack = (bag == 1).astype(np.float32)
    pack = c.trapezoid(-side * 0.06, y_shoulder + 0.025, y_shoulder + 0.24, 0.06 * build, 0.068 * build)
    c.paint(pack, bag_colour * 0.9, weight=is_backpack * np.clip(1.2 - facing * 1.5, 0, 1))
    for sign in (-1.0, 1.0):
        strap = c.capsule(sign * half_shoulder * 0.55, y_shoulder, sign * half_shoulder * 0.5, y_shoulder + 0.16,
                          np.float32(0.009))
        c.paint(strap, bag_colour, weight=is_backpack * front)
    is_shoulder_bag = (bag == 2).astype(np.float32)
    strap = c.capsule(-half_shoulder * 0.7, y_shoulder + 0.005, half_hip * 1.05, y_hip - 0.03, np.float32(0.008))
    c.paint(strap, bag_colour, weight=is_shoulder_bag)
    c.paint(c.ellipse(half_hip * 1.25, y_hip, np.float32(0.045), np.float32(0.05)), bag_colour, weight=is_shoulder_bag)

    hand_x = arm(1.0)  # the near arm
    c.paint(c.ellipse(hand_x, y_shoulder + 0.33, np.float32(0.03), np.float32(0.036)), bag_colour,
            weight=(bag == 3).astype(np.float32))

    # neck, head, hair or hat; from behind the hair covers the whole head
    c.paint(c.capsule(head_x, 0.11, 0.0, y_shoulder + 0.01, 0.02 * build), skin)
    head_rx, head_ry = 0.046 * head_size, 0.058 * head_size
    head_y = 0.062 * head_size
    c.paint(c.ellipse(head_x, head_y, head_rx, head_ry), skin)
    has_hair = (hair_style < 2).astype(np.float32)
    c.paint(c.ellipse(head_x - 0.006 * side, head_y - 0.022, head_rx * 1.06, head_ry * 0.72), hair, weight=has_hair)
    c.paint(c.ellipse(head_x, head_y, head_rx * 1.04, head_ry * 1.02), hair, weight=has_hair * back)
    is_hat = (hair_style == 2).astype(np.float32)
    hat = _rgb(people["hat"])
    c.paint(c.ellipse(head_x, head_y - 0.028, head_rx * 1.1, head_ry * 0.62), hat, weight=is_hat)
    c.paint(c.ellipse(head_x + 0.02 * side, head_y - 0.01, head_rx * 1.45, np.float32(0.012)), hat * 0.85,
            weight=is_hat)
    return c.rgb, c.alpha
