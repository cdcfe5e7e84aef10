"""DAGM in pixels: a diffusion model of the normal images that regenerates masked regions into defects.

`PixelGenerator` is a pure module (the UNet, the schedule, and whether the surface is grey);
`fit_generator` trains it on random crops of the normal images with POM's hybrid objective, resumably;
`make_defects` draws defects with POM's quality control: a sample whose change inside its mask is
too small to be a defect or too large to be a surface is rejected, and tau adapts to keep samples in
that band, as DAGM does in feature space.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._config import GENERATOR_SAMPLING, GeneratorConfig, HDMConfig
from ._dagm import appearance_anomaly, crop_box, defect_mask, foreign_textures, is_grayscale, regenerate
from ._data import HDMInputError, load_images_resized
from ._device import device_of
from ._diffusion import GaussianDiffusion, strided_timesteps
from ._pom import adapt_tau, hybrid_loss, masked_change
from ._progress import bar
from ._train import one_cycle, recent_losses, update_ema
from ._unet import PixelUNet

# Pixels of context around a mask's bounding box that the UNet sees when it regenerates the mask.
CONTEXT = 8


def to_pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """... x H x W x 3 uint8 -> ... x 3 x H x W float in [-1, 1], the diffusion's scale."""
    x = torch.as_tensor(np.asarray(images)).float()
    return (x / 127.5 - 1.0).movedim(-1, -3)


def from_pixels(x: torch.Tensor) -> np.ndarray:
    """The inverse of `to_pixels`, rounded and clipped."""
    return ((x.movedim(-3, -1).float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


class PixelGenerator(nn.Module):
    """The pixel diffusion model of one surface's normal images (EMA weights once trained)."""

    def __init__(self, config: HDMConfig, grayscale: bool = False):
        super().__init__()
        config.validate()
        self.config = config
        g, d = config.generator, config.diffusion
        self.unet = PixelUNet(3, g.width, g.mults)
        self.diffusion = GaussianDiffusion.linear(d.timesteps, d.beta_start, d.beta_end)
        self.t_from = g.t_appearance if g.start == "appearance" else g.t_start
        self.reverse = self.diffusion.respaced(strided_timesteps(self.t_from, g.sample_steps))
        # A grey surface gets grey defects: the UNet's three channels agree only roughly.
        self.register_buffer("grayscale", torch.tensor(bool(grayscale)))

    @property
    def image_size(self) -> int:
        return self.config.space.image_size

    @torch.no_grad()
    def anomaly(self, image: np.ndarray, mask: np.ndarray, tau: float, generator: torch.Generator,
                start: np.ndarray | None = None) -> np.ndarray:
        """`image` (S x S x 3 uint8) with the region under `mask` (S x S bool) regenerated at (1 + tau)
        Sigma_theta from what `start` holds there (the image itself by default); only the mask's crop goes
        through the UNet, and outside the mask the input is kept exactly."""
        rows, cols = crop_box(mask, self.unet.stride, CONTEXT)
        device = device_of(self)
        begin = image if start is None else np.where(mask[..., None], start, image)
        x0 = to_pixels(begin[rows, cols])[None].to(device)
        inside = torch.from_numpy(mask[rows, cols]).float()[None, None].to(device)
        inflate_from = round(self.config.generator.inflate_above * self.t_from)
        x = regenerate(x0, inside, self.unet, self.reverse, tau, generator, inflate_from,
                       self.config.generator.guide)
        if bool(self.grayscale):
            x = x.mean(dim=1, keepdim=True).expand_as(x)
        out = image.copy()
        out[rows, cols] = np.where(mask[rows, cols, None], from_pixels(x[0]), image[rows, cols])
        return out


def with_sampling(model: PixelGenerator, settings: GeneratorConfig) -> PixelGenerator:
    """`model`'s weights, drawing defects with the sampling fields of `settings` (GENERATOR_SAMPLING)."""
    if all(getattr(model.config.generator, name) == getattr(settings, name) for name in GENERATOR_SAMPLING):
        return model.eval()
    config = copy.deepcopy(model.config)
    for name in GENERATOR_SAMPLING:
        setattr(config.generator, name, getattr(settings, name))
    made = PixelGenerator(config, bool(model.grayscale)).to(device_of(model))
    made.load_state_dict(model.state_dict())
    return made.eval()


@dataclass
class Defect:
    """One generated sample: the image, its exact mask, and how it was made."""

    image: np.ndarray  # S x S x 3 uint8
    mask: np.ndarray  # S x S bool
    source: int  # index of the normal image it started from
    tau: float
    change: float  # mean squared change inside the mask, [-1, 1] scale


def pixel_change(defect: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float:
    """POM's measure of a sample: the mean squared change inside the mask, on the diffusion's scale."""
    inside = torch.from_numpy(mask).float()[None, None]
    return float(masked_change(to_pixels(defect)[None], to_pixels(image)[None], inside)[0])


def make_defects(model: PixelGenerator, images: np.ndarray, count: int, seed: int, masks: np.ndarray | None = None,
                 tau: float | None = None, progress: bool = True) -> tuple[list[Defect], int]:
    """`count` defects, the k-th started from image k mod N (with its mask when `masks` is given, else a
    `defect_mask` blob on its foreground), and how many draws POM rejected. With `generator.start` =
    "appearance" the region starts as an appearance anomaly, pasted from another of `images` or a
    foreign texture. Each sample is drawn again, tau adapting, until its change lies in the band; one
    still outside it after `generator.attempts` draws is left out. The same seed gives the same samples."""
    config = model.config
    g = config.generator
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    tau = g.tau if tau is None else tau
    textures = foreign_textures(model.image_size) if g.start == "appearance" else None
    pom = dataclasses.replace(config.pom, tau_max=g.tau_max)
    defects, rejected = [], 0
    for k in bar(range(count), desc="generate", enabled=progress):
        source = k % len(images)
        image = images[source]
        for _ in range(g.attempts):
            mask = masks[source] if masks is not None else defect_mask(image, min(g.mask_window, model.image_size), rng)
            start = None if textures is None else appearance_anomaly(
                image, images[int(rng.integers(len(images)))], textures, rng, config.dagm, bool(model.grayscale), mask)[0]
            made = model.anomaly(image, mask, tau, generator, start)
            change = pixel_change(made, image, mask)
            small, large = change < g.change_low, change > g.change_high
            if not (small or large):
                defects.append(Defect(made, mask, source, tau, change))
                break
            rejected += 1
            tau = adapt_tau(tau, int(small), int(large), 1, pom)
    return defects, rejected


@dataclass
class GeneratorLog:
    losses: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"losses": self.losses, "seconds": self.seconds}

    def summary(self) -> dict[str, float]:
        return {**recent_losses(self.losses), "train_seconds": self.seconds}


def random_crops(images: torch.Tensor, count: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random size x size crops of N x S x S x 3 uint8 images, half of them mirrored, in [-1, 1]."""
    index = rng.integers(len(images), size=count)
    corners = rng.integers(0, images.shape[1] - size + 1, size=(count, 2))
    flips = rng.random(count) < 0.5
    crops = [images[i, top:top + size, left:left + size] for i, (top, left) in zip(index, corners)]
    crops = [crop.flip(1) if flip else crop for crop, flip in zip(crops, flips)]
    return to_pixels(torch.stack(crops))


def fit_generator(config: HDMConfig, paths: list[Path], progress: bool = True, log: Callable[[str], None] = print,
                  checkpoint: Callable[[dict], None] | None = None, resume_from: dict | None = None,
                  device: torch.device = torch.device("cpu")) -> tuple[PixelGenerator, GeneratorLog]:
    """Train the pixel diffusion model on crops of the normal images at the detector's size, on `device`, at the
    timesteps 0 to generator.t_start.

    Every `generator.checkpoint_every` steps `checkpoint` gets the whole training state; `resume_from`
    (such a state) continues it to the same model as an uninterrupted run.
    """
    config.validate()
    g = config.generator
    if not paths:
        raise HDMInputError("no normal images to train the generator on")
    started = time.perf_counter()
    images_np = load_images_resized(paths, config.space.image_size)
    images = torch.from_numpy(images_np)
    torch.manual_seed(config.train.seed)  # the initial weights
    model = PixelGenerator(config, is_grayscale(images_np)).to(device)
    # channels-last: a training step ran a tenth faster so on this CPU (not one image at a time, though)
    unet, diffusion = model.unet.to(memory_format=torch.channels_last), model.diffusion
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=g.lr, weight_decay=1e-4)
    schedule = one_cycle(optimiser, g.lr, g.steps)
    rng = np.random.default_rng(config.train.seed)
    generator = torch.Generator().manual_seed(config.train.seed)
    history, first = GeneratorLog(), 0
    if resume_from is not None:
        unet.load_state_dict(resume_from["unet"])
        ema.load_state_dict(resume_from["ema"])
        optimiser.load_state_dict(resume_from["optimiser"])
        schedule.load_state_dict(resume_from["schedule"])
        rng.bit_generator.state = resume_from["rng"]
        generator.set_state(resume_from["generator"])
        history = GeneratorLog(**resume_from["history"])
        first = int(resume_from["step"])
        log(f"fit-generator: resuming at step {first} of {g.steps}")
    previous_seconds = history.seconds
    crop = min(g.crop_size, config.space.image_size)
    log(f"fit-generator: {len(images)} normal images, crops of {crop} px at {config.space.image_size} px"
        f"{' (grey surface)' if bool(model.grayscale) else ''}")
    unet.train()
    steps_bar = bar(range(first, g.steps), desc="train generator", enabled=progress, initial=first, total=g.steps)
    for step in steps_bar:
        x0 = random_crops(images, g.batch_size, crop, rng).to(device)
        x0 = x0.contiguous(memory_format=torch.channels_last)
        t = torch.randint(0, g.t_start + 1, (g.batch_size,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        xt = diffusion.q_sample(x0, t, noise)
        eps, v = unet(xt, t)
        l_simple, l_vlb = hybrid_loss(diffusion, x0, xt, t, noise, eps, v, config.pom.lambda_vlb)
        optimiser.zero_grad(set_to_none=True)
        (l_simple + l_vlb).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        update_ema(ema, unet, step, g.ema_decay)
        history.losses.append({"simple": l_simple.item(), "vlb": l_vlb.item()})
        if step % 25 == 0:
            steps_bar.set_postfix(simple=f"{l_simple.item():.4f}", refresh=False)
        if checkpoint is not None and (step + 1) % g.checkpoint_every == 0 and step + 1 < g.steps:
            history.seconds = previous_seconds + time.perf_counter() - started
            checkpoint({"step": step + 1, "unet": unet.state_dict(), "ema": ema.state_dict(),
                        "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                        "rng": rng.bit_generator.state, "generator": generator.get_state(),
                        "history": history.to_dict()})
    unet.load_state_dict(ema.state_dict())
    model.eval()
    history.seconds = previous_seconds + time.perf_counter() - started
    return model, history

