"""Perlin-noise masks: the shapes of DAGM's synthetic anomalies."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_2d(shape: tuple[int, int], periods: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Gradient noise with `periods` lattice cells along (rows, cols); values roughly in [-1, 1]."""
    rows, cols = shape
    angles = rng.uniform(0.0, 2 * np.pi, size=(periods[0] + 1, periods[1] + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.arange(rows) * periods[0] / rows
    x = np.arange(cols) * periods[1] / cols
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy[:, None] + dy, ix[None, :] + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    # sqrt(2) stretches the range to about [-1, 1], so a threshold reads as a fraction of it.
    return np.sqrt(2.0) * (top * (1 - uy) + bottom * uy)


def perlin_mask(size: int, rng: np.random.Generator, threshold: float = 0.5, attempts: int = 8) -> np.ndarray:
    """A boolean size x size anomaly mask: thresholded Perlin noise at a random scale and rotation.

    Redrawn until non-empty, so every sample asked to be anomalous is.
    """
    for _ in range(attempts):
        periods = (2 ** int(rng.integers(0, 6)), 2 ** int(rng.integers(0, 6)))  # 1 to 32 cells a side
        noise = perlin_2d((size, size), periods, rng)
        noise = ndimage.rotate(noise, float(rng.uniform(-90, 90)), reshape=False, order=1, mode="reflect")
        mask = noise > threshold
        if mask.any():
            return mask
    # Rare with the default threshold: fall back to a single blob so the caller's contract holds.
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    return (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2
