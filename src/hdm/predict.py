"""Writing predictions: overlays, binary masks, raw maps and scores.csv, mirroring input folders."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .data import HDMInputError, Sample, list_images
from .inference import Prediction, predict_samples
from .model import HDM
from .store import write_bytes_atomic, write_npy, write_png

# Control points of a blue-cyan-yellow-red ramp for heatmaps.
_RAMP = np.array([[0, 0, 128], [0, 96, 255], [0, 224, 255], [255, 255, 0], [255, 96, 0], [200, 0, 0]], np.float32)


def colourise(values: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] -> H x W x 3 uint8 heatmap."""
    x = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    stops = np.arange(len(_RAMP))
    return np.stack([np.interp(x, stops, _RAMP[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def resize_map(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Model-size map -> the image's own (H, W), bilinear."""
    if values.shape == shape:
        return values.astype(np.float32)
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize((shape[1], shape[0]), Image.BILINEAR))


@dataclass(frozen=True)
class Target:
    source: Path
    relative: Path  # output name below the output folder, without suffix


def resolve_targets(paths: list[Path]) -> list[Target]:
    """Expand files and folders; folders keep their inner structure (and their own name if several)."""
    targets = []
    for path in paths:
        if path.is_dir():
            prefix = Path(path.resolve().name) if len(paths) > 1 else Path()
            targets += [Target(p, prefix / p.relative_to(path).with_suffix("")) for p in list_images(path)]
        elif path.exists():
            targets.append(Target(path, Path(path.stem)))
        else:
            raise HDMInputError(f"{path}: no such file or folder")
    if not targets:
        raise HDMInputError(f"{', '.join(map(str, paths))}: no images found")
    seen: dict[Path, Path] = {}
    for target in targets:
        if target.relative in seen:
            raise HDMInputError(f"{target.source}: its outputs would overwrite those of {seen[target.relative]}")
        seen[target.relative] = target.source
    return targets


def write_outputs(prediction: Prediction, target: Target, out: Path, save_maps: bool, threshold: float) -> dict:
    image = prediction.image
    values = resize_map(prediction.map, prediction.shape)
    overlay = (0.5 * image.astype(np.float32) + 0.5 * colourise(values).astype(np.float32)).astype(np.uint8)
    stem = out / target.relative
    write_png(stem.with_name(stem.name + "_overlay.png"), overlay)
    write_png(stem.with_name(stem.name + "_mask.png"), ((values >= threshold) * 255).astype(np.uint8))
    if save_maps:
        write_npy(stem.with_suffix(".npy"), values.astype(np.float32))
    return {"path": str(target.source), "score": f"{prediction.score:.6f}",
            "decision": "defect" if prediction.score >= threshold else "ok",
            "height": prediction.shape[0], "width": prediction.shape[1]}


def predict_paths(model: HDM, paths: list[Path], out: Path, save_maps: bool = False, batch_size: int = 16,
                  threshold: float = 0.5, progress: bool = True) -> tuple[list[dict], list[str]]:
    """Predict every image under `paths`; returns (rows of scores.csv, errors of unreadable files)."""
    targets = resolve_targets(paths)
    samples = [Sample(t.source, 0) for t in targets]
    rows, errors = [], []
    for prediction, target in zip(predict_samples(model, samples, batch_size, progress, keep_images=True), targets):
        if prediction.error:
            errors.append(prediction.error)
            continue
        rows.append(write_outputs(prediction, target, out, save_maps, threshold))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "score", "decision", "height", "width"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / "scores.csv", buffer.getvalue().encode())
    return rows, errors

