"""POM, the Probability Optimization Module.

Generation side: the hybrid objective L_simple + lambda * L_vlb that learns Sigma_theta on normal
samples, and the quality control of synthetic samples (reject those whose masked change is too
small to be a defect or absurdly large, and adapt tau to keep samples in that band).
Discrimination side: focal + smooth-L1 between the probability map and the mask, an
image-level term that ties the top-k map score to the label, a penalty that keeps DDM's refinement
from lifting cells whose target is normal, and the calibration of scores into probabilities and
thresholds from held-out normal images only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from .config import POMConfig
from .diffusion import GaussianDiffusion


def hybrid_loss(diffusion: GaussianDiffusion, z0: torch.Tensor, zt: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, eps: torch.Tensor, v: torch.Tensor, lambda_vlb: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_simple, L_vlb). The VLB sees a stopped-gradient mean, so it trains only the variance."""
    simple = F.mse_loss(eps, noise)
    vlb = diffusion.vlb_terms(z0, zt, t, eps.detach(), v).mean()
    return simple, lambda_vlb * vlb


def masked_change(z: torch.Tensor, z0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared change per channel inside the (soft) mask, per sample; 0 where the mask is empty."""
    per_cell = ((z - z0) ** 2).mean(dim=1, keepdim=True)
    area = mask.flatten(1).sum(1)
    return (per_cell * mask).flatten(1).sum(1) / area.clamp_min(1e-6)


def filter_samples(change: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean masks (keep, too_small, too_large) for synthetic samples by their masked change."""
    too_small = change < low
    too_large = change > high
    return ~(too_small | too_large), too_small, too_large


def adapt_tau(tau: float, too_small: int, too_large: int, count: int, config: POMConfig) -> float:
    """Raise tau when diffusion samples stay too close to normal, lower it when they explode."""
    if count == 0 or not config.adapt_tau:
        return tau
    step = config.tau_rate * (too_small - too_large) / count * (1.0 + tau)
    return float(min(config.tau_max, max(config.tau_min, tau + step)))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, alpha: float,
               reduce: bool = True) -> torch.Tensor:
    """Binary focal loss on soft targets (mean over cells, or per cell without `reduce`)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = torch.sigmoid(logits)
    p_true = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    loss = weight * (1 - p_true) ** gamma * bce
    return loss.mean() if reduce else loss


def top_k_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest `fraction` of each sample's values (the max when fraction is 0)."""
    flat = values.flatten(1)
    # int() first: under ONNX tracing shapes are tensors, and the exported k must be a constant.
    k = max(1, int(fraction * int(flat.shape[1]) + 0.5))
    return flat.topk(k, dim=1).values.mean(1)


def cell_targets(coverage: torch.Tensor, full_cell_coverage: float) -> torch.Tensor:
    """Soft mask (covered fraction of each z cell) -> map target: 1 from `full_cell_coverage` up, linear below."""
    return (coverage / full_cell_coverage).clamp(max=1.0)


def map_losses(logits: torch.Tensor, mask: torch.Tensor, label: torch.Tensor, config: POMConfig,
               top_k: float) -> dict[str, torch.Tensor]:
    """Discrimination-side losses on grid logits against the (soft) grid mask and image labels."""
    prob = torch.sigmoid(logits)
    target = cell_targets(mask, config.full_cell_coverage)
    image_logit = top_k_mean(logits, top_k)
    return {
        "focal": focal_loss(logits, target, config.focal_gamma, config.focal_alpha),
        "l1": config.lambda_l1 * F.smooth_l1_loss(prob, target),
        "image": config.lambda_image * F.binary_cross_entropy_with_logits(image_logit, label),
    }


def refinement_losses(up: torch.Tensor, residual: torch.Tensor, mask: torch.Tensor, sample_weight: torch.Tensor,
                      config: POMConfig) -> dict[str, torch.Tensor]:
    """Losses for DDM's stride-4 refinement, given as `Refinement.residual` returns it (refined logits =
    up + residual): focal + smooth-L1 on the refined logits, each sample's mean weighted by `sample_weight`,
    and a squared penalty, on every sample alike, on the residual where it raises a cell whose target is normal."""
    logits = up + residual
    target = cell_targets(mask, config.full_cell_coverage)

    def weighted(loss: torch.Tensor) -> torch.Tensor:
        return (loss.flatten(1).mean(1) * sample_weight).mean()

    return {
        "refine_focal": weighted(focal_loss(logits, target, config.focal_gamma, config.focal_alpha, reduce=False)),
        "refine_l1": config.lambda_l1 * weighted(F.smooth_l1_loss(torch.sigmoid(logits), target, reduction="none")),
        "refine_raise": config.lambda_refine_raise * (residual.clamp(min=0) ** 2 * (1 - target)).mean(),
    }


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def fit_normal_tail(values: np.ndarray, target_fpr: float) -> tuple[float, float, float]:
    """(loc, scale, threshold) for scores of normal parts, from n >= 2 held-out values.

    Scores live in (0, 1); their logits are modelled as Gaussian. The threshold is the upper
    (1 - target_fpr) prediction bound for a *new* normal part, which uses Student's t with n - 1
    degrees of freedom: with few held-out images it is wider, not falsely tight. `scale` is chosen
    so that Phi((logit(threshold) - loc) / scale) = 1 - target_fpr exactly, which lets the graph
    compute probabilities with erf alone.
    """
    x = logit(torch.as_tensor(values, dtype=torch.float64)).numpy()
    n = len(x)
    if n < 2:
        raise ValueError("calibration needs at least 2 held-out normal images")
    loc = float(x.mean())
    spread = max(float(x.std(ddof=1)), 1e-3)
    bound = float(stats.t.ppf(1 - target_fpr, n - 1)) * math.sqrt(1 + 1 / n) * spread
    scale = bound / float(stats.norm.ppf(1 - target_fpr))
    threshold = 1.0 / (1.0 + math.exp(-(loc + bound)))
    return loc, scale, threshold


class Calibration(nn.Module):
    """Raw scores -> anomaly probability, decision and binary mask; fitted on normal parts only.

    The probability is P(a normal part scores below this one) under the fitted normal-score
    distribution, so `probability >= 1 - target_fpr` is the same decision as `score >= threshold`.
    The pixel threshold is fitted on each held-out image's map maximum: a normal part gets a
    non-empty mask with probability target_fpr.
    """

    def __init__(self):
        super().__init__()
        for name, value in (("image_loc", 0.0), ("image_scale", 1.0), ("image_threshold", 1.0),
                            ("pixel_loc", 0.0), ("pixel_scale", 1.0), ("pixel_threshold", 1.0),
                            ("target_fpr", 0.0)):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    @property
    def fitted(self) -> bool:
        return bool(self.target_fpr > 0)

    def fit(self, image_scores: np.ndarray, map_maxima: np.ndarray, target_fpr: float) -> None:
        for prefix, values in (("image", image_scores), ("pixel", map_maxima)):
            for name, value in zip(("loc", "scale", "threshold"), fit_normal_tail(values, target_fpr)):
                getattr(self, f"{prefix}_{name}").fill_(value)
        self.target_fpr.fill_(target_fpr)

    def probability(self, scores: torch.Tensor) -> torch.Tensor:
        u = (logit(scores) - self.image_loc) / self.image_scale
        return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))

    def decision(self, scores: torch.Tensor) -> torch.Tensor:
        return scores >= self.image_threshold

    def summary(self) -> dict[str, float]:
        return {name: float(value) for name, value in self.named_buffers()}
