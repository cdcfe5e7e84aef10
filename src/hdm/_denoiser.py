"""The denoiser eps_theta(z_t, t) with learned variance v_theta(z_t, t) on the z grid.

Short on purpose: z is already a rich feature map, so a few residual blocks of depthwise 3x3 and
pointwise convolutions, modulated by the timestep, are enough and stay cheap on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, width)
        self.spatial = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.expand = nn.Conv2d(width, 2 * width, 1)
        self.project = nn.Conv2d(2 * width, width, 1)
        self.film = nn.Linear(emb_dim, 2 * width)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm(x), 1 + scale)
        # In place where no gradient needs the activation's input (inference, DAGM's sampling).
        h = self.project(F.silu(self.expand(self.spatial(h)), inplace=not torch.is_grad_enabled()))
        return x + h


class Denoiser(nn.Module):
    """Maps (z_t, t) to (eps, v): predicted noise and the variance interpolation in [-1, 1]."""

    def __init__(self, channels: int, width: int = 128, depth: int = 4):
        super().__init__()
        self.emb_dim = width
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.stem = nn.Conv2d(channels, width, 1)
        self.blocks = nn.ModuleList(ResidualBlock(width, width) for _ in range(depth))
        self.out_norm = nn.GroupNorm(8, width)
        self.out = nn.Conv2d(width, 2 * channels, 1)
        # Start predicting zero noise and v = 0 (the geometric mean of the two variance bounds),
        # so early DAGM samples are tame and the VLB starts finite.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _features(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim))
        h = self.stem(zt)
        for block in self.blocks:
            h = block(h, emb)
        return F.silu(self.out_norm(h))

    def forward(self, zt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps, v = self.out(self._features(zt, t)).chunk(2, dim=1)
        return eps, torch.tanh(v)

    def eps(self, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise alone, for DDM's denoising: the variance half of the output layer is not computed
        (it and its tanh were a twentieth of inference)."""
        channels = self.out.out_channels // 2
        return F.conv2d(self._features(zt, t), self.out.weight[:channels], self.out.bias[:channels])
