"""What a person *is*: one row of attributes per identity, drawn from a domain's clothing palette.

The table is a dict of numpy arrays (struct of arrays), so the renderer can draw a batch of people at once by
indexing rows. Look-alikes ("twins") copy an earlier row and re-draw one or two attributes: hard negatives with
the same overall colours, the main reason a colour histogram cannot solve the task.
"""

from __future__ import annotations

import numpy as np

from kdreid.data.synthetic.domains import NEUTRAL_PALETTE

# The clothing vocabulary (sRGB in [0, 1]); occluders and background clutter draw from it too, so that they can
# be mistaken for clothing.
COLOURS = {
    "black": (0.08, 0.08, 0.09),
    "charcoal": (0.22, 0.22, 0.24),
    "grey": (0.50, 0.50, 0.50),
    "white": (0.92, 0.92, 0.90),
    "navy": (0.10, 0.13, 0.35),
    "blue": (0.15, 0.35, 0.78),
    "denim": (0.30, 0.42, 0.60),
    "light_blue": (0.60, 0.75, 0.92),
    "red": (0.82, 0.12, 0.12),
    "maroon": (0.45, 0.08, 0.12),
    "pink": (0.95, 0.55, 0.70),
    "orange": (0.95, 0.50, 0.10),
    "yellow": (0.95, 0.85, 0.20),
    "green": (0.20, 0.60, 0.25),
    "dark_green": (0.10, 0.30, 0.15),
    "olive": (0.42, 0.45, 0.18),
    "teal": (0.10, 0.50, 0.50),
    "khaki": (0.70, 0.65, 0.45),
    "beige": (0.85, 0.78, 0.62),
    "brown": (0.40, 0.26, 0.15),
    "purple": (0.45, 0.20, 0.60),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_TABLE = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)  # (21, 3)

SKIN_TONES = np.array(
    [(0.96, 0.80, 0.69), (0.90, 0.70, 0.55), (0.78, 0.57, 0.42), (0.58, 0.40, 0.28), (0.38, 0.25, 0.17)],
    dtype=np.float32,
)
HAIR_COLOURS = np.array(
    [(0.05, 0.04, 0.04), (0.20, 0.12, 0.07), (0.40, 0.25, 0.12), (0.80, 0.65, 0.35), (0.65, 0.65, 0.65)],
    dtype=np.float32,
)
HAIR_FREQUENCIES = (0.4, 0.25, 0.15, 0.12, 0.08)

# Codes of the categorical attributes.
PATTERNS = ("solid", "hstripes", "vstripes", "checks", "open_jacket", "chest_print")
LOWER_TYPES = ("trousers", "shorts", "skirt")
HAIR_STYLES = ("short", "long", "hat")
BAGS = ("none", "backpack", "shoulder_bag", "handbag")


def _weights(**named: float) -> np.ndarray:
    w = np.full(len(COLOUR_NAMES), 0.3)
    for name, value in named.items():
        w[COLOUR_NAMES.index(name)] = value
    return w / w.sum()


# A palette: colour weights for upper and lower garments and the garment rates of its population (§2.2).
PALETTES = {
    "summer": dict(
        upper=_weights(white=3, red=2.5, yellow=2, orange=2, pink=2, light_blue=2, blue=1.5, green=1.5, teal=1,
                       black=0.5, charcoal=0.2, navy=0.3, brown=0.1, maroon=0.3),
        lower=_weights(denim=3, black=1.5, white=1.2, khaki=1.5, beige=1.2, blue=1.2, grey=1, light_blue=1,
                       red=0.6, pink=0.5),
        shorts=0.45, skirt=0.12, short_sleeves=0.7, coat=0.04, pattern=0.35, hat=0.06,
    ),
    "winter": dict(
        upper=_weights(black=3, charcoal=2.5, navy=2.5, brown=2, grey=1.5, maroon=1.2, olive=1, dark_green=1.2,
                       white=0.2, yellow=0.1, pink=0.1, orange=0.1, light_blue=0.1),
        lower=_weights(black=3, charcoal=2, navy=1.5, denim=1.5, brown=1.2, grey=1.2, khaki=0.5, white=0.05),
        shorts=0.02, skirt=0.06, short_sleeves=0.08, coat=0.45, pattern=0.2, hat=0.25,
    ),
    "mixed": dict(
        upper=_weights(**{n: 1.0 for n in COLOUR_NAMES}),
        lower=_weights(denim=2, black=2, grey=1.5, khaki=1.2, navy=1.2, blue=1, brown=1, beige=1, white=0.8),
        shorts=0.2, skirt=0.1, short_sleeves=0.4, coat=0.15, pattern=0.3, hat=0.1,
    ),
    # MSMT17's own population: cool, muted, many greys/denims/beiges (not Duke's dark winter).
    "mixed_winter": dict(
        upper=_weights(grey=2.5, denim=2, beige=2, khaki=1.8, white=1.5, teal=1.5, purple=1.2, black=1.2,
                       light_blue=1.2, navy=1, olive=1, yellow=0.2, orange=0.2, pink=0.4, red=0.6),
        lower=_weights(denim=2.5, grey=2, black=1.5, khaki=1.5, beige=1.2, navy=1, brown=0.8, white=0.4),
        shorts=0.08, skirt=0.1, short_sleeves=0.25, coat=0.3, pattern=0.28, hat=0.12,
    ),
}


def mix_palettes(name: str, strength: float) -> dict:
    """`strength` x the named palette + (1 - strength) x the neutral mixed palette (the gap dial)."""
    own, neutral = PALETTES[name], PALETTES[NEUTRAL_PALETTE]
    return {key: strength * np.asarray(own[key]) + (1 - strength) * np.asarray(neutral[key]) for key in own}


def _jitter_colour(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Per-identity shade: brightness x N(1, 0.1) and a small per-channel shift. base (N, 3) -> (N, 3)."""
    n = base.shape[0]
    bright = rng.normal(1.0, 0.1, size=(n, 1))
    shift = rng.normal(0.0, 0.03, size=(n, 3))
    return np.clip(base * bright + shift, 0.02, 0.98).astype(np.float32)


def _draw_fields(rng: np.random.Generator, palette: dict, n: int) -> dict[str, np.ndarray]:
    """`n` independent identities."""
    pick = lambda weights: rng.choice(len(COLOUR_NAMES), size=n, p=weights)  # noqa: E731
    upper, upper2, lower = pick(palette["upper"]), pick(palette["upper"]), pick(palette["lower"])
    patterned = rng.random(n) < palette["pattern"]
    lower_type = np.where(rng.random(n) < palette["shorts"], 1, 0)
    lower_type = np.where((lower_type == 0) & (rng.random(n) < palette["skirt"]), 2, lower_type)
    hat = rng.random(n) < palette["hat"]
    return {
        "upper": _jitter_colour(rng, COLOUR_TABLE[upper]),
        "upper2": _jitter_colour(rng, COLOUR_TABLE[upper2]),
        "pattern": np.where(patterned, rng.integers(1, len(PATTERNS), size=n), 0),
        "pattern_freq": rng.uniform(3.0, 7.0, size=n).astype(np.float32),
        "sleeve": np.where(rng.random(n) < palette["short_sleeves"], 0.35, 0.92).astype(np.float32),
        "coat": (rng.random(n) < palette["coat"]).astype(np.int64),
        "lower": _jitter_colour(rng, COLOUR_TABLE[lower]),
        "lower_type": lower_type,
        "shoes": _jitter_colour(rng, COLOUR_TABLE[rng.choice([0, 1, 2, 3, 19, 17], size=n)]),
        "skin": _jitter_colour(rng, SKIN_TONES[rng.integers(0, len(SKIN_TONES), size=n)]),
        "hair": _jitter_colour(rng, HAIR_COLOURS[rng.choice(len(HAIR_COLOURS), size=n, p=HAIR_FREQUENCIES)]),
        "hair_style": np.where(hat, 2, (rng.random(n) < 0.3).astype(np.int64)),
        "hat": _jitter_colour(rng, COLOUR_TABLE[pick(palette["upper"])]),
        "bag": rng.choice(len(BAGS), size=n, p=[0.45, 0.25, 0.18, 0.12]),
        "bag_colour": _jitter_colour(rng, COLOUR_TABLE[pick(palette["lower"])]),
        # body: SOMAset-style structural cues that survive colour casts
        "build": rng.uniform(0.85, 1.2, size=n).astype(np.float32),
        "torso": rng.uniform(0.9, 1.12, size=n).astype(np.float32),
        "head": rng.uniform(0.9, 1.1, size=n).astype(np.float32),
    }


# Attributes a look-alike may re-draw (one or two of them), as (field, ...) groups re-drawn together.
_TWIN_CHANGES = (("upper2", "pattern"), ("pattern",), ("lower", "lower_type"), ("shoes",), ("bag", "bag_colour"),
                 ("bag_colour",), ("hair_style", "hat"), ("sleeve",), ("coat",), ("build", "torso"))


def draw_identities(rng: np.random.Generator, palette: dict, n: int, twin_rate: float) -> dict[str, np.ndarray]:
    """`n` identity rows. Row i is, with probability `twin_rate`, a look-alike of a random earlier row with one or
    two attribute groups re-drawn; field `twin_of` holds that row (-1 for originals)."""
    table = _draw_fields(rng, palette, n)
    fresh = _draw_fields(rng, palette, n)  # the replacement values a twin takes
    twin_of = np.full(n, -1, dtype=np.int64)
    is_twin = rng.random(n) < twin_rate
    is_twin[0] = False
    sources = (rng.random(n) * np.arange(n)).astype(np.int64)  # uniform over earlier rows
    n_changes = rng.integers(1, 3, size=n)
    change_order = rng.random((n, len(_TWIN_CHANGES))).argsort(axis=1)
    for i in np.flatnonzero(is_twin):
        src = sources[i]
        twin_of[i] = src if twin_of[src] < 0 else twin_of[src]
        for key in table:
            table[key][i] = table[key][src]
        for group in change_order[i, : n_changes[i]]:
            for key in _TWIN_CHANGES[group]:
                table[key][i] = fresh[key][i]
    # a pattern needs a second colour that differs visibly from the first
    same = np.abs(table["upper"] - table["upper2"]).sum(axis=1) < 0.25
    table["upper2"][same] = np.clip(1.0 - table["upper"][same], 0.05, 0.95)
    table["twin_of"] = twin_of
    return table


def take(table: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The attribute rows `rows` (a batch of people) of the table."""
    return {key: value[rows] for key, value in table.items()}
