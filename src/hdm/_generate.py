"""`hdm generate`: a run's pixel generator writes a defect set in the MVTec AD layout.

OUT/test/generated/NNNN.png and OUT/ground_truth/generated/NNNN_mask.png (the exact masks), with
`--with-normals` the normals they started from in OUT/test/good, OUT/generated.csv (where each
sample came from, its tau and change) and OUT/contact_sheet.png (source | mask | result rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._data import HDMInputError, decode_image, list_images, load_images_resized, load_mask, resize_image, resize_mask
from ._device import place
from ._generator import Defect, PixelGenerator, make_defects
from ._layouts import DataSource, mask_index
from ._predict import csv_bytes
from ._runs import GENERATOR_FILE, split_data
from ._store import load_generator, write_bytes_atomic, write_png

SHEET_ROWS = 12  # samples shown on the contact sheet
SHEET_TILE = 160


def read_masks(mask_dir: Path, paths: list[Path], size: int) -> np.ndarray:
    """One mask per image, matched by name (<stem>.png or <stem>_mask.png), nearest-resized to size x size."""
    if not mask_dir.is_dir():
        raise HDMInputError(f"{mask_dir}: not a folder")
    index = mask_index(mask_dir)
    if not index:
        raise HDMInputError(f"{mask_dir}: no mask images in the folder")
    stems = {p.stem for p in paths}
    unmatched = sorted(set(index) - stems)
    if unmatched:
        raise HDMInputError(f"{index[unmatched[0]]}: mask matches no image by name ({len(unmatched)} such masks)")
    masks = []
    for path in paths:
        if path.stem not in index:
            raise HDMInputError(f"{mask_dir}: no mask for {path.name} (name it {path.stem}.png or {path.stem}_mask.png)")
        mask = load_mask(index[path.stem], decode_image(path)[1])
        if not mask.any():
            raise HDMInputError(f"{index[path.stem]}: mask is empty (no pixel above half range)")
        small = resize_mask(mask, size)
        if not small.any():
            raise HDMInputError(f"{index[path.stem]}: mask vanishes at the generator's size {size}x{size}")
        masks.append(small)
    return np.stack(masks)


def starting_images(model: PixelGenerator, extra: dict, images_dir: Path | None) -> list[Path]:
    """The normals to start from: a folder's images, or else the ones the generator was trained on."""
    if images_dir is not None:
        paths = list_images(images_dir)
        if not paths:
            raise HDMInputError(f"{images_dir}: no images in the folder")
        return paths
    return split_data(model.config, DataSource.from_dict(extra["source"]))[0]


def contact_sheet(images: np.ndarray, defects: list[Defect], tile: int = SHEET_TILE) -> np.ndarray:
    """Rows of (source, mask, result) tiles, for a person to look at."""
    rows = []
    for defect in defects[:SHEET_ROWS]:
        mask = np.repeat(defect.mask[..., None].astype(np.uint8) * 255, 3, axis=2)
        parts = [resize_image(a, tile) for a in (images[defect.source], mask, defect.image)]
        gap = np.full((tile, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([parts[0], gap, parts[1], gap, parts[2]], axis=1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    return np.concatenate(rows[:-1], axis=0)


def generate_set(model: PixelGenerator, extra: dict, out: Path, count: int, images_dir: Path | None = None,
                 mask_dir: Path | None = None, tau: float | None = None, seed: int = 0, with_normals: bool = False,
                 overwrite: bool = False, progress: bool = True) -> tuple[list[Defect], int]:
    """Make `count` defects and write them (see the module's text); returns them and the draws rejected."""
    if count < 1:
        raise HDMInputError(f"--count {count}: give at least 1")
    if (out / "test" / "generated").exists() and not overwrite:
        raise HDMInputError(f"{out}: already holds a generated set (use --overwrite to replace it)")
    paths = starting_images(model, extra, images_dir)
    masks = read_masks(mask_dir, paths, model.image_size) if mask_dir is not None else None
    images = load_images_resized(paths, model.image_size)
    defects, rejected = make_defects(model, images, count, seed, masks, tau, progress)
    if not defects:
        raise HDMInputError(f"every draw's change fell outside POM's band [{model.config.generator.change_low}, "
                            f"{model.config.generator.change_high}]: try another --tau or other masks")
    for k, defect in enumerate(defects):
        write_png(out / "test" / "generated" / f"{k:04d}.png", defect.image)
        write_png(out / "ground_truth" / "generated" / f"{k:04d}_mask.png", defect.mask.astype(np.uint8) * 255)
    if with_normals:
        for source in sorted({d.source for d in defects}):
            write_png(out / "test" / "good" / f"{source:04d}.png", images[source])
    write_bytes_atomic(out / "generated.csv", csv_bytes({
        "image": [f"test/generated/{k:04d}.png" for k in range(len(defects))],
        "source": [str(paths[d.source]) for d in defects],
        "tau": [f"{d.tau:.4f}" for d in defects],
        "change": [f"{d.change:.5f}" for d in defects]}))
    write_png(out / "contact_sheet.png", contact_sheet(images, defects))
    return defects, rejected



def generate_run(run: Path, out: Path, count: int, images_dir: Path | None = None, mask_dir: Path | None = None,
                 tau: float | None = None, seed: int = 0, with_normals: bool = False, overwrite: bool = False,
                 device: str = "auto", progress: bool = True) -> tuple[list[Defect], int]:
    """`hdm generate`: the run's generator on `device` writes a set into `out` (see `generate_set`)."""
    if not (run / GENERATOR_FILE).exists():
        raise HDMInputError(f"{run}: no generator in this run (train one with `hdm fit-generator --run {run}`)")
    if mask_dir is not None and images_dir is None:
        raise HDMInputError("--mask-dir pairs masks with the images of --images: give both")
    if tau is not None and tau < 0:
        raise HDMInputError(f"--tau {tau}: must be >= 0")
    model, extra = load_generator(run / GENERATOR_FILE)
    place(model, device)
    return generate_set(model, extra, out, count, images_dir, mask_dir, tau, seed, with_normals, overwrite, progress)
