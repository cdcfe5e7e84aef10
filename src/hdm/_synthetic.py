"""The built-in default data: a small, deterministic inspection dataset in the MVTec AD layout.

Normal parts are tiles of a gravel surface that ships with scikit-image, tinted like cast metal
and lit unevenly. Defects are drawn with geometric primitives (lines, random-walk polylines,
ellipses, polygons): deliberately nothing like DAGM's Perlin-masked training anomalies, so the
job measures generalisation to defects the model never saw made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from skimage import data as skdata

from ._store import write_png

CATEGORY = "gravel_plate"
DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "missing")


def _surface(rng: np.random.Generator, size: int, source: np.ndarray) -> np.ndarray:
    """One normal part: a random crop of the texture, flipped/rotated, tinted and lit."""
    top, left = rng.integers(0, source.shape[0] - size, size=2)
    tile = source[top:top + size, left:left + size].astype(np.float32)
    tile = np.rot90(tile, int(rng.integers(4)))
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    yy, xx = np.mgrid[:size, :size] / size
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.9 + 0.15 * (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))
    gray = np.clip(tile * light * rng.uniform(0.92, 1.08), 0, 255)
    tint = np.array([1.0, 0.97, 0.9])
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


def _random_walk(rng: np.random.Generator, size: int, steps: int, step_len: float) -> list[tuple[float, float]]:
    point = rng.uniform(0.2, 0.8, size=2) * size
    heading = rng.uniform(0, 2 * np.pi)
    points = [tuple(point)]
    for _ in range(steps):
        heading += rng.normal(0, 0.5)
        point = np.clip(point + step_len * np.array([np.cos(heading), np.sin(heading)]), 0, size - 1)
        points.append(tuple(point))
    return points


def _draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one defect of `kind` on a copy of `image`; return (image, boolean mask)."""
    size = image.shape[0]
    canvas = Image.fromarray(image)
    mask = Image.new("L", (size, size), 0)
    draw, mark = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    if kind == "scratch":
        start = rng.uniform(0.15, 0.85, size=2) * size
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.25, 0.5) * size
        end = np.clip(start + length * np.array([np.cos(angle), np.sin(angle)]), 0, size - 1)
        width = int(rng.integers(2, 5))
        shade = tuple(int(c) for c in rng.choice([rng.integers(215, 256, 3), rng.integers(10, 50, 3)]))
        line = [tuple(start), tuple(end)]
        draw.line(line, fill=shade, width=width)
        mark.line(line, fill=255, width=width)
    elif kind == "crack":
        points = _random_walk(rng, size, int(rng.integers(12, 25)), size / 40)
        width = int(rng.integers(2, 4))
        draw.line(points, fill=(20, 18, 15), width=width, joint="curve")
        mark.line(points, fill=255, width=width, joint="curve")
    elif kind == "hole":
        radius = rng.uniform(0.04, 0.09) * size
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        ry = radius * rng.uniform(0.7, 1.3)
        box = [cx - radius, cy - ry, cx + radius, cy + ry]
        draw.ellipse([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=(200, 195, 185))
        draw.ellipse(box, fill=(12, 10, 10))
        mark.ellipse([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=255)
    elif kind == "stain":
        cy, cx = rng.uniform(0.25, 0.75, size=2) * size
        ry, rx = rng.uniform(0.06, 0.14, size=2) * size
        blob = Image.new("L", (size, size), 0)
        ImageDraw.Draw(blob).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        alpha = np.asarray(blob.filter(ImageFilter.GaussianBlur(radius=size / 64)), np.float32) / 255.0
        colour = np.array([rng.uniform(90, 160), rng.uniform(40, 90), rng.uniform(10, 40)])
        out = image.astype(np.float32) * (1 - 0.75 * alpha[..., None]) + colour * 0.75 * alpha[..., None]
        return np.clip(out, 0, 255).astype(np.uint8), alpha > 0.3
    elif kind == "missing":
        cy, cx = rng.uniform(0.25, 0.75, size=2) * size
        corners = int(rng.integers(4, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = rng.uniform(0.05, 0.11, corners) * size
        polygon = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        draw.polygon(polygon, fill=(60, 62, 66))
        mark.polygon(polygon, fill=255)
    else:
        raise ValueError(f"unknown defect type {kind!r}")
    return np.asarray(canvas), np.asarray(mask) > 127


def make_default_dataset(root: Path, seed: int = 0, n_train: int = 60, n_test_good: int = 20,
                         n_per_defect: int = 6, size: int = 256) -> Path:
    """Write the dataset below `root/CATEGORY` (MVTec AD layout) and return `root`."""
    rng = np.random.default_rng(seed)
    source = np.asarray(skdata.gravel())
    base = root / CATEGORY
    for index in range(n_train):
        write_png(base / "train" / "good" / f"{index:03d}.png", _surface(rng, size, source))
    for index in range(n_test_good):
        write_png(base / "test" / "good" / f"{index:03d}.png", _surface(rng, size, source))
    for kind in DEFECT_TYPES:
        for index in range(n_per_defect):
            image, mask = _draw_defect(_surface(rng, size, source), kind, rng)
            write_png(base / "test" / kind / f"{index:03d}.png", image)
            write_png(base / "ground_truth" / kind / f"{index:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root
