"""A small, learnable, ImageNet-like dataset of real JPEG files, drawn procedurally.

Used by the tests and the demo, where nothing may be downloaded. Each class is a shape in
its own colour family (class 0: red discs, class 1: orange squares, ...), drawn one to
three times at random sizes, positions and rotations over a varied background (a
low-saturation gradient with noise and muted distractor strokes). Colour makes the classes
learnable within a minute by a small network; shape, size and background vary like photos
do. Image sizes, JPEG quality and chroma subsampling vary too, so the store and the decoder
see the mix they meet in ImageNet.

Every image is a pure function of ``(seed, split, class, index)``: the same call writes the
same bytes, and any subset can be regenerated alone.

    >>> from effitrain.synth import make_imagefolder
    >>> make_imagefolder("data/synth", train_per_class=100, val_per_class=20)  # doctest: +SKIP
"""

from __future__ import annotations

import colorsys
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (shape, hue in degrees): hues 36 degrees apart, jittered by at most +-8 per object.
CLASSES: tuple[tuple[str, float], ...] = (
    ("disc", 0.0),
    ("square", 36.0),
    ("triangle", 72.0),
    ("star", 108.0),
    ("ring", 144.0),
    ("cross", 180.0),
    ("diamond", 216.0),
    ("hexagon", 252.0),
    ("bars", 288.0),
    ("chevron", 324.0),
)
SPLITS = ("train", "val")


def class_names(num_classes: int = len(CLASSES)) -> list[str]:
    """Folder names of the first ``num_classes`` classes, in label order (sorted)."""
    return [f"{i:02d}_{shape}" for i, (shape, _) in enumerate(CLASSES[:num_classes])]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with circumradius ``r`` centred at (cx, cy), rotated by ``angle``."""
    if shape == "square":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif shape == "diamond":
        pts = [(1.0, 0.0), (0.0, 0.55), (-1.0, 0.0), (0.0, -0.55)]
    elif shape == "star":
        pts = [((1.0 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5),
                (1.0 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5)) for k in range(10)]
    elif shape == "cross":
        a, b = 1.0, 0.33
        pts = [(b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b), (a, b)]
    elif shape == "chevron":
        pts = [(-0.9, -0.8), (0.0, 0.1), (0.9, -0.8), (0.9, -0.1), (0.0, 0.8), (-0.9, -0.1)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                 fill: tuple[int, int, int]) -> None:
    if shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.35)))
    elif shape == "bars":
        for k in (-1, 0, 1):  # three parallel bars, rotated together
            ox, oy = -k * 0.6 * r * math.sin(angle), k * 0.6 * r * math.cos(angle)
            dx, dy = r * math.cos(angle), r * math.sin(angle)
            draw.line((cx + ox - dx, cy + oy - dy, cx + ox + dx, cy + oy + dy), fill=fill,
                      width=max(2, int(r * 0.3)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def _rgb(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def render(label: int, rng: np.random.Generator, min_size: int, max_size: int) -> Image.Image:
    """Draw one RGB image of class ``label`` (a PIL image) using ``rng`` for every choice."""
    long_side = int(rng.integers(min_size, max_size + 1))
    aspect = float(rng.uniform(3 / 4, 4 / 3))
    w, h = (long_side, max(8, round(long_side / aspect))) if aspect >= 1 else (max(8, round(long_side * aspect)), long_side)

    # Background: a muted two-colour gradient in a random direction, plus noise.
    c0, c1 = (np.array(_rgb(rng.uniform(0, 360), rng.uniform(0, 0.3), rng.uniform(0.2, 0.95)), np.float32)
              for _ in range(2))
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    bg = c0 + (c1 - c0) * t[..., None] + rng.normal(0, rng.uniform(0, 14), (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)

    for _ in range(int(rng.integers(0, 6))):  # distractor strokes in muted colours
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        colour = _rgb(rng.uniform(0, 360), rng.uniform(0, 0.25), rng.uniform(0.1, 0.9))
        draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, max(2, long_side // 60) + 1)))

    shape, hue = CLASSES[label]
    side = min(w, h)
    for _ in range(int(rng.integers(1, 4))):
        r = side * rng.uniform(0.15, 0.35)
        cx, cy = rng.uniform(r * 0.5, w - r * 0.5), rng.uniform(r * 0.5, h - r * 0.5)
        fill = _rgb(hue + rng.uniform(-8, 8), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
        _draw_object(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    return img


def _jpeg_options(rng: np.random.Generator) -> dict:
    """ImageNet-like encoder settings: quality 80-95, a quarter of the files 4:4:4 chroma."""
    return {"quality": int(rng.integers(80, 96)), "subsampling": 0 if rng.random() < 0.25 else 2}


def make_imagefolder(
    out: str | os.PathLike,
    *,
    num_classes: int = len(CLASSES),
    train_per_class: int = 100,
    val_per_class: int = 20,
    min_size: int = 300,
    max_size: int = 500,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``out/train/<class>/*.jpg`` and ``out/val/<class>/*.jpg``; return the two folders.

    ``min_size``/``max_size`` bound the long side in pixels. Files are overwritten in place,
    so rerunning with the same arguments reproduces the same bytes.
    """
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be between 1 and {len(CLASSES)}, got {num_classes}")
    if not 8 <= min_size <= max_size:
        raise ValueError(f"need 8 <= min_size <= max_size, got {min_size}, {max_size}")
    out = Path(out)
    names = class_names(num_classes)
    folders = {}
    for split_id, (split, per_class) in enumerate(zip(SPLITS, (train_per_class, val_per_class))):
        folders[split] = out / split
        for label, name in enumerate(names):
            folder = folders[split] / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rng = np.random.default_rng([seed, split_id, label, i])
                img = render(label, rng, min_size, max_size)
                img.save(folder / f"{split}_{label:02d}_{i:05d}.jpg", "JPEG", **_jpeg_options(rng))
    return folders
