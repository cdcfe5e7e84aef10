"""Training glue: cache the normal images encoded in the model's space, then optimise denoiser, head
and refinement with DAGM batches.

The model (`HDM`) stays a pure module; everything about optimisation lives here. The loop is written
once for one process and for data-parallel ranks (`_distributed`): each rank encodes and draws from
its own shard of the images, and every step averages the gradients and batch-norm statistics, so all
ranks hold the same model.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._config import HDMConfig
from ._dagm import DAGM, Provenance, SyntheticBatch, appearance_anomaly, foreign_textures, grid_mask, is_grayscale
from ._data import HDMInputError, load_images_resized
from ._device import autocast, device_of, place
from ._distributed import Ranks, running_statistics
from ._model import HDM, to_model_input
from ._pom import adapt_tau, filter_samples, hybrid_loss, map_losses, masked_change, refinement_losses
from ._progress import bar
from ._space import Encoded, Space

if TYPE_CHECKING:
    from ._generator import PixelGenerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Left-right flip of image-shaped tensors (the training augmentation)."""
    return x.flip(-1)


@torch.no_grad()
def encode(space: Space, images: np.ndarray, batch_size: int = 16, desc: str = "encode",
           progress: bool = True, normalised: bool = False) -> Encoded:
    """N x S x S x 3 uint8 images in the space (un-normalised unless `normalised`), batch by batch, on
    the space's device, into tensors allocated once: a list of batches and its concatenation would
    hold the encodings twice."""
    device, whole = device_of(space), None
    for start in bar(range(0, len(images), batch_size), desc=desc, enabled=progress):
        x = to_model_input(images[start:start + batch_size]).to(device)
        part = space(x) if normalised else space.raw(x)
        if whole is None:
            whole = part.apply(lambda t: t.new_empty((len(images), *t.shape[1:])))
        for into, values in zip(whole, part):
            if values is not None:
                into[start:start + len(values)] = values
    return whole


def one_cycle(optimiser: torch.optim.Optimizer, lr: float, steps: int) -> torch.optim.lr_scheduler.OneCycleLR:
    """The learning-rate schedule of every network hdm trains: a 5% warm-up to `lr`, then cosine decay."""
    # OneCycleLR divides by zero when its warm-up is exactly one step (20 steps at 5%)
    warmup = 0.05 if steps != 20 else 0.1
    return torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=warmup)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, step: int, decay: float) -> None:
    """The EMA weights a fit keeps and finally uses: `decay`, ramped up over the first steps so the
    average does not hold on to the random initialisation."""
    decay = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def recent_losses(losses: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each loss over the last 50 steps, as `loss_<name>` (a run's summary)."""
    last = losses[-50:]
    return {f"loss_{k}": float(np.mean([row[k] for row in last])) for k in last[0]} if last else {}


@dataclass
class TrainingLog:
    losses: list[dict[str, float]] = field(default_factory=list)
    tau: list[float] = field(default_factory=list)
    rejected: int = 0
    synthetic: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"losses": self.losses, "tau": self.tau, "rejected": self.rejected, "synthetic": self.synthetic,
                "seconds": self.seconds}

    def summary(self) -> dict[str, float]:
        return {**recent_losses(self.losses), "tau": self.tau[-1] if self.tau else 0.0,
                "rejected_fraction": self.rejected / max(1, self.synthetic), "train_seconds": self.seconds}


def build_appearance_pool(space: Space, images: np.ndarray, config: HDMConfig, rng: np.random.Generator,
                          progress: bool, pixels: "PixelGenerator | None" = None) -> tuple[Encoded, torch.Tensor, int]:
    """Pixel-space anomalies (DAGM content b), encoded once: N x k leading dimensions, soft masks on
    the map's grid, and how many of them the pixel generator made. With a generator (`pixels`), a
    `dagm.pixel_share` of the slots holds its defects (a slot whose draws POM rejected keeps a pasted one)."""
    from ._generator import make_defects  # the generator's module trains with this one's schedule

    per_image = max(1, min(config.dagm.appearance_per_image, config.dagm.appearance_pool_max // len(images)))
    textures = foreign_textures(images.shape[1])
    grayscale = is_grayscale(images)
    slots = [index for index in range(len(images)) for _ in range(per_image)]
    by_pixels: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if pixels is not None:
        chosen = np.flatnonzero(rng.random(len(slots)) < config.dagm.pixel_share)
        starts = np.array([slots[k] for k in chosen], dtype=int)
        defects = make_defects(pixels, images[starts], len(chosen), seed=int(rng.integers(2 ** 31)),
                               progress=progress)[0] if len(chosen) else []
        by_pixels = {int(chosen[d.source]): (d.image, d.mask) for d in defects}
    made, masks = np.empty((len(slots), *images.shape[1:]), dtype=images.dtype), []  # filled in place: held once
    for slot, index in enumerate(slots):
        if slot in by_pixels:
            image, mask = by_pixels[slot]
        else:
            other = images[int(rng.integers(len(images)))]
            image, mask = appearance_anomaly(images[index], other, textures, rng, config.dagm, grayscale)
        made[slot] = image
        masks.append(grid_mask(mask, space.map_grid))
    encoded = encode(space, made, desc="encode anomalies", progress=progress, normalised=True)
    shape = (len(images), per_image)
    return (encoded.apply(lambda part: part.view(*shape, *part.shape[1:])),
            torch.stack(masks).view(*shape, 1, space.map_grid, space.map_grid).to(encoded.z.device), len(by_pixels))


def refinement_inputs(batch: SyntheticBatch, normal_guide: torch.Tensor, appearance_guide: torch.Tensor,
                      diffusion_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(guide, loss weight) per sample for the refinement: an appearance sample's own guide, the clean
    image's for everything else (diffusion content exists only in z)."""
    guide = torch.where(batch.from_(Provenance.APPEARANCE).view(-1, 1, 1, 1), appearance_guide, normal_guide)
    weight = torch.where(batch.from_(Provenance.DIFFUSION), diffusion_weight, 1.0)
    return guide, weight


@dataclass
class TrainingParts:
    """Everything whose state a resumed run must get back exactly."""

    denoiser: torch.nn.Module
    ddm: torch.nn.Module  # the discriminative head and its refinement
    ema: torch.nn.Module
    optimiser: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    dagm: DAGM
    rng: np.random.Generator
    generator: torch.Generator
    history: TrainingLog

    def state(self, step: int, ranks: Ranks) -> dict:
        """The weights (the same on every rank) and every rank's random state, on every rank."""
        draws = {"rng": self.rng.bit_generator.state, "generator": self.generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        return {
            "step": step,
            "denoiser": self.denoiser.state_dict(), "ddm": self.ddm.state_dict(), "ema": self.ema.state_dict(),
            "optimiser": self.optimiser.state_dict(), "schedule": self.schedule.state_dict(), "tau": self.dagm.tau,
            "draws": ranks.gather_objects(draws), "history": self.history.to_dict(),
        }

    def restore(self, state: dict, ranks: Ranks) -> int:
        """Load a saved state; returns the step to continue from."""
        if len(state["draws"]) != ranks.world:
            raise HDMInputError(f"this training state was made by {len(state['draws'])} worker(s): resume it with "
                                f"as many, not {ranks.world}")
        self.denoiser.load_state_dict(state["denoiser"])
        self.ddm.load_state_dict(state["ddm"])
        self.ema.load_state_dict(state["ema"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.dagm.tau = state["tau"]
        draws = state["draws"][ranks.rank]
        self.rng.bit_generator.state = draws["rng"]
        self.generator.set_state(draws["generator"])
        torch.set_rng_state(draws["torch_rng"])
        random.setstate(draws["python_rng"])
        self.history = TrainingLog(**state["history"])
        return int(state["step"])


def fit(config: HDMConfig, paths: list[Path], progress: bool = True, log: Callable[[str], None] = print,
        checkpoint: Callable[[dict], None] | None = None, resume_from: dict | None = None,
        device: torch.device = torch.device("cpu"), precision: str = "fp32",
        pixels: "PixelGenerator | None" = None) -> tuple[HDM, TrainingLog]:
    """Train HDM on normal images only, on `device` (the returned model stays there), its networks'
    forward passes in `precision` (see `_device.place`). Under torch.distributed every rank calls this
    with the same `paths` and trains on its shard of them; each step sees `train.batch_size` samples
    in all.

    Every `train.checkpoint_every` steps, `checkpoint` (on every rank) gets the full training state
    (weights, EMA, optimiser, schedule, tau, every rank's RNGs and the log); `resume_from` (such a
    state) continues from it and ends with the same model as an uninterrupted run. `pixels`: the
    run's pixel generator, for the share of DAGM's appearance anomalies it makes (`dagm.pixel_share`).
    """
    config.validate()
    ranks = Ranks.current()
    ranks.need(len(paths), "training images", "use fewer workers")
    seed_everything(config.train.seed)  # the same initial weights on every rank
    rng = np.random.default_rng(ranks.seed(config.train.seed))
    generator = torch.Generator().manual_seed(ranks.seed(config.train.seed))
    started = time.perf_counter()

    images = load_images_resized(ranks.shard(paths), config.space.image_size)
    model = place(HDM(config), device, precision)
    device = device_of(model)
    space = model.space
    raw = encode(space, images, desc="encode normal", progress=progress)
    space.fit_statistics(raw, ranks)
    normal = space.normalise_(raw)
    appearance, app_mask, by_pixels = build_appearance_pool(space, images, config, rng, progress, pixels)
    if model.density is not None:
        # drawn once from every rank's cells, in the one-process order, then sent to every rank
        cells = ranks.gather_rows(normal.z, to=0)
        if ranks.main:
            model.density.fit(cells, torch.Generator().manual_seed(config.train.seed))
        del cells
        ranks.broadcast_(list(model.density.buffers()))
    where = f" on each of {ranks.world} workers" if ranks.world > 1 else ""
    made = f" ({by_pixels} by the pixel generator)" if pixels is not None else ""
    log(f"cached {len(images)} normal images and {app_mask.shape[0] * app_mask.shape[1]} appearance anomalies"
        f"{made}{where} ({time.perf_counter() - started:.0f}s)")

    denoiser, ddm, diffusion = model.denoiser, model.ddm, model.diffusion
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    params = list(denoiser.parameters()) + list(ddm.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=1e-4)
    schedule = one_cycle(optimiser, config.train.lr, config.train.steps)
    parts = TrainingParts(denoiser, ddm, ema, optimiser, schedule,
                          DAGM(config.dagm, diffusion, space.grid, space.map_grid), rng, generator, TrainingLog())
    first = 0
    if resume_from is not None:
        first = parts.restore(resume_from, ranks)
        log(f"resuming at step {first} of {config.train.steps}")
    dagm, history = parts.dagm, parts.history
    previous_seconds = history.seconds
    denoiser.train()
    ddm.train()

    steps = config.train.steps
    batch_size = -(-config.train.batch_size // ranks.world)
    statistics = running_statistics(ddm) + running_statistics(denoiser)  # the same tensors all along
    steps_bar = bar(range(first, steps), desc="train", enabled=progress, initial=first, total=steps)
    for step in steps_bar:
        index = torch.from_numpy(rng.integers(len(images), size=batch_size))
        pick = torch.from_numpy(rng.integers(app_mask.shape[1], size=batch_size))
        clean, made = normal.apply(lambda x: x[index]), appearance.apply(lambda x: x[index, pick])
        am = app_mask[index, pick]
        if config.train.augment_flip and rng.random() < 0.5:
            clean, made, am = clean.apply(mirror), made.apply(mirror), mirror(am)
        z0, az = clean.z, made.z

        with autocast(device, precision):
            # POM, generation side: the hybrid objective on normal samples only.
            t = torch.randint(0, diffusion.num_timesteps, (batch_size,), generator=generator).to(device)
            noise = torch.randn(z0.shape, generator=generator).to(device)
            zt = diffusion.q_sample(z0, t, noise)
            eps, v = denoiser(zt, t)
            l_simple, l_vlb = hybrid_loss(diffusion, z0, zt, t, noise, eps, v, config.pom.lambda_vlb)

            # DAGM, then POM's quality control of the synthetic samples.
            batch = dagm.make_batch(z0, az, am, ema, step / steps, rng, generator)
            synthetic = batch.label > 0
            from_diffusion = batch.from_(Provenance.DIFFUSION)
            small = large = drop = torch.zeros_like(synthetic)
            if config.pom.filtering and synthetic.any():
                keep, small, large = filter_samples(masked_change(batch.z, z0, batch.z_mask()),
                                                    config.pom.change_low, config.pom.change_high)
                drop = synthetic & ~keep
                batch.revert(drop, z0)
            # over every rank's samples, so tau stays the same on all of them
            counts = ranks.total([(small & from_diffusion).sum(), (large & from_diffusion).sum(),
                                  from_diffusion.sum(), drop.sum(), synthetic.sum()])
            if config.pom.filtering:
                dagm.tau = adapt_tau(dagm.tau, *(int(c) for c in counts[:3]), config.pom)
            history.rejected += int(counts[3])
            history.synthetic += int(counts[4])

            # DDM on the mixed batch, with the EMA denoiser the model will use at inference.
            with torch.no_grad():
                z0_hat = ddm.denoise(batch.z, ema, model.noise.expand_as(batch.z))
            logits = ddm.head(batch.z, z0_hat)
            losses = map_losses(logits, batch.z_mask(), batch.label, config.pom, config.ddm.top_k)
            if ddm.refinement is not None:
                guide, weight = refinement_inputs(batch, clean.guide, made.guide, config.pom.refine_diffusion_weight)
                losses.update(refinement_losses(*ddm.refinement.residual(logits, guide), batch.mask, weight, config.pom))
            total = l_simple + l_vlb + sum(losses.values())

        optimiser.zero_grad(set_to_none=True)
        total.backward()
        ranks.average_gradients(params, statistics)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        update_ema(ema, denoiser, step, config.train.ema_decay)

        row = {"simple": l_simple, "vlb": l_vlb, **losses}
        row = dict(zip(row, (v / ranks.world for v in ranks.total([v.item() for v in row.values()]))))
        history.losses.append(row)
        history.tau.append(dagm.tau)
        if step % 25 == 0:  # shown at the next redraw: refreshing now would add a line to a log file
            steps_bar.set_postfix(simple=f"{row['simple']:.3f}", focal=f"{row['focal']:.4f}", tau=f"{dagm.tau:.2f}",
                                  refresh=False)
        if checkpoint is not None and (step + 1) % config.train.checkpoint_every == 0 and step + 1 < steps:
            history.seconds = previous_seconds + time.perf_counter() - started
            checkpoint(parts.state(step + 1, ranks))

    model.denoiser.load_state_dict(ema.state_dict())
    model.eval()
    history.seconds = previous_seconds + time.perf_counter() - started
    return model, history
