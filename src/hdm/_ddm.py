"""DDM, the Diffusion Discriminative Module.

Reverse-diffuse the input z to its normal version z^_0 (one step, norm-guided, or k DDIM steps),
then a discriminative head on [z, z^_0, (z - z^_0)^2] gives anomaly logits on the z grid, which a
refinement sharpens on the guide's finer grid where the space has a guide (the feature space's
stride-4 stage). The map is brought to pixels and smoothed; the image score is the top-k mean of
the map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._config import DDMConfig
from ._denoiser import Denoiser
from ._diffusion import GaussianDiffusion, strided_timesteps
from ._pom import top_k_mean
from ._space import Encoded


class DiscriminativeHead(nn.Module):
    """[z, z^_0, (z - z^_0)^2] -> one anomaly logit per z cell."""

    def __init__(self, channels: int, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3 * channels, width, 1),
            nn.BatchNorm2d(width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.SiLU(),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width // 2, 1, 1),
        )

    def forward(self, z: torch.Tensor, z0_hat: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, z0_hat, (z - z0_hat) ** 2], dim=1))


class Refinement(nn.Module):
    """z-grid logits + the space's guide -> logits on the guide's grid, as a residual on the upsampled logits.

    The head decides *whether* a region is anomalous; this only redraws *where* its edges lie, from
    features with a finer resolution than z (twice, in the feature space).
    """

    def __init__(self, guide_channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(guide_channels + 1, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def residual(self, logits: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head logits upsampled to the guide's grid, the learned correction); the refined logits are their sum."""
        up = F.interpolate(logits, size=guide.shape[-2:], mode="bilinear", align_corners=False)
        return up, self.net(torch.cat([up, guide], dim=1))

    def forward(self, logits: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        up, residual = self.residual(logits, guide)
        return up + residual


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def blur_matrix(sigma: float, size: int) -> torch.Tensor:
    """size x size matrix B with B @ x = x blurred along its first axis by a Gaussian, with reflected
    borders (edge not repeated)."""
    kernel = gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    if radius >= size:
        raise ValueError(f"a blur of sigma {sigma} needs maps wider than {radius} pixels")
    rows = torch.arange(size)
    matrix = torch.zeros(size, size)
    for offset, weight in zip(range(-radius, radius + 1), kernel):
        source = (rows + offset).abs()
        source = torch.where(source >= size, 2 * (size - 1) - source, source)
        matrix.index_put_((rows, source), weight.expand(size), accumulate=True)
    return matrix


def smooth(maps: torch.Tensor, blur: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of B x 1 x S x S maps with a `blur_matrix` of size S: two matrix
    products, which a CPU runs in about half the time of the one-channel convolutions they replace."""
    return blur @ maps @ blur.T


class DDM(nn.Module):
    """Denoising of z to its normal version, the discriminative head and its refinement."""

    def __init__(self, config: DDMConfig, diffusion: GaussianDiffusion, channels: int, guide_channels: int,
                 image_size: int, head: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.diffusion = diffusion
        # The space's own head (pixel space: a UNet) or the small convolutional one that z's cells need.
        self.head = head if head is not None else DiscriminativeHead(channels, config.head_width)
        self.refinement = (Refinement(guide_channels, config.refine_width) if config.refine and guide_channels
                           else None)
        self.k_process = diffusion.respaced(strided_timesteps(config.t_s, config.k_steps))
        self.register_buffer("blur", blur_matrix(config.smooth_sigma, image_size), persistent=False)

    def _t(self, value: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0],), value, dtype=torch.long, device=like.device)

    def one_step(self, z: torch.Tensor, denoiser: Denoiser, noise: torch.Tensor, t_s: int) -> torch.Tensor:
        t = self._t(t_s, z)
        zt = self.diffusion.q_sample(z, t, noise)
        return self.diffusion.predict_z0(zt, t, denoiser.eps(zt, t))

    def denoise(self, z: torch.Tensor, denoiser: Denoiser, noise: torch.Tensor) -> torch.Tensor:
        """z -> z^_0 with the configured mode; `noise` is the forward-process noise (same shape as z)."""
        mode, t_s = self.config.mode, self.config.t_s
        if mode == "one_step":
            return self.one_step(z, denoiser, noise, t_s)
        if mode == "norm_guided":
            # DiffusionAD-style: a one-step estimate from a deeper noise level removes large anomalies;
            # it guides the shallow estimate, which keeps normal detail.
            deep = self.one_step(z, denoiser, noise, min(2 * t_s, self.diffusion.num_timesteps - 1))
            t = self._t(t_s, z)
            zt = self.diffusion.q_sample(z, t, noise)
            eps = denoiser.eps(zt, t)
            guided_eps = 0.5 * (eps + self.diffusion.predict_eps(zt, t, deep))
            return self.diffusion.predict_z0(zt, t, guided_eps)
        process = self.k_process
        zt = process.q_sample(z, self._t(process.num_timesteps - 1, z), noise)
        # The DDIM step from t = 0 lands on the z_0 estimate itself.
        return process.reverse(zt, lambda zt, t: process.ddim_step(denoiser.eps(zt, process.timestep_map[t]), zt, t))

    def logits(self, encoded: Encoded, denoiser: Denoiser, noise: torch.Tensor) -> torch.Tensor:
        """Anomaly logits on the map's grid: the guide's with a refinement, else z's."""
        logits = self.head(encoded.z, self.denoise(encoded.z, denoiser, noise))
        return logits if self.refinement is None else self.refinement(logits, encoded.guide)

    def postprocess(self, pixel_prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probability map at model size -> (smoothed map, image score per sample)."""
        maps = smooth(pixel_prob, self.blur)
        return maps, top_k_mean(maps, self.config.top_k)
