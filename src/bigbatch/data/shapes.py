"""Procedural shapes: one coloured shape on a plain background, with a caption and a label.

The demo data set and the ``synthetic`` source both draw from here. The classes are
chosen to stay distinguishable after resizing to 32 px, so a tiny model learns them in
minutes on a CPU, and the captions name colour, size and position so that the text
tower has something to match beyond the class word.
"""

from __future__ import annotations

import math
import random
import re

import numpy as np
from PIL import Image, ImageDraw

Rng = random.Random | np.random.Generator

CLASSNAMES: list[str] = ["circle", "square", "triangle", "star", "cross", "ring"]
"""The shape kinds, in label order."""

TEMPLATES: list[str] = [
    "a {}.",
    "a drawing of a {}.",
    "a {} shape.",
    "a photo of a {}.",
    "a small {}.",
    "a large {}.",
]
"""Zero-shot prompt templates; ``{}`` is replaced by a class name."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 20),
}

# position name -> (dx, dy) direction from the centre, and how a caption says it
POSITIONS: dict[str, tuple[int, int, str]] = {
    "center": (0, 0, "in the center"),
    "left": (-1, 0, "on the left"),
    "right": (1, 0, "on the right"),
    "top": (0, -1, "at the top"),
    "bottom": (0, 1, "at the bottom"),
    "top left": (-1, -1, "at the top left"),
    "top right": (1, -1, "at the top right"),
    "bottom left": (-1, 1, "at the bottom left"),
    "bottom right": (1, 1, "at the bottom right"),
}

# radius as a fraction of the image side; "small" still covers ~10 px at 32 px
SIZES: dict[str, tuple[float, float]] = {"small": (0.15, 0.19), "large": (0.23, 0.28)}

CAPTIONS: list[str] = [
    "a {size} {color} {shape} {where}",
    "a {color} {shape} {where}",
    "a {size} {color} {shape} on a {background} background",
    "a drawing of a {size} {color} {shape} {where}",
]

_NOISE_AMPLITUDE = 10  # grey levels (std ~6): enough to stop a model keying on exact pixel values


def _index(rng: Rng, n: int) -> int:
    """A uniform integer in [0, n) from either kind of generator."""
    return int(rng.integers(n)) if isinstance(rng, np.random.Generator) else rng.randrange(n)


def _pick(rng: Rng, options: list):
    return options[_index(rng, len(options))]


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles (first one pointing up), alternating through ``radii``."""
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n - math.pi / 2),
         cy + r * math.sin(angle + 2 * math.pi * k / n - math.pi / 2))
        for k, r in enumerate(radii)
    ]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """A plus sign with arms of half-width r/3, rotated by ``angle``."""
    w = r / 3
    outline = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in outline]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                angle: float, fill: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r * 0.4)))
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.1] * 4, angle + math.pi / 4), fill=fill)
    elif kind == "triangle":
        # shift down so the triangle's visual centre, not its circumcentre, sits at (cx, cy)
        draw.polygon(_polygon(cx, cy + r * 0.2, [r * 1.25] * 3, angle), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.15, r * 0.5] * 5, angle), fill=fill)
    elif kind == "cross":
        draw.polygon(_cross(cx, cy, r * 1.05, angle), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}: use one of {CLASSNAMES}")


def draw_sample(rng: Rng, image_size: int = 64) -> tuple[Image.Image, str, int]:
    """Draw one random shape; return (RGB image, caption, label = index in ``CLASSNAMES``)."""
    label = _index(rng, len(CLASSNAMES))
    kind = CLASSNAMES[label]
    color = _pick(rng, list(COLORS))
    size = _pick(rng, list(SIZES))
    position = _pick(rng, list(POSITIONS))
    dark = _index(rng, 2) == 1

    s = float(image_size)
    r = s * rng.uniform(*SIZES[size])
    dx, dy, where = POSITIONS[position]
    offset = s / 2 - 1.2 * r - 0.03 * s  # keep the whole shape (rotated star included) inside
    cx = s / 2 + dx * offset + rng.uniform(-0.03, 0.03) * s
    cy = s / 2 + dy * offset + rng.uniform(-0.03, 0.03) * s
    angle = math.radians(rng.uniform(-20.0, 20.0))

    grey = rng.uniform(15, 60) if dark else rng.uniform(200, 245)
    background = tuple(int(grey + rng.uniform(-8, 8)) for _ in range(3))
    fill = tuple(min(255, max(0, int(c + rng.uniform(-20, 20)))) for c in COLORS[color])

    image = Image.new("RGB", (image_size, image_size), background)
    _draw_shape(ImageDraw.Draw(image), kind, cx, cy, r, angle, fill)

    # uniform integer noise: 4x cheaper than Gaussian, and no model cares about the difference
    noise = np.random.default_rng(_index(rng, 2**31)).integers(
        -_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, (image_size, image_size, 3), dtype=np.int16)
    pixels = np.asarray(image, dtype=np.int16) + noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    caption = _pick(rng, CAPTIONS).format(
        size=size, color=color, shape=kind, where=where, background="dark" if dark else "light")
    return image, re.sub(r"\ba (?=[aeiou])", "an ", caption), label
