"""The pixel-space denoiser eps_theta(x_t, t), v_theta(x_t, t): a small UNet; and, without the
timestep, the discriminative UNet of DDM in pixel space.

Sized for a CPU: two residual blocks per level, no attention, widths `width * mult`. It is fully
convolutional, so a model trained on crops runs on a crop of any size that is a multiple of its
total stride, or on whole images on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._config import unet_stride
from ._denoiser import timestep_embedding


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, width), width)


class ResBlock(nn.Module):
    """Two 3x3 convolutions around a timestep FiLM (none with emb_dim 0), with a 1x1 shortcut where the
    width changes."""

    def __init__(self, inputs: int, outputs: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(inputs), nn.Conv2d(inputs, outputs, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * outputs) if emb_dim else None
        self.norm2, self.conv2 = _norm(outputs), nn.Conv2d(outputs, outputs, 3, padding=1)
        self.skip = nn.Conv2d(inputs, outputs, 1) if inputs != outputs else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.film is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = torch.addcmul(shift, h, 1 + scale)
        return self.skip(x) + self.conv2(F.silu(h))


class PixelUNet(nn.Module):
    """Maps (x_t, t) to (eps, v) for images in [-1, 1]; v in [-1, 1] interpolates the variance.

    `outputs` and `timed=False` make the same UNet a map from images to `outputs` channels with no
    timestep (`UNetHead`); `forward` is then not used, `output` is."""

    def __init__(self, channels: int = 3, width: int = 32, mults: tuple[int, ...] = (1, 2, 2, 4),
                 outputs: int | None = None, timed: bool = True):
        super().__init__()
        self.emb_dim = width * 4 if timed else 0
        self.time_mlp = (nn.Sequential(nn.Linear(width, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
                         if timed else None)
        self.width = width
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        current = width
        for level, w in enumerate(widths):
            self.down.append(ResBlock(current, w, self.emb_dim))
            current = w
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, w, 3, stride=2, padding=1))
        self.middle = ResBlock(current, current, self.emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            self.up.append(ResBlock(current + widths[level], widths[level], self.emb_dim))
            current = widths[level]
            if level > 0:
                self.upsample.append(nn.Conv2d(current, current, 3, padding=1))
        self.out_norm = _norm(current)
        self.out = nn.Conv2d(current, 2 * channels if outputs is None else outputs, 3, padding=1)
        # Start at zero noise and v = 0, as the feature denoiser does: the VLB starts finite.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.stride = unet_stride(mults)

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps, v = self.output(xt, t).chunk(2, dim=1)
        return eps, torch.tanh(v)

    def eps(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise alone, for DDM's denoising in pixel space (v's tanh is not computed)."""
        return self.output(xt, t).chunk(2, dim=1)[0]

    def output(self, xt: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The last layer's channels, before they are split or squashed."""
        emb = None if self.time_mlp is None else self.time_mlp(timestep_embedding(t, self.width))
        h = self.stem(xt)
        skips = []
        for level, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.middle(h, emb)
        for index, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if index < len(self.upsample):
                h = self.upsample[index](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


class UNetHead(nn.Module):
    """DDM's discriminative head in pixel space: [x, x^_0, (x - x^_0)^2] -> one anomaly logit per pixel,
    through a UNet, whose receptive field a defect of tens of pixels needs (the feature space's 3x3 head
    sees cells that already describe their neighbourhood)."""

    def __init__(self, channels: int, width: int, mults: tuple[int, ...]):
        super().__init__()
        self.net = PixelUNet(3 * channels, width, mults, outputs=1, timed=False)

    def forward(self, z: torch.Tensor, z0_hat: torch.Tensor) -> torch.Tensor:
        return self.net.output(torch.cat([z, z0_hat, (z - z0_hat) ** 2], dim=1))
