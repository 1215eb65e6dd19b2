"""`clipsearch make-sample`: a seeded, photo-like captioned library for demos, training and evaluation.

Each image shows one shape of a colour and size on a textured background, at a random position and angle,
saved in a mix of formats and sizes (some JPEGs store their pixels sideways with an EXIF orientation tag).
Layout: ``DIR/<shape>/<file>`` (an ImageFolder: one folder per class) and ``DIR/captions.txt`` in the Flickr8k
layout (``image,caption`` with paths relative to DIR). The caption names size, colour, shape and background.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (40, 170, 50), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (250, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
BACKGROUNDS = ("grass", "sand", "water", "snow", "bricks", "night sky")
SIZES = ("small", "large")
_BG_CLASH = {("green", "grass"), ("white", "snow"), ("black", "night sky"), ("blue", "water"),
             ("yellow", "sand"), ("orange", "sand"), ("red", "bricks")}


@dataclass(frozen=True)
class SampleItem:
    """What one generated image shows; `caption` is its canonical caption."""

    shape: str
    colour: str
    background: str
    size: str

    @property
    def caption(self) -> str:
        """Canonical caption (the one written to captions.txt)."""
        return f"a {self.size} {self.colour} {self.shape} on {self.background}"

    def caption_variants(self) -> list[str]:
        """Other phrasings, used as training augmentation so that short queries and prompts work too."""
        c, s, b, z = self.colour, self.shape, self.background, self.size
        return [self.caption, self.caption, f"a {c} {s} on {b}", f"a {z} {c} {s}", f"a photo of a {c} {s}.",
                f"a photo of a {s}.", f"a {s}", f"a picture of a {s}.", f"a {s} on {b}", f"a {z} {s} on {b}"]


def _background(name: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    noise = rng.normal(0, 1, (h, w, 1)).astype(np.float32)
    if name == "grass":
        base = np.array([60, 140, 50]) + 30 * noise * np.array([0.5, 1, 0.4])
    elif name == "sand":
        base = np.array([215, 190, 140]) + 14 * noise
    elif name == "water":
        wave = np.sin(xx / 9 + np.sin(yy / 13) * 2)[..., None]
        base = np.array([30, 110, 170]) + 25 * wave * np.array([0.3, 0.6, 1]) + 6 * noise
    elif name == "snow":
        base = np.array([225, 230, 238]) + 8 * noise
    elif name == "bricks":
        rows = ((yy // 14) % 2)[..., None]
        mortar = (((yy % 14) < 2) | (((xx + rows[..., 0] * 12) % 24) < 2))[..., None]
        base = np.where(mortar, np.array([200, 200, 190]), np.array([150, 60, 45])) + 10 * noise
    else:  # night sky
        stars = (rng.random((h, w, 1)) > 0.995) * 200
        base = np.array([10, 15, 45]) + (yy[..., None] / h) * 25 + stars
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.45) * math.cos(a), (1.0 if k % 2 == 0 else 0.45) * math.sin(a))
               for k, a in enumerate(-math.pi / 2 + k * math.pi / 5 for k in range(10))]
    else:  # cross
        t = 0.33
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(item: SampleItem, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """Draw one sample image (upright)."""
    im = _background(item.background, w, h, rng)
    draw = ImageDraw.Draw(im)
    short = min(w, h)
    r = short * (rng.uniform(0.17, 0.22) if item.size == "small" else rng.uniform(0.32, 0.42))
    cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
    jitter = rng.integers(-15, 16, 3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[item.colour]) + jitter, 0, 255))
    if item.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(item.shape, cx, cy, r, rng.uniform(-0.35, 0.35)), fill=fill)
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def sample_items(count: int, seed: int) -> list[SampleItem]:
    """`count` items, classes balanced, attributes seeded; clashing colour/background pairs are avoided."""
    rnd = random.Random(seed)
    items = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        while True:
            colour, bg = rnd.choice(list(COLOURS)), rnd.choice(BACKGROUNDS)
            if (colour, bg) not in _BG_CLASH:
                break
        items.append(SampleItem(shape, colour, bg, rnd.choice(SIZES)))
    rnd.shuffle(items)
    return items


def make_sample(out: Path, count: int = 300, seed: int = 0) -> list[tuple[str, SampleItem]]:
    """Write the library and captions.txt; returns (relative path, item) pairs."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, item in enumerate(sample_items(count, seed)):
        w, h = int(rng.integers(160, 320)), int(rng.integers(140, 300))
        im = render(item, w, h, rng)
        kind = rng.random()
        rel = f"{item.shape}/s{seed}_{i:05d}"
        folder = out / item.shape
        folder.mkdir(exist_ok=True)
        if kind < 0.15:  # stored sideways + EXIF orientation 6, as phones do
            stored = im.transpose(Image.Transpose.ROTATE_90)
            exif = stored.getexif()
            exif[0x0112] = 6
            rel += ".jpg"
            stored.save(out / rel, quality=90, exif=exif)
        elif kind < 0.65:
            rel += ".jpg"
            im.save(out / rel, quality=int(rng.integers(80, 95)))
        elif kind < 0.85:
            rel += ".png"
            im.save(out / rel)
        else:
            rel += ".webp"
            im.save(out / rel, quality=90)
        rows.append((rel, item))
    with open(out / "captions.txt", "w", encoding="utf-8") as f:
        f.write("image,caption\n")
        for rel, item in rows:
            f.write(f"{rel},{item.caption}\n")
    (out / "templates.txt").write_text("a photo of a {}.\na {}\na picture of a {}.\n", encoding="utf-8")
    with open(out / "captions_augmented.txt", "w", encoding="utf-8") as f:  # training: several phrasings each
        f.write("image,caption\n")
        for rel, item in rows:
            for variant in item.caption_variants():
                f.write(f"{rel},{variant}\n")
    return rows
