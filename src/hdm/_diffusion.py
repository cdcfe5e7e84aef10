"""Gaussian diffusion maths, kept apart from networks and samplers' callers.

Timestep index `t` in [0, T) stands for the paper's step t+1, as in Improved DDPM. The reverse
variance is learned: the network emits v in [-1, 1] that interpolates, in log space, between the
posterior variance beta~_t (v = -1) and beta_t (v = +1). DAGM inflates it by (1 + tau).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # Scaled so that schedules with other T keep the same endpoints per unit "time".
    scale = 1000.0 / timesteps
    return np.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=np.float64)


def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.gather(0, t).view(-1, *([1] * (like.dim() - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


class GaussianDiffusion(nn.Module):
    """Forward process q, posterior q(z_{t-1} | z_t, z_0) and reverse process p_theta on z."""

    def __init__(self, betas: np.ndarray, timestep_map: np.ndarray | None = None):
        super().__init__()
        betas = np.asarray(betas, dtype=np.float64)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; clip its log to the t = 1 value.
        posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance": posterior_log_variance,
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)
        mapping = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        self.register_buffer("timestep_map", torch.tensor(mapping, dtype=torch.long), persistent=False)
        self.num_timesteps = len(betas)

    @classmethod
    def linear(cls, timesteps: int, beta_start: float, beta_end: float) -> "GaussianDiffusion":
        return cls(linear_betas(timesteps, beta_start, beta_end))

    def respaced(self, use_timesteps: list[int]) -> "GaussianDiffusion":
        """The same process observed only at `use_timesteps` (strided sampling, Improved DDPM)."""
        use = sorted(set(int(t) for t in use_timesteps))
        alphas_cumprod = self.alphas_cumprod.double().cpu().numpy()
        betas, last = [], 1.0
        for t in use:
            betas.append(1.0 - alphas_cumprod[t] / last)
            last = alphas_cumprod[t]
        original = self.timestep_map.cpu().numpy()[use]
        return GaussianDiffusion(np.array(betas), original).to(self.betas.device)

    # -- forward process -------------------------------------------------------------------
    def q_mean_variance(self, z0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = _extract(self.sqrt_alphas_cumprod, t, z0) * z0
        variance = _extract(1.0 - self.alphas_cumprod, t, z0)
        return mean, variance

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _extract(self.sqrt_alphas_cumprod, t, z0) * z0 + _extract(self.sqrt_one_minus_alphas_cumprod, t, z0) * noise

    def q_posterior(self, z0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z_{t-1} | z_t, z_0)."""
        mean = _extract(self.posterior_mean_coef1, t, zt) * z0 + _extract(self.posterior_mean_coef2, t, zt) * zt
        return mean, _extract(self.posterior_log_variance, t, zt).expand_as(zt)

    # -- reverse process -------------------------------------------------------------------
    def predict_z0(self, zt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return _extract(self.sqrt_recip_alphas_cumprod, t, zt) * zt - _extract(self.sqrt_recipm1_alphas_cumprod, t, zt) * eps

    def predict_eps(self, zt: torch.Tensor, t: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, zt) * zt - z0) / _extract(self.sqrt_recipm1_alphas_cumprod, t, zt)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Learned log-variance: v = -1 gives the posterior variance, v = +1 gives beta_t."""
        frac = (v + 1.0) / 2.0
        return frac * _extract(self.log_betas, t, v) + (1.0 - frac) * _extract(self.posterior_log_variance, t, v)

    def p_mean_variance(self, eps: torch.Tensor, v: torch.Tensor, zt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z0 = self.predict_z0(zt, t, eps)
        mean, _ = self.q_posterior(z0, zt, t)
        return mean, self.model_log_variance(v, t), z0

    def vlb_terms(self, z0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """KL(q(z_{t-1}|z_t,z_0) || p_theta(z_{t-1}|z_t)) per sample, in bits per dimension.

        z is continuous, so the t = 0 term is also a KL (to the clipped posterior) rather than
        the discretised decoder likelihood used for 8-bit pixels.
        """
        true_mean, true_logvar = self.q_posterior(z0, zt, t)
        mean, logvar, _ = self.p_mean_variance(eps, v, zt, t)
        kl = normal_kl(true_mean, true_logvar, mean, logvar)
        return kl.flatten(1).mean(1) / math.log(2.0)

    def p_sample(self, eps: torch.Tensor, v: torch.Tensor, zt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
        """One reverse step with variance (1 + tau) * Sigma_theta; no noise is added at t = 0."""
        mean, logvar, _ = self.p_mean_variance(eps, v, zt, t)
        nonzero = (t != 0).float().view(-1, *([1] * (zt.dim() - 1)))
        return mean + nonzero * math.sqrt(1.0 + tau) * torch.exp(0.5 * logvar) * noise

    def reverse(self, zt: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The reverse process's one loop: from this schedule's last timestep down to 0, `step(z_t, t)`
        gives z_{t-1} (DAGM's sampling with inflated variance, DDM's k-step DDIM denoising)."""
        for index in range(self.num_timesteps - 1, -1, -1):
            zt = step(zt, torch.full((zt.shape[0],), index, dtype=torch.long, device=zt.device))
        return zt

    def ddim_step(self, eps: torch.Tensor, zt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step from t to t-1 of this (possibly respaced) schedule."""
        z0 = self.predict_z0(zt, t, eps)
        abar_prev = _extract(self.alphas_cumprod_prev, t, zt)
        return abar_prev.sqrt() * z0 + (1.0 - abar_prev).sqrt() * eps


def strided_timesteps(start: int, steps: int) -> list[int]:
    """`steps` timesteps evenly spaced in [0, start], always including both ends."""
    steps = max(1, min(steps, start + 1))
    return sorted(set(np.linspace(0, start, steps + 1 if steps > 1 else 2).round().astype(int).tolist()))
