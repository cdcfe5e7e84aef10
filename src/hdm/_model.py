"""HDM as one pure nn.Module: images in, anomaly probability maps and image scores out."""

from __future__ import annotations

import torch
from torch import nn

from ._config import HDMConfig
from ._ddm import DDM
from ._device import autocast
from ._diffusion import GaussianDiffusion
from ._pom import Calibration, NormalDensity
from ._space import build_space


class HDM(nn.Module):
    """Space + its denoiser (EMA weights) + DDM head and refinement + POM's density prior.

    Inference uses one fixed draw of forward-process noise, stored with the weights, so a given
    image always gets the same map, in torch and in any exported graph.
    """

    def __init__(self, config: HDMConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.space = build_space(config.space)
        channels, grid = self.space.channels, self.space.grid
        d = config.diffusion
        self.diffusion = GaussianDiffusion.linear(d.timesteps, d.beta_start, d.beta_end)
        self.denoiser = self.space.denoiser(d)
        self.ddm = DDM(config.ddm, self.diffusion, channels, self.space.guide_channels, config.space.image_size,
                       self.space.head())
        pom = config.pom
        self.density = (NormalDensity(channels, pom.density_bank, pom.density_pool, lift=self.space.lift,
                                      lifted=self.space.lifted_channels, lists=pom.density_lists,
                                      probe=pom.density_probe, neighbours=pom.density_neighbours,
                                      power=pom.density_radius_power)
                        if pom.density_bank and self.space.density_prior else None)
        generator = torch.Generator().manual_seed(config.train.seed)
        self.register_buffer("noise", torch.randn(1, channels, grid, grid, generator=generator))
        self.calibration = Calibration()
        # "bf16": the encoder, denoiser and head run under CUDA autocast (`_device.place` sets it; not saved).
        self.precision = "fp32"

    @property
    def image_size(self) -> int:
        return self.config.space.image_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: B x 3 x S x S floats in [0, 1] -> (B x 1 x S x S map in [0, 1], B scores)."""
        return self.finish(*self.voices(images))

    def voices(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DDM's head logits (refined) and POM's density prior on the same grid (None without a prior),
        before they are fused."""
        with autocast(images.device, self.precision):
            encoded = self.space(images)
            # The denoiser's and head's convolutions run faster channels-last, and the prior reads z's cells as rows.
            encoded = encoded._replace(z=encoded.z.contiguous(memory_format=torch.channels_last))
            logits = self.ddm.logits(encoded, self.denoiser, self.noise.expand_as(encoded.z)).float()
        # The prior's search stays in fp32 whatever the precision: in bf16, |q|^2 - 2 q.b + |b|^2 would
        # lose which bank cell is nearest.
        return logits, None if self.density is None else self.density(encoded.z.float(), logits.shape[-1])

    def finish(self, logits: torch.Tensor, prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`voices` -> (B x 1 x S x S map in [0, 1], B scores)."""
        if prior is not None:
            logits = self.density.fuse(logits, prior)
        return self.ddm.postprocess(self.space.to_pixels(torch.sigmoid(logits)))

    @property
    def pixel_threshold(self) -> float:
        """Map value above which a pixel belongs to the binary defect mask."""
        if not self.calibration.fitted:
            raise ValueError("the model has no calibration (it was not made by `hdm fit`)")
        return float(self.calibration.pixel_threshold)

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` plus the calibrated probability and the ok/defect decision per image."""
        maps, scores = self(images)
        return maps, scores, self.calibration.probability(scores), self.calibration.decision(scores)

    def _frozen(self, key: str) -> bool:
        return any(key.startswith(f"space.{name}.") for name in self.space.frozen)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Everything learned or fitted; the space's frozen parts are rebuilt from their package instead."""
        return {k: v for k, v in self.state_dict().items() if not self._frozen(k)}

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        # Runs made before the space seam named the guide's statistics after the stride-4 stage.
        state = {k.replace("space.fine_", "space.guide_", 1): v for k, v in state.items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not self._frozen(k)]
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def to_model_input(images_uint8) -> torch.Tensor:
    """N x S x S x 3 uint8 (numpy) -> N x 3 x S x S float tensor in [0, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)
