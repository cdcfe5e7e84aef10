"""The nearest-neighbour anchor: a memory bank of normal z cells, no training.

Measured beside HDM on the same frozen features, it is the yardstick each module must beat. Its
distance is POM's `NormalDensity`, with a larger bank and nothing learned on top.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._ddm import blur_matrix, smooth
from ._pom import NormalDensity, top_k_mean
from ._space import Space
from ._train import encode


class NearestNeighbourAnchor(nn.Module):
    """Same call contract as `HDM`: images in [0, 1] -> (maps, image scores)."""

    def __init__(self, space: Space, smooth_sigma: float = 4.0, top_k: float = 0.01,
                 bank_size: int = 20000, seed: int = 0):
        super().__init__()
        self.space = space
        self.image_size = space.config.image_size
        self.register_buffer("blur", blur_matrix(smooth_sigma, self.image_size), persistent=False)
        self.top_k = top_k
        self.seed = seed
        self.density = NormalDensity(space.channels, bank_size, lift=space.lift, lifted=space.lifted_channels)

    def fit(self, images: np.ndarray) -> None:
        raw = encode(self.space, images, desc="anchor bank", progress=False)
        self.space.fit_statistics(raw)
        self.density.fit(self.space.normalise(raw).z, torch.Generator().manual_seed(self.seed))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.space(images).z
        maps = smooth(self.space.to_pixels(self.density.distance(z)), self.blur)
        return maps, top_k_mean(maps, self.top_k)
