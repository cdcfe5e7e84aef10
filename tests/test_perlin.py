import numpy as np

from hdm._perlin import perlin_2d, perlin_mask


def test_perlin_noise_is_smooth_and_bounded():
    noise = perlin_2d((64, 64), (4, 4), np.random.default_rng(0))
    assert np.abs(noise).max() <= 1.5
    assert np.abs(np.diff(noise, axis=1)).max() < 0.3  # smooth at 16 px per lattice cell


def test_perlin_masks_cover_a_plausible_fraction():
    rng = np.random.default_rng(0)
    coverage = np.array([perlin_mask(128, rng).mean() for _ in range(60)])
    assert (coverage > 0).all(), "an anomalous sample must have a defect"
    assert 0.01 < np.median(coverage) < 0.3
    assert coverage.max() < 0.7


def test_perlin_masks_are_deterministic_per_seed():
    a = perlin_mask(64, np.random.default_rng(3))
    b = perlin_mask(64, np.random.default_rng(3))
    assert np.array_equal(a, b)
