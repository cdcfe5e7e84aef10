"""DAGM, the Diffusion Anomaly Generation Module.

Anomalous training samples with masks, made from normal z_0 only:
- masks: thresholded Perlin noise at random scale and rotation;
- content (a): reverse diffusion from z_{t_a} with the EMA denoiser and variance (1 + tau) Sigma_theta,
  which pushes the sample off the normal manifold;
- content (b): appearance anomalies made in pixel space (another image's shuffled patches, a foreign
  texture, a stain, a local change of brightness; grey on grayscale surfaces) and encoded; the share of (a) grows as the denoiser learns;
- composite with random opacity: (a) inside the mask in z, (b) in pixels, its z taken whole with the
  change the encoder spreads beyond the mask (those cells stay normal targets); about half of each
  batch stays normal.

DAGM in pixels (`regenerate`, used by `_generator`) is the same reverse process on an image: the
masked region (by default a compact blob on the part's foreground, `defect_mask`) is noised and
regenerated at (1 + tau) Sigma_theta by a pixel diffusion model, the rest of the image held to the
input. By default the region starts as an appearance anomaly whose coarse content every step keeps (the
ILVR guide) while the reverse process redraws its detail as this surface would show it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import data as skdata

from ._config import DAGMConfig
from ._denoiser import Denoiser
from ._diffusion import GaussianDiffusion, strided_timesteps
from ._perlin import perlin_2d, perlin_mask
from ._unet import PixelUNet

_FOREIGN_TEXTURES = ("brick", "grass", "gravel", "moon", "camera")


def foreign_textures(size: int) -> list[np.ndarray]:
    """Grayscale textures shipped with scikit-image, as size x size x 3 uint8 tiles."""
    tiles = []
    for name in _FOREIGN_TEXTURES:
        image = getattr(skdata, name)()
        tile = np.asarray(torch.nn.functional.interpolate(
            torch.from_numpy(image).float()[None, None], size=(size, size), mode="area")[0, 0])
        tiles.append(np.repeat(tile.astype(np.uint8)[..., None], 3, axis=2))
    return tiles


def shuffled_patches(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """The image cut into grid x grid patches, randomly permuted and rotated: same colours, wrong structure."""
    size = image.shape[0]
    cell = size // grid
    patches = [image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] for r in range(grid) for c in range(grid)]
    order = rng.permutation(len(patches))
    out = image.copy()
    for index, source in enumerate(order):
        r, c = divmod(index, grid)
        out[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = np.rot90(patches[source], int(rng.integers(4)))
    return out


def is_grayscale(images: np.ndarray) -> bool:
    """True when every image has R = G = B: the camera sees no colour, so neither may a synthetic defect."""
    return bool((images[..., :1] == images).all())


def appearance_content(image: np.ndarray, other: np.ndarray, textures: list[np.ndarray],
                       rng: np.random.Generator, grayscale: bool = False) -> np.ndarray:
    """Pixel-space anomalous content for `image` (uint8 HxWx3), drawn from one of four families.

    Tints and stain colours are grey on a grayscale surface: random colours on a grey part are
    trivially told apart, and the head learned colour instead of defects (brain MRI, magnetic tile).
    """
    kind = int(rng.integers(4))
    size = image.shape[0]
    if kind == 0:
        content = shuffled_patches(other, rng, grid=int(rng.choice([4, 8, 16])))
    elif kind == 1:
        texture = textures[int(rng.integers(len(textures)))].astype(np.float32)
        tint = np.full(3, rng.uniform(0.4, 1.2)) if grayscale else rng.uniform(0.4, 1.2, size=3)
        content = np.clip(texture * tint, 0, 255)
    elif kind == 2:
        # Perlin blotches of one colour: stains, corrosion, discolouration.
        field = np.abs(perlin_2d((size, size), (int(rng.integers(2, 16)),) * 2, rng))[..., None]
        colour = np.full(3, rng.uniform(0, 255)) if grayscale else rng.uniform(0, 255, size=3)
        content = image.astype(np.float32) * (1 - field) + colour * field
    else:
        # A smooth local change of brightness: lesions brighter or darker than their tissue, uneven
        # surfaces, shadows. Nothing else of the image changes, so only its intensity can give it away.
        field = np.abs(perlin_2d((size, size), (int(rng.integers(1, 8)),) * 2, rng))[..., None]
        gain = np.exp(rng.uniform(-1.0, 1.0) * rng.choice([-1.0, 1.0]))
        content = image.astype(np.float32) * (1 + (gain - 1) * np.clip(2 * field, 0, 1))
    return np.asarray(np.clip(content, 0, 255), dtype=np.uint8)


def appearance_anomaly(image: np.ndarray, other: np.ndarray, textures: list[np.ndarray],
                       rng: np.random.Generator, config: DAGMConfig, grayscale: bool = False,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous image, boolean pixel mask) with the content blended in at a random opacity, inside
    `mask` or else a Perlin mask over the whole image."""
    if mask is None:
        mask = perlin_mask(image.shape[0], rng, threshold=config.perlin_threshold)
    content = appearance_content(image, other, textures, rng, grayscale).astype(np.float32)
    opacity = rng.uniform(*config.opacity)
    weight = (mask.astype(np.float32) * opacity)[..., None]
    out = image.astype(np.float32) * (1 - weight) + content * weight
    return np.clip(out, 0, 255).astype(np.uint8), mask


def coverage(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """B x 1 x h x w (soft) masks -> B x 1 x grid x grid: the covered fraction of each grid cell."""
    return F.adaptive_avg_pool2d(masks, grid)


def grid_mask(mask: np.ndarray | torch.Tensor, grid: int) -> torch.Tensor:
    """Pixel mask -> soft 1 x grid x grid mask: the covered fraction of each grid cell."""
    return coverage(torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None], grid)[0]


class Provenance(IntEnum):
    """Where a sample's content came from; it decides which guide the refinement sees."""

    NORMAL = 0
    DIFFUSION = 1  # made in z: the image, and so its guide, stay normal
    APPEARANCE = 2  # made in pixels and encoded: its own guide


@dataclass
class SyntheticBatch:
    z: torch.Tensor  # B x C x g x g, anomalous where label is 1
    mask: torch.Tensor  # B x 1 x m x m soft target on the map's (stride-4) grid
    label: torch.Tensor  # B
    source: torch.Tensor  # B, `Provenance` values

    def z_mask(self) -> torch.Tensor:
        """The mask on the z grid: the covered fraction of each z cell."""
        return coverage(self.mask, self.z.shape[-1])

    def revert(self, drop: torch.Tensor, z0: torch.Tensor) -> None:
        """Make the samples where `drop` is set normal again, provenance included, so that nothing of
        their synthetic content reaches any loss."""
        self.z[drop], self.mask[drop], self.label[drop] = z0[drop], 0.0, 0.0
        self.source[drop] = Provenance.NORMAL

    def from_(self, provenance: Provenance) -> torch.Tensor:
        return self.source == provenance


class DAGM:
    """Builds mixed normal/anomalous batches in z space."""

    def __init__(self, config: DAGMConfig, diffusion: GaussianDiffusion, grid: int, mask_grid: int):
        """`grid`: side of z; `mask_grid`: side of the map the masks are targets for (the space's
        `map_grid`, a multiple of it)."""
        self.config = config
        self.grid = grid
        self.mask_grid = mask_grid
        self.tau = config.tau
        steps = strided_timesteps(config.t_a, config.reverse_steps)
        self.reverse = diffusion.respaced(steps)

    def diffusion_share(self, progress: float) -> float:
        """Share of diffusion-made content: zero while the denoiser is young, then p_diffusion_max."""
        warm = self.config.warmup_fraction
        if warm <= 0:
            return self.config.p_diffusion_max
        return self.config.p_diffusion_max * min(1.0, max(0.0, (progress - warm / 2) / (warm / 2)))

    @torch.no_grad()
    def diffusion_content(self, z0: torch.Tensor, denoiser: Denoiser, generator: torch.Generator) -> torch.Tensor:
        """Noise z_0 to t_a, then reverse with variance (1 + tau) Sigma_theta down to z_0'."""
        process, device = self.reverse, z0.device
        t = torch.full((z0.shape[0],), process.num_timesteps - 1, dtype=torch.long, device=device)
        z = process.q_sample(z0, t, torch.randn(z0.shape, generator=generator).to(device))

        def step(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps, v = denoiser(z, process.timestep_map[t])
            return process.p_sample(eps, v, z, t, torch.randn(z0.shape, generator=generator).to(device), tau=self.tau)

        return process.reverse(z, step)

    def perlin_grid_masks(self, count: int, rng: np.random.Generator) -> torch.Tensor:
        # Drawn at 4x the z grid so the soft cell coverage has some resolution.
        return torch.stack([grid_mask(perlin_mask(self.grid * 4, rng, self.config.perlin_threshold), self.mask_grid)
                            for _ in range(count)])

    def make_batch(self, z0: torch.Tensor, appearance_z: torch.Tensor, appearance_mask: torch.Tensor,
                   denoiser: Denoiser, progress: float, rng: np.random.Generator,
                   generator: torch.Generator) -> SyntheticBatch:
        """z0: B normal samples; appearance_*: B pre-encoded appearance anomalies paired with them (all on
        one device; the random draws come from the CPU generators)."""
        batch, device = z0.shape[0], z0.device
        anomalous = torch.from_numpy(rng.random(batch) < self.config.p_anomaly)
        use_diffusion = anomalous & torch.from_numpy(rng.random(batch) < self.diffusion_share(progress))
        use_appearance = anomalous & ~use_diffusion
        z = z0.clone()
        mask = torch.zeros(batch, 1, self.mask_grid, self.mask_grid, device=device)
        source = torch.full((batch,), int(Provenance.NORMAL), dtype=torch.long, device=device)
        opacity = torch.from_numpy(rng.uniform(*self.config.opacity, size=batch)).float().view(-1, 1, 1, 1).to(device)
        if use_diffusion.any():
            index = use_diffusion.nonzero().flatten()
            content = self.diffusion_content(z0[index], denoiser, generator)
            m = self.perlin_grid_masks(len(index), rng).to(device)
            z[index] = z0[index] + opacity[index] * coverage(m, self.grid) * (content - z0[index])
            mask[index] = m
            source[index] = Provenance.DIFFUSION
        if use_appearance.any():
            index = use_appearance.nonzero().flatten()
            # Opacity was applied in pixel space; `appearance_spread` says why z outside the mask is kept.
            m = appearance_mask[index]
            z[index] = appearance_z[index] if self.config.appearance_spread else torch.where(
                coverage(m, self.grid) > 0, appearance_z[index], z0[index])
            mask[index] = m
            source[index] = Provenance.APPEARANCE
        label = (mask.flatten(1).amax(1) > 0).float()
        return SyntheticBatch(z, mask, label, source)


def backdrop(image: np.ndarray, distance: float) -> tuple[np.ndarray, float]:
    """(H x W x 3, float): the backdrop's colour at every pixel, a quadratic in the position fitted to the
    image's border (refitted once without the border pixels farther than `distance` from the first fit: a
    part that touches the border), and the border's median distance from it. A lit backdrop is brighter on one
    side: one colour for it marked that side as part."""
    size_r, size_c = image.shape[:2]
    rows, cols = np.mgrid[:size_r, :size_c]
    r, c = rows / size_r - 0.5, cols / size_c - 0.5
    terms = np.stack([np.ones_like(r), r, c, r * r, r * c, c * c], axis=-1)
    edge = np.zeros((size_r, size_c), dtype=bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    colours, basis = image[edge].astype(np.float64), terms[edge]
    keep = np.ones(len(colours), dtype=bool)
    for _ in range(2):
        fit = np.linalg.lstsq(basis[keep], colours[keep], rcond=None)[0]
        off = np.linalg.norm(basis @ fit - colours, axis=-1)
        keep = off <= distance
        if keep.sum() < basis.shape[1]:
            break
    return terms @ fit, float(np.median(off))


def foreground(image: np.ndarray, distance: float = 40.0) -> np.ndarray:
    """Where the object lies: pixels whose colour is farther than `distance` (0-255 RGB) from the
    `backdrop` there, opened to drop specks (a plate on a backdrop, a brain slice on black). The whole
    image where the border is no smooth backdrop (its median pixel farther than distance / 8 from the fit:
    a textured surface that fills the frame) or under 5% differs from it."""
    colour, rough = backdrop(image, distance)
    if rough > distance / 8:
        return np.ones(image.shape[:2], dtype=bool)
    far = np.linalg.norm(image.astype(np.float64) - colour, axis=-1) > distance
    far = ndimage.binary_opening(far, structure=np.ones((3, 3), bool), iterations=2)
    return far if far.mean() > 0.05 else np.ones_like(far)


def blob(side: int, rng: np.random.Generator) -> np.ndarray:
    """One compact region inside a side x side square: an ellipse of random aspect (round to streak-like) and
    angle whose rim Perlin noise makes irregular, kept to its largest piece with its holes filled."""
    v, u = (np.mgrid[:side, :side] + 0.5) / side * 2 - 1
    angle, aspect = rng.uniform(0, np.pi), np.exp(rng.uniform(0.0, 1.5))
    along, across = u * np.cos(angle) + v * np.sin(angle), v * np.cos(angle) - u * np.sin(angle)
    radius = along ** 2 + (aspect * across) ** 2  # 1 on an ellipse whose long semi-axis spans half the square
    # The rim lies where radius = 0.5 + noise <= 0.9: inside the square.
    field = 1 - radius + rng.uniform(0.15, 0.4) * perlin_2d((side, side), (int(rng.choice([2, 4])),) * 2, rng)
    region, count = ndimage.label(field > 0.5)
    if count == 0:
        return radius < 0.5
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(field), region, range(1, count + 1))))
    return ndimage.binary_fill_holes(region == largest)


def defect_mask(image: np.ndarray, window: int, rng: np.random.Generator, attempts: int = 8) -> np.ndarray:
    """A `blob` in a square whose side is log-uniform from a quarter of `window` to all of it, centred on a
    random pixel of the image's foreground and kept to it. Real defects are single regions on the part,
    from specks to a tenth of the image (MVTec AD's masks span that range): the thresholded Perlin blobs
    used before were clusters of specks, a tenth of the real defects' area or less (bench/realism.py), and
    masks over the backdrop were regenerated as blots in the air (contact sheets, bench/realism.py)."""
    size = image.shape[0]
    inside = foreground(image)
    rows, cols = np.nonzero(inside)
    mask = np.zeros_like(inside)
    for _ in range(attempts):
        side = max(8, int(round(np.exp(rng.uniform(np.log(window / 4), np.log(window))))))
        shape = blob(side, rng)
        pick = int(rng.integers(len(rows)))
        centre_row, centre_col = (int(c.mean()) for c in np.nonzero(shape))
        # The blob's centre on the picked pixel, drawn on a canvas padded by `side` so it may overhang.
        canvas = np.zeros((size + 2 * side, size + 2 * side), dtype=bool)
        top, left = rows[pick] - centre_row + side, cols[pick] - centre_col + side
        canvas[top:top + side, left:left + side] = shape
        mask = canvas[side:side + size, side:side + size] & inside
        if mask.sum() >= 16:
            break
    return mask if mask.any() else inside


def crop_box(mask: np.ndarray, multiple: int, margin: int) -> tuple[slice, slice]:
    """The part of the image regenerated for `mask`: its bounding box widened by `margin` pixels of
    context on each side, each side rounded up to a multiple of `multiple` (the UNet's stride) and
    moved inside the image."""
    def span(covered: np.ndarray) -> slice:
        size = len(covered)
        where = np.flatnonzero(covered)
        start, stop = max(0, int(where[0]) - margin), min(size, int(where[-1]) + 1 + margin)
        length = min(size - size % multiple, -(-(stop - start) // multiple) * multiple)
        start = min(start, size - length)
        return slice(start, start + length)

    return span(mask.any(axis=1)), span(mask.any(axis=0))


def low_pass(x: torch.Tensor, factor: int) -> torch.Tensor:
    """x's content coarser than `factor` pixels: the mean of each factor x factor cell, spread bilinearly."""
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)


@torch.no_grad()
def regenerate(x0: torch.Tensor, mask: torch.Tensor, net: PixelUNet, process: GaussianDiffusion, tau: float,
               generator: torch.Generator, inflate_from: int = 0, guide: int = 0) -> torch.Tensor:
    """Noise x_0 (B x 3 x h x w in [-1, 1]) to the last step of `process`, then run the reverse process
    with variance (1 + tau) Sigma_theta on the steps at original timesteps >= `inflate_from`, Sigma_theta
    below. Outside `mask` (B x 1 x h x w, 1 = regenerate) every step takes x_0 noised to that step's
    level, so the new content is made to join its surroundings, and the last step returns x_0 there.
    With `guide` > 1 (h and w multiples of it), inside the mask too each step keeps x_0's noised content
    coarser than `guide` pixels and draws only the finer detail (ILVR, Choi et al. 2021): the result has
    x_0's shapes and shading in the surface's own texture."""
    device = x0.device

    def draw() -> torch.Tensor:
        return torch.randn(x0.shape, generator=generator).to(device)

    last = torch.full((x0.shape[0],), process.num_timesteps - 1, dtype=torch.long, device=device)
    x = process.q_sample(x0, last, draw())

    def step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps, v = net(x, process.timestep_map[t])
        inflation = tau if int(process.timestep_map[t[0]]) >= inflate_from else 0.0
        made = process.p_sample(eps, v, x, t, draw(), tau=inflation)
        known = process.q_sample(x0, t - 1, draw()) if int(t[0]) > 0 else x0
        if guide > 1:
            made = made - low_pass(made, guide) + low_pass(known, guide)
        return mask * made + (1 - mask) * known

    return process.reverse(x, step)
