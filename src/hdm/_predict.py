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


MANIFESTS = (".csv", ".parquet")


def _is_manifest(path: Path) -> bool:
    return path.suffix.lower() in MANIFESTS and path.is_file()


def read_manifest(path: Path) -> list[Target]:
    """Targets from a manifest (`hdm index`): a `path` column and an optional `output` column, the
    name below the output folder (by default the path without its suffix, relative)."""
    if path.suffix.lower() == ".parquet":
        parquet = _parquet(path)
        try:
            table = parquet.read_table(path).to_pydict()
        except Exception as exc:  # pyarrow raises its own errors for files that are not Parquet
            raise HDMInputError(f"{path}: not a readable Parquet manifest ({exc.__class__.__name__})") from None
    else:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            table = {name: [row[name] for row in rows] for name in reader.fieldnames or []}
    if "path" not in table:
        raise HDMInputError(f"{path}: a manifest needs a 'path' column")
    outputs = table.get("output") or [str(Path(p).with_suffix("")).lstrip("/") for p in table["path"]]
    return [Target(Path(p), Path(o)) for p, o in zip(table["path"], outputs)]


def write_manifest(targets: list[Target], path: Path) -> None:
    """The targets as a manifest: CSV, or Parquet for a `.parquet` name."""
    columns = {"path": [str(t.source) for t in targets], "output": [str(t.relative) for t in targets]}
    if path.suffix.lower() == ".parquet":
        import pyarrow

        buffer = pyarrow.BufferOutputStream()
        _parquet(path).write_table(pyarrow.table(columns), buffer)
        write_bytes_atomic(path, buffer.getvalue().to_pybytes())
    elif path.suffix.lower() == ".csv":
        write_bytes_atomic(path, csv_bytes(columns))
    else:
        raise HDMInputError(f"{path}: a manifest is a .csv or .parquet file")


def _parquet(path: Path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise HDMInputError(f"{path}: Parquet needs pyarrow (pip install 'hdm[ray]'), or use a .csv manifest") from None
    return pyarrow.parquet


def csv_bytes(columns: dict[str, list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(zip(*columns.values()))
    return buffer.getvalue().encode()


def resolve_targets(paths: list[Path]) -> list[Target]:
    """Expand files, folders and manifests; folders keep their inner structure (and their own name if
    several)."""
    targets = []
    for path in paths:
        if path.is_dir():
            prefix = Path(path.resolve().name) if len(paths) > 1 else Path()
            targets += [Target(p, prefix / p.relative_to(path).with_suffix("")) for p in list_images(path)]
        elif _is_manifest(path):
            targets += read_manifest(path)
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


def load_detector(path: Path, device: str = "auto", precision: str = "fp32", threads: int | None = None):
    """A run folder (or its model.pt) placed on `device` in `precision`, or an exported .onnx file run by
    onnxruntime on the CPU (on `threads` threads, if given): a calibrated model `score_targets` takes."""
    if path.suffix.lower() == ".onnx":
        from ._export import OnnxDetector

        if not path.is_file():
            raise HDMInputError(f"{path}: model file not found")
        return OnnxDetector(path, threads)
    from ._device import place
    from ._runs import MODEL_FILE
    from ._store import load_model

    checkpoint = path / MODEL_FILE if path.is_dir() else path
    if not checkpoint.is_file():
        raise HDMInputError(f"{path}: neither a run folder with {MODEL_FILE} nor a model file")
    model, _ = load_model(checkpoint)
    if not model.calibration.fitted:
        raise HDMInputError(f"{checkpoint}: the model has no calibration (it was not made by `hdm fit`)")
    return place(model, device, precision)


def score_targets(model: HDM, targets: list[Target], out: Path, save_maps: bool = False, batch_size: int = 16,
                  progress: bool = True) -> tuple[list[dict], list[tuple[str, str]]]:
    """Predict `targets` with a calibrated model (an `HDM` or an `OnnxDetector`) and write their outputs;
    returns (rows of scores.csv, (path, reason) of unreadable files)."""
    samples = [Sample(t.source, 0) for t in targets]
    rows, errors = [], []
    predictions = predict_samples(model, samples, batch_size, progress, keep_images=True, calibrated=True)
    for prediction, target in zip(predictions, targets):
        if prediction.error:
            errors.append((str(target.source), prediction.error))
        else:
            rows.append(write_outputs(prediction, target, out, save_maps, model.pixel_threshold))
    return rows, errors


def write_scores(path: Path, rows: list[dict]) -> None:
    write_bytes_atomic(path, csv_bytes({c: [row[c] for row in rows] for c in SCORE_COLUMNS}))


def predict_paths(model: HDM, paths: list[Path], out: Path, save_maps: bool = False, batch_size: int = 16,
                  progress: bool = True) -> tuple[list[dict], list[str]]:
    """Predict every image under `paths` (files, folders, manifests) with a calibrated model; returns
    (rows of scores.csv, errors of unreadable files)."""
    rows, errors = score_targets(model, resolve_targets(paths), out, save_maps, batch_size, progress)
    write_scores(out / "scores.csv", rows)
    return rows, [reason for _, reason in errors]
