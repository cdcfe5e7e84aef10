"""Configuration: one dataclass per concern, serialised with the checkpoint as plain dicts."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SpaceConfig:
    """Where the diffusion runs: the frozen encoder and the image size it sees."""

    kind: str = "feature"
    backbone: str = "lite0"  # lite0 | lite1 | lite2
    image_size: int = 256
    # 3x3 local averaging of the features, as in patch-based detectors: each z cell then
    # describes its neighbourhood, which makes small defects visible to a 1x1 head.
    local_pool: int = 3
    # kind = "pixel": z is the image; its denoiser and DDM's head are UNets of these widths (first width,
    # then x mults per level). Sized to train at 128 px on a CPU in about an hour.
    unet_width: int = 32
    unet_mults: tuple[int, int, int, int] = (1, 2, 2, 4)


@dataclass
class DiffusionConfig:
    """The Gaussian diffusion on z (Improved-DDPM style, learned variance)."""

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    width: int = 96  # denoiser width
    depth: int = 3  # residual blocks in the denoiser


@dataclass
class DAGMConfig:
    """Diffusion Anomaly Generation Module."""

    p_anomaly: float = 0.5  # fraction of each batch made anomalous
    tau: float = 1.0  # initial variance inflation; POM adapts it
    t_a: int = 400  # how far z_0 is noised before the anomalous reverse run
    reverse_steps: int = 4  # strided reverse steps from t_a to 0
    p_diffusion_max: float = 0.5  # share of diffusion-made content once the denoiser has learned
    warmup_fraction: float = 0.3  # the share ramps up over this fraction of training
    opacity: tuple[float, float] = (0.5, 1.0)
    perlin_threshold: float = 0.5
    appearance_per_image: int = 2  # pixel-space anomalies encoded per training image ...
    appearance_pool_max: int = 1024  # ... fewer (at least one) where that would exceed this many
    # Keep the change the encoder's receptive field spreads from an appearance anomaly into cells
    # outside its mask. Real defects spread the same way and those cells are normal targets, so the
    # head learns to keep its map inside the defect; cutting z back to the mask taught it that any
    # change is a defect, which left a halo around real ones (bench/results/accuracy.md ablation).
    appearance_spread: bool = True
    # Share of the appearance anomalies made by the run's pixel generator (DAGM in pixels, `hdm
    # fit-generator`, which must be in the run first) instead of pasted content.
    pixel_share: float = 0.0


@dataclass
class DDMConfig:
    """Diffusion Discriminative Module."""

    mode: str = "one_step"  # one_step | norm_guided | k_step
    t_s: int = 150  # noise level the input is diffused to before denoising
    k_steps: int = 3
    head_width: int = 64
    # Refine the head's stride-8 logits on the stride-4 grid with the encoder's stride-4 features:
    # a z cell spans 8 px and its features a wider field, so on its own the map blurs defect edges
    # and spills onto the normal surface beside them (bench/results/accuracy.md ablation).
    refine: bool = True
    refine_width: int = 32
    smooth_sigma: float = 4.0  # Gaussian smoothing of the map, in pixels at model size
    top_k: float = 0.01  # image score = mean of the top fraction of map values (0 = max)


@dataclass
class POMConfig:
    """Probability Optimization Module: losses and synthetic-sample control."""

    lambda_vlb: float = 0.001
    focal_gamma: float = 2.0
    focal_alpha: float = 0.75
    lambda_l1: float = 1.0
    lambda_image: float = 0.5
    # A z cell counts as fully defective once the synthetic mask covers this fraction of it: the
    # encoder's receptive field spans far more than one cell, so a defect in a corner of a cell
    # already changes all of its z. Targets equal to the covered fraction taught the head to
    # answer weakly on small defects, which then sank among normal cells (bench/results/accuracy.md).
    full_cell_coverage: float = 0.25
    # Band for the mean squared masked change of a synthetic sample (z is unit-variance).
    change_low: float = 0.25
    change_high: float = 6.0
    tau_min: float = 0.0
    tau_max: float = 8.0
    tau_rate: float = 0.05
    filtering: bool = True
    adapt_tau: bool = True
    # Weight of diffusion-made samples in the refinement's losses. Their content exists only in z,
    # so the refinement sees the clean image's stride-4 features inside their mask: they teach it to
    # keep the head's verdict where those features show nothing (without them it cut real defects
    # short on bottle), but at full weight they blunt the edges the appearance samples teach.
    refine_diffusion_weight: float = 0.5
    # Squared penalty on the refinement's residual where it raises a cell whose target is normal.
    # The focal loss gives confidently normal cells almost no gradient, so without it the
    # refinement lifted the normal surface of unseen bottles, unevenly, and faint contamination
    # sank among it (bench/results/accuracy.md ablation).
    lambda_refine_raise: float = 0.02
    # Normal z cells in the bank of POM's density prior (0 = no prior), which flags cells unlike any
    # normal one where the head, trained on DAGM's samples only, stays silent: brain MRI tumours and
    # the uneven surfaces of magnetic tiles look like nothing DAGM makes. A larger bank keeps rarer
    # normal patterns: 20,000 cells instead of 4,096 gain magnetic_tile 0.025 pixel AUROC and shrink
    # the draw's spread on brain_flair from 0.028 to 0.004 AUPRO (bench/results/bank.md).
    density_bank: int = 20000
    # The bank split into this many lists by k-means; each z cell is compared with the cells of its
    # density_probe nearest lists only (an inverted file): 20,000 cells in 128 lists, 4 probed, cost
    # less than a whole search of 4,096 (bench/results/bank-lists.md, bank.md). 0 = compare with the
    # whole bank, as the exported graph always does. Both are capped by the bank's size.
    density_lists: int = 128
    density_probe: int = 4
    # The prior may be asked about density_pool x density_pool means of z cells instead (2: a 16-pixel
    # grid, a quarter of the search): faster, but a small defect's cell is averaged with its normal
    # neighbours, which cost bottle 0.013 AUPRO (README, Results).
    density_pool: int = 1
    # The prior measures a cell's distance to each bank cell in units of that bank cell's radius (its
    # mean distance to its density_neighbours nearest bank cells) to the power density_radius_power,
    # and takes the least: normal z varies more in some places than in others (brain anatomy from
    # patient to patient), and a raw distance calls the loose places unusual. 0 = raw distance.
    density_neighbours: int = 16
    density_radius_power: float = 0.5


@dataclass
class TrainConfig:
    steps: int = 800
    batch_size: int = 16
    lr: float = 1e-3
    ema_decay: float = 0.995
    seed: int = 0
    augment_flip: bool = True
    checkpoint_every: int = 50  # steps between resumable training-state checkpoints


@dataclass
class CalibrationConfig:
    """POM, discrimination side: thresholds fitted on held-out normal images only."""

    holdout: float = 0.1  # fraction of the normal training images kept out of training
    target_fpr: float = 0.01  # false-alarm rate on normal parts, for image and pixel thresholds


@dataclass
class GeneratorConfig:
    """DAGM in pixels: a diffusion model of the normal images (`hdm fit-generator`) and how it makes
    defects (`hdm generate`). It works at the detector's size (space.image_size) and shares the
    diffusion schedule (`diffusion`), its seed (`train.seed`) and POM's tau control (`pom.tau_rate`,
    `pom.adapt_tau`; its own cap, `tau_max`)."""

    width: int = 32  # the UNet's first width; its levels have width x mults
    mults: tuple[int, int, int, int] = (1, 2, 2, 4)
    # Trained on random crops of this side (a multiple of 8; at most the image): a CPU trains a category
    # in minutes. Set it to space.image_size on a GPU to train on whole images. 32-pixel crops for 2400
    # steps, in the same time, brought brain_flair's defects closer to real ones, left bottle's level and took
    # metal_plate's and magnetic_tile's farther at two fits (bench/results/realism-crop32.md, -seed1.md).
    crop_size: int = 64
    steps: int = 800
    batch_size: int = 16
    lr: float = 5e-4
    ema_decay: float = 0.995
    checkpoint_every: int = 50
    # The generator trains on timesteps up to here, where start="normal" begins (the appearance start begins at
    # t_appearance). Training only up to 400, the default start's steps, was not closer to real defects at two
    # fits, nor with lr 1e-3 (bench/results/realism-t400-*.md): it moved the gap from surface to surface.
    t_start: int = 700
    # What the masked region holds before it is noised. "appearance": one of DAGM's appearance anomalies
    # (patches, texture, stain, brightness), noised to t_appearance only, so the reverse process redraws
    # it as this surface would show it (lit, textured and joined like the part) instead of erasing it.
    # "normal": the image itself, noised to t_start: the model trained on normal images mostly redraws
    # normal surface, and what differs is the inflated variance's noise (`git show 59c372d:bench/results/realism.md`).
    start: str = "appearance"
    t_appearance: int = 400
    sample_steps: int = 20  # strided reverse steps from the start step to 0
    # Initial variance inflation of the reverse steps; POM raises it (at pom.tau_rate) while samples come out
    # too faint for the band below, here up to tau_max only: the noise an inflated pixel step adds stays in the
    # image as grain and speckle, which took the samples farther from real defects than pasting (4.0, capped
    # at 8: bench/results/realism-tau4.md). Starting at 0.5 instead of 0 was farther still on brain_flair and
    # level on the other three (`git show 913b87e:bench/results/realism.md` against bench/results/realism.md).
    tau: float = 0.0
    tau_max: float = 1.0
    # Only the steps at or above this fraction of the start step (t_appearance or t_start) are inflated.
    # There the denoiser turns the extra noise into coarse structure (blobs, streaks); inflated late steps
    # only left per-pixel colour speckle that no later step removes (the contact sheets bench/realism.py writes).
    inflate_above: float = 0.5
    # ILVR guide: > 1 keeps the start's content coarser than this many pixels at every step and lets the
    # model draw only the finer detail (`_dagm.regenerate`); 0 regenerates the region freely. Freely, the
    # reverse process redrew most pasted regions on magnetic_tile back into the tile (423 of 490 draws too
    # small a change); guided, the defect keeps its shape and shading in the surface's own grain (with Perlin
    # masks: level with pasting or closer on all four, `git show ef885bf:bench/results/realism.md`). A guide of 2
    # brought brain_flair's defects nearer real ones, magnetic_tile's behind pasting at two fits (realism-guide2*.md).
    guide: int = 4
    # Default masks (`_dagm.defect_mask`) are single blobs on the part in a square of a quarter of this side
    # to all of it: a median 0.35-0.47 % of the image. Real defects are larger (0.6-16 %, both in
    # bench/results/realism.md), but a 160 window took magnetic_tile and brain_flair farther from them
    # (realism-window160.md), and only the mask's crop is regenerated, which keeps a sample under a second.
    mask_window: int = 80
    # Band for the mean squared change inside the mask, in the [-1, 1] pixel scale: 0.005 is about
    # 9 grey levels RMS (no visible defect below it), 0.5 about 90 (content that is no longer a surface).
    change_low: float = 0.005
    change_high: float = 0.5
    attempts: int = 8  # draws per requested sample before it is given up


# The [generator] fields that say how defects are drawn, not what the model learned: a fit or a bench draws
# from a generator trained earlier with its own values of these (`_generator.with_sampling`).
GENERATOR_SAMPLING = ("start", "t_appearance", "sample_steps", "tau", "tau_max", "inflate_above", "guide", "mask_window",
                      "change_low", "change_high", "attempts")


def unet_stride(mults: tuple[int, ...]) -> int:
    """How far a UNet with these level multipliers downsamples: sizes it sees are multiples of this."""
    return 2 ** (len(mults) - 1)


@dataclass
class HDMConfig:
    space: SpaceConfig = field(default_factory=SpaceConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    dagm: DAGMConfig = field(default_factory=DAGMConfig)
    ddm: DDMConfig = field(default_factory=DDMConfig)
    pom: POMConfig = field(default_factory=POMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HDMConfig":
        parts = {}
        for f in dataclasses.fields(cls):
            sub_cls = f.default_factory  # type: ignore[misc]
            sub = dict(data.get(f.name, {}))
            known = {g.name for g in dataclasses.fields(sub_cls)}
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"unknown {f.name} settings: {', '.join(sorted(unknown))}")
            for g in dataclasses.fields(sub_cls):
                if g.name in sub and isinstance(sub[g.name], list):
                    sub[g.name] = tuple(sub[g.name])
            parts[f.name] = sub_cls(**sub)
        return cls(**parts)

    def validate(self) -> None:
        """Stop before any work on values that cannot run."""
        from ._space import SPACES  # the space module reads this one's dataclasses

        feature, g = self.space.kind == "feature", self.generator
        checks = [
            (self.space.kind in SPACES, f"space.kind must be {' or '.join(SPACES)}"),
            (not feature or self.space.backbone in ("lite0", "lite1", "lite2"),
             "space.backbone must be lite0, lite1 or lite2"),
            (not feature or (self.space.image_size >= 64 and self.space.image_size % 32 == 0),
             "space.image_size must be a multiple of 32, at least 64"),
            (self.space.kind != "pixel" or (self.space.unet_width >= 8 and all(m >= 1 for m in self.space.unet_mults)
                                            and self.space.image_size % unet_stride(self.space.unet_mults) == 0),
             "space.unet_width must be >= 8, space.unet_mults >= 1, and space.image_size a multiple of the UNet's stride"),
            (self.ddm.mode in ("one_step", "norm_guided", "k_step"),
             "ddm.mode must be one_step, norm_guided or k_step"),
            (0 < self.ddm.t_s < self.diffusion.timesteps, "ddm.t_s must lie inside (0, timesteps)"),
            (0 < self.dagm.t_a < self.diffusion.timesteps, "dagm.t_a must lie inside (0, timesteps)"),
            (0.0 <= self.dagm.p_anomaly <= 1.0, "dagm.p_anomaly must lie in [0, 1]"),
            (self.dagm.tau >= 0.0, "dagm.tau must be >= 0"),
            (0.0 <= self.dagm.pixel_share <= 1.0, "dagm.pixel_share must lie in [0, 1]"),
            (0.0 <= self.ddm.top_k < 1.0, "ddm.top_k must lie in [0, 1)"),
            (self.train.steps > 0 and self.train.batch_size > 0, "train.steps and train.batch_size must be > 0"),
            (self.pom.change_low < self.pom.change_high, "pom.change_low must be below pom.change_high"),
            (0.0 < self.pom.full_cell_coverage <= 1.0, "pom.full_cell_coverage must lie in (0, 1]"),
            (self.pom.refine_diffusion_weight >= 0.0, "pom.refine_diffusion_weight must be >= 0"),
            (self.pom.lambda_refine_raise >= 0.0, "pom.lambda_refine_raise must be >= 0"),
            (self.pom.density_bank >= 0, "pom.density_bank must be >= 0"),
            (self.pom.density_lists >= 0, "pom.density_lists must be >= 0"),
            (self.pom.density_probe >= 1, "pom.density_probe must be >= 1"),
            (self.pom.density_neighbours >= 0, "pom.density_neighbours must be >= 0"),
            (self.pom.density_radius_power >= 0, "pom.density_radius_power must be >= 0"),
            (self.pom.density_pool >= 1 and (self.space.image_size // 8) % self.pom.density_pool == 0,
             "pom.density_pool must be >= 1 and divide the z grid (space.image_size / 8)"),
            (self.ddm.refine_width > 0, "ddm.refine_width must be > 0"),
            (self.train.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
            (0.0 < self.calibration.holdout < 1.0, "calibration.holdout must lie in (0, 1)"),
            (0.0 < self.calibration.target_fpr < 0.5, "calibration.target_fpr must lie in (0, 0.5)"),
            (g.width >= 8 and all(m >= 1 for m in g.mults), "generator.width must be >= 8 and generator.mults >= 1"),
            (g.crop_size >= 16 and g.crop_size % 8 == 0, "generator.crop_size must be a multiple of 8, at least 16"),
            (g.steps > 0 and g.batch_size > 0 and g.checkpoint_every > 0,
             "generator.steps, generator.batch_size and generator.checkpoint_every must be > 0"),
            (0 < g.t_start < self.diffusion.timesteps, "generator.t_start must lie inside (0, timesteps)"),
            (g.sample_steps >= 1 and g.attempts >= 1, "generator.sample_steps and generator.attempts must be >= 1"),
            (g.tau >= 0.0 and g.tau_max >= 0.0, "generator.tau and generator.tau_max must be >= 0"),
            (0.0 <= g.inflate_above <= 1.0, "generator.inflate_above must lie in [0, 1]"),
            (g.guide == 0 or (g.guide > 1 and unet_stride(g.mults) % g.guide == 0),
             "generator.guide must be 0 or a power of two from 2 up to the UNet's stride (2 ** (levels - 1))"),
            (g.start in ("appearance", "normal"), "generator.start must be 'appearance' or 'normal'"),
            (0 < g.t_appearance <= g.t_start, "generator.t_appearance must lie in (0, generator.t_start]"),
            (g.mask_window >= 16, "generator.mask_window must be at least 16"),
            (0.0 <= g.change_low < g.change_high, "generator.change_low must be >= 0 and below generator.change_high"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value: Any, default: Any, what: str) -> Any:
    """`value` (from TOML, or a command-line string) as the type of the field's `default`."""
    text = value.strip() if isinstance(value, str) else None
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, bool) or isinstance(value, float):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, tuple):
            items = text.split(",") if text is not None else value
            if not isinstance(items, (list, tuple)) or len(items) != len(default):
                raise ValueError
            return tuple(_coerce(item, default[0], what) for item in items)
        if isinstance(value, str):
            return value
    except (TypeError, ValueError):
        pass
    kind = (f"{len(default)} comma-separated numbers" if isinstance(default, tuple)
            else {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[type(default)])
    raise ValueError(f"{what} must be {kind}, not {value!r}")


def set_value(config: HDMConfig, key: str, value: Any, where: str) -> None:
    """Set SECTION.NAME of `config` from a typed or string `value`; one clear line naming `where` if it cannot be."""
    section, _, name = key.partition(".")
    part = getattr(config, section, None) if section in {f.name for f in dataclasses.fields(config)} else None
    if part is None or name not in {f.name for f in dataclasses.fields(part)}:
        raise ValueError(f"{where}: unknown setting {key!r} (`hdm fit --print-config` lists them all)")
    setattr(part, name, _coerce(value, getattr(part, name), f"{where}: {key}"))


def apply_assignments(config: HDMConfig, assignments: list[str]) -> HDMConfig:
    """`--set SECTION.NAME=VALUE` overrides, in order."""
    for text in assignments:
        key, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--set {text}: expected SECTION.NAME=VALUE, for example ddm.top_k=0.02")
        set_value(config, key.strip(), value, f"--set {text}")
    return config


def read_config_file(path: Path) -> HDMConfig:
    """A TOML file with one table per section (`[ddm]`, `[train]`, ...) over the defaults."""
    config = HDMConfig()
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the configuration file ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"{path}: {section!r} must be a table of settings ([{section}])")
        for name, value in values.items():
            set_value(config, f"{section}.{name}", value, str(path))
    return config


def resolve(base: HDMConfig | str | Path | None = None, values: dict[str, Any] | None = None,
            assignments: Iterable[str] = (), where: str = "settings") -> HDMConfig:
    """The configuration a run uses: the defaults, a TOML file or a copy of `base`; then single values
    {"section.name": value} (errors name `where`); then `--set` strings, in order; validated. The
    command line, the API and the bench all resolve their settings here."""
    if isinstance(base, HDMConfig):
        config = HDMConfig.from_dict(base.to_dict())
    else:
        config = HDMConfig() if base is None else read_config_file(Path(base))
    for key, value in (values or {}).items():
        set_value(config, key, value, where)
    apply_assignments(config, list(assignments))
    config.validate()
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(config: HDMConfig) -> str:
    """The configuration as a TOML file that `read_config_file` reads back to the same values."""
    lines = []
    for section, values in config.to_dict().items():
        lines += [f"[{section}]", *(f"{name} = {_toml_value(value)}" for name, value in values.items()), ""]
    return "\n".join(lines)
