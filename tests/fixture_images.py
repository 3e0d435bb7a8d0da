"""Synthetic photos for the tiny fixture model: a coloured shape on a noisy light background.

Twelve classes (4 colours × 3 shapes), each with a Russian caption such as "красный круг". The fixture
model in tests/fixtures/tiny-ruclip was trained on exactly these drawings, so tests can build an index
of them and check that a query ranks its own class first.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "красный": (220, 30, 30),
    "зелёный": (30, 170, 40),
    "синий": (30, 50, 220),
    "жёлтый": (235, 210, 20),
}
SHAPES = ("круг", "квадрат", "треугольник")
FIXTURE_CLASSES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def draw(class_name: str, seed: int = 0, size: int | tuple[int, int] = 64) -> Image.Image:
    """An RGB image of `class_name` (e.g. "синий квадрат"); `seed` varies position, size and noise."""
    colour_name, shape = class_name.split()
    rng = np.random.default_rng(_stable_seed(class_name, seed))
    w, h = (size, size) if isinstance(size, int) else size
    side = min(w, h)
    bg = rng.integers(200, 256, size=3)
    pixels = np.clip(bg + rng.normal(0, 12, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    jitter = rng.integers(-25, 26, size=3)
    colour = tuple(int(v) for v in np.clip(np.array(COLOURS[colour_name]) + jitter, 0, 255))
    r = side * rng.uniform(0.22, 0.34)
    cx = w / 2 + rng.uniform(-0.12, 0.12) * side
    cy = h / 2 + rng.uniform(-0.12, 0.12) * side
    d = ImageDraw.Draw(img)
    if shape == "круг":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "квадрат":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r * 1.15), (cx - r * 1.1, cy + r * 0.85), (cx + r * 1.1, cy + r * 0.85)], fill=colour)
    return img


def _stable_seed(class_name: str, seed: int) -> int:
    return (FIXTURE_CLASSES.index(class_name) * 1_000_003 + seed * 7919) % 2**32
