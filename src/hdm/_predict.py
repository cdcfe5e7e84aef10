"""Writing predictions: overlays, binary masks, raw maps and scores.csv, mirroring input folders."""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ._data import HDMInputError, Sample, list_images
from ._inference import Prediction, predict_samples
from ._model import HDM
from ._store import write_bytes_atomic, write_npy, write_png

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
    # Images that differ only by extension (a.png, a.jpg) keep it in their output names.
    counts = Counter(t.relative for t in targets)
    targets = [Target(t.source, t.relative.with_name(t.source.name)) if counts[t.relative] > 1 else t for t in targets]
    seen: dict[Path, Path] = {}
    for target in targets:
        if target.relative in seen:
            raise HDMInputError(f"{target.source}: its outputs would overwrite those of {seen[target.relative]}")
        seen[target.relative] = target.source
    return targets


SCORE_COLUMNS = ["path", "score", "probability", "decision", "defect_pixels", "height", "width"]


def write_outputs(prediction: Prediction, target: Target, out: Path, save_maps: bool, pixel_threshold: float) -> dict:
    """Overlay (at the decoded size), binary mask and raw map (at the image's own size), and the scores row."""
    values = resize_map(prediction.map, prediction.shape)
    mask = values >= pixel_threshold
    image = prediction.image
    shown = values if image.shape[:2] == prediction.shape else resize_map(prediction.map, image.shape[:2])
    overlay = (0.5 * image.astype(np.float32) + 0.5 * colourise(shown).astype(np.float32)).astype(np.uint8)
    stem = out / target.relative
    write_png(stem.with_name(stem.name + "_overlay.png"), overlay)
    write_png(stem.with_name(stem.name + "_mask.png"), mask.astype(np.uint8) * 255)
    if save_maps:
        write_npy(stem.with_name(stem.name + ".npy"), values)
    return {"path": str(target.source), "score": f"{prediction.score:.6f}",
            "probability": f"{prediction.probability:.6f}", "decision": "defect" if prediction.decision else "ok",
            "defect_pixels": int(mask.sum()), "height": prediction.shape[0], "width": prediction.shape[1]}


def predict_paths(model: HDM, paths: list[Path], out: Path, save_maps: bool = False, batch_size: int = 16,
                  progress: bool = True) -> tuple[list[dict], list[str]]:
    """Predict every image under `paths` with a calibrated model (an `HDM` or an `OnnxDetector`);
    returns (rows of scores.csv, errors of unreadable files)."""
    pixel_threshold = model.pixel_threshold
    targets = resolve_targets(paths)
    samples = [Sample(t.source, 0) for t in targets]
    rows, errors = [], []
    predictions = predict_samples(model, samples, batch_size, progress, keep_images=True, calibrated=True)
    for prediction, target in zip(predictions, targets):
        if prediction.error:
            errors.append(prediction.error)
            continue
        rows.append(write_outputs(prediction, target, out, save_maps, pixel_threshold))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SCORE_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(out / "scores.csv", buffer.getvalue().encode())
    return rows, errors
