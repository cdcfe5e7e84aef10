"""The nearest-neighbour anchor: a memory bank of normal z cells, no training.

Measured beside HDM on the same frozen features, it is the yardstick each module must beat.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .ddm import gaussian_kernel, smooth
from .pom import top_k_mean
from .space import FeatureSpace
from .train import encode


class NearestNeighbourAnchor(nn.Module):
    """Same call contract as `HDM`: images in [0, 1] -> (maps, image scores)."""

    def __init__(self, space: FeatureSpace, smooth_sigma: float = 4.0, top_k: float = 0.01):
        super().__init__()
        self.space = space
        self.image_size = space.config.image_size
        self.register_buffer("kernel", gaussian_kernel(smooth_sigma), persistent=False)
        self.top_k = top_k
        self.bank = torch.empty(0)

    def fit(self, images: np.ndarray) -> None:
        raw = encode(self.space, images, desc="anchor bank", progress=False)
        self.space.fit_statistics(raw)
        z = self.space.normalise(raw).z
        self.bank = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).contiguous()

    def distances(self, z: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Per-cell Euclidean distance to the nearest bank entry: B x 1 x g x g."""
        queries = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        q_sq = (queries**2).sum(1, keepdim=True)
        best = torch.full((queries.shape[0],), float("inf"))
        for start in range(0, self.bank.shape[0], chunk):
            bank = self.bank[start:start + chunk]
            d = q_sq - 2 * queries @ bank.T + (bank**2).sum(1)[None]
            best = torch.minimum(best, d.min(1).values)
        return best.clamp_min(0).sqrt().view(z.shape[0], 1, z.shape[2], z.shape[3])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.space(images).z
        maps = smooth(self.space.to_pixels(self.distances(z)), self.kernel)
        return maps, top_k_mean(maps, self.top_k)
