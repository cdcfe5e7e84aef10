"""The Python API: fit a run, load a detector from a run or an ONNX export, predict; typed results.

It calls the same functions as the `hdm` command (`_runs`, `_inference`), so a run made here is a run
folder like any other, and the command line can test, export or resume it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch

from ._config import HDMConfig, resolve
from ._data import HDMInputError, Sample, iter_batches, list_images, resize_image, to_uint8
from ._device import device_of
from ._model import to_model_input
from ._predict import load_detector, resize_map
from ._runs import Run, data_source, fit_run, resume_run, test_run

if TYPE_CHECKING:
    from ._generator import Defect

ImageInput = Union[str, Path, np.ndarray]  # and PIL images, read through np.asarray


@dataclass(frozen=True)
class ImagePrediction:
    """One image's verdict, at the image's own size."""

    source: str  # the file, or "array N" for the N-th in-memory image of the call
    score: float  # the image's anomaly score (top-k mean of the map)
    probability: float  # calibrated: P(a normal part scores below this one)
    is_defect: bool  # score >= the calibrated image threshold
    map: np.ndarray  # H x W float32 anomaly map in [0, 1]
    mask: np.ndarray  # H x W bool: map >= the calibrated pixel threshold


@dataclass(frozen=True)
class BatchPrediction:
    """The model level: a batch of model-size images in, tensors out."""

    maps: torch.Tensor  # B x 1 x S x S in [0, 1]
    scores: torch.Tensor  # B
    probabilities: torch.Tensor  # B
    is_defect: torch.Tensor  # B bool


@dataclass(frozen=True)
class Metrics:
    """A test's figures; `to_dict` gives the keys of a run's metrics.json."""

    image_auroc: float
    pixel_auroc: float
    pixel_aupro: float
    pixel_ap: float
    image_f1max: float
    pixel_f1max: float
    image_recall_at_threshold: float | None = None
    image_fpr_at_threshold: float | None = None
    pixel_recall_at_threshold: float | None = None
    pixel_fpr_at_threshold: float | None = None
    pixel_normal_part_fpr: float | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Metrics":
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Detector:
    """A calibrated detector, whichever backend is behind it (an `HDM` in torch, or an ONNX graph)."""

    def __init__(self, model, source: Path):
        self._model = model
        self.source = source
        self.image_size: int = model.image_size
        self.pixel_threshold: float = float(model.pixel_threshold)
        self.device = device_of(model)

    def __repr__(self) -> str:
        return f"Detector({self.source}, {type(self._model).__name__}, {self.image_size}px, {self.device})"

    def predict_batch(self, images: torch.Tensor) -> BatchPrediction:
        """B x 3 x S x S floats in [0, 1] at the model's size -> maps, scores, probabilities, decisions
        (computed on the detector's device, returned on the CPU)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.image_size,) * 2:
            raise HDMInputError(f"expected a B x 3 x {self.image_size} x {self.image_size} batch, "
                                f"got {tuple(images.shape)}")
        with torch.inference_mode():
            return BatchPrediction(*(t.cpu() for t in self._model.detect(images.float().to(self.device))))

    def predict(self, images: ImageInput | Iterable[ImageInput], batch_size: int = 16) -> list[ImagePrediction]:
        """Image files, folders (every image below them), numpy arrays (H x W or H x W x 3, any of hdm's
        bit depths) or PIL images, alone or in a list. An unreadable file stops the call with one line
        naming it; use `hdm predict` to go past bad files."""
        single = isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getpixel")  # PIL images have it
        items = [images] if single else list(images)
        out, chunk = [], []
        for decoded in self._decode(items, batch_size):
            chunk.append(decoded)
            if len(chunk) == batch_size:
                out += self._verdicts(chunk)
                chunk = []
        return out + (self._verdicts(chunk) if chunk else [])

    def _verdicts(self, chunk: list) -> list[ImagePrediction]:
        batch = self.predict_batch(to_model_input(np.stack([resized for _, resized, _ in chunk])))
        verdicts = []
        for i, (source, _, shape) in enumerate(chunk):
            values = resize_map(batch.maps[i, 0].numpy(), tuple(shape))
            verdicts.append(ImagePrediction(source, float(batch.scores[i]), float(batch.probabilities[i]),
                                            bool(batch.is_defect[i]), values, values >= self.pixel_threshold))
        return verdicts

    def _decode(self, items: list, batch_size: int):
        """(source name, model-size uint8 image, the image's own (H, W)) per image, in order."""
        arrays = 0
        for item in items:
            if isinstance(item, (str, Path)):
                path = Path(item)
                paths = list_images(path) if path.is_dir() else [path]
                for batch in iter_batches([Sample(p, 0) for p in paths], self.image_size, batch_size):
                    for sample, image, shape, error in zip(batch.samples, batch.images, batch.shapes, batch.errors):
                        if error:
                            raise HDMInputError(error)
                        yield str(sample.path), image, shape
            else:
                image = _as_rgb(np.asarray(item), f"array {arrays}")
                yield f"array {arrays}", resize_image(image, self.image_size), image.shape[:2]
                arrays += 1


def _as_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or min(array.shape[:2]) < 8:
        raise HDMInputError(f"{name}: expected an H x W, H x W x 3 or H x W x 4 image of at least 8 x 8, "
                            f"got shape {array.shape}")
    array = to_uint8(array)
    return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3])


def fit(data: str | Path | None = None, category: str | None = None, *, out: str | Path,
        normal_dir: str | Path | None = None, abnormal_dir: str | Path | None = None,
        mask_dir: str | Path | None = None, normal_test_dir: str | Path | None = None,
        config: HDMConfig | str | Path | None = None, settings: dict[str, Any] | Iterable[str] | None = None,
        overwrite: bool = False, progress: bool = False, log=None, device: str = "auto",
        precision: str = "fp32") -> Run:
    """As `hdm fit`: an MVTec-like or VisA root with `category`, a plain folder of normal images, or
    generic folders; `config` (a TOML file or an `HDMConfig`) and `settings` as `--config` and `--set`;
    `device` 'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:N' or 'mps'; `precision` 'fp32' or, on
    CUDA, 'bf16' (autocast)."""
    # Bad settings stop before any work.
    resolved = (resolve(config, settings) if isinstance(settings, dict)
                else resolve(config, assignments=settings or ()))
    as_path = lambda p: None if p is None else Path(p)  # noqa: E731
    source = data_source(as_path(data), category, as_path(normal_dir), as_path(abnormal_dir), as_path(mask_dir),
                         as_path(normal_test_dir))
    return fit_run(resolved, source, Path(out), overwrite, log=log, progress=progress, device=device,
                   precision=precision)


def resume(run: str | Path, progress: bool = False, log=None, device: str = "auto", precision: str = "fp32") -> Run:
    """Continue an interrupted fit from its last checkpoint, as `hdm fit --resume`, on any device."""
    return resume_run(Path(run), log=log, progress=progress, device=device, precision=precision)


def test(run: str | Path, data: str | Path | None = None, category: str | None = None, report: bool = True,
         progress: bool = False, device: str = "auto", precision: str = "fp32") -> Metrics:
    """As `hdm test`: the run's own test data by default; writes metrics.json (and report.html) into the run."""
    source = data_source(Path(data), category) if data is not None else None
    return Metrics.from_dict(test_run(Path(run), source, progress=progress, report=report, device=device,
                                      precision=precision).metrics)


def fit_generator(run: str | Path, data: str | Path | None = None, category: str | None = None, *,
                  normal_dir: str | Path | None = None, config: HDMConfig | str | Path | None = None,
                  settings: dict[str, Any] | Iterable[str] | None = None, overwrite: bool = False,
                  progress: bool = False, log=None, device: str = "auto") -> None:
    """As `hdm fit-generator`: train DAGM's pixel diffusion model into `run`, on the data given or else
    the data of the model in it; called again after an interruption, it continues."""
    from ._runs import fit_generator_run

    source = (data_source(None if data is None else Path(data), category, None if normal_dir is None else Path(normal_dir))
              if data is not None or normal_dir is not None else None)
    values, assignments = (settings, ()) if isinstance(settings, dict) else (None, settings or ())
    fit_generator_run(Path(run), source, config, values, assignments, overwrite, log=log, progress=progress,
                      device=device)


def generate(run: str | Path, count: int, out: str | Path, *, images: str | Path | None = None,
             masks: str | Path | None = None, tau: float | None = None, seed: int = 0, with_normals: bool = False,
             overwrite: bool = False, progress: bool = False, device: str = "auto") -> list["Defect"]:
    """As `hdm generate`: `count` defect images with exact masks written to `out` (MVTec AD layout,
    generated.csv, contact_sheet.png) and returned as `Defect`s (image, mask, source index, tau, change)."""
    from ._generate import generate_run

    as_path = lambda p: None if p is None else Path(p)  # noqa: E731
    return generate_run(Path(run), Path(out), count, as_path(images), as_path(masks), tau, seed, with_normals,
                        overwrite, device, progress)[0]


def load(path: str | Path, device: str = "auto", precision: str = "fp32") -> Detector:
    """A run folder (or its model.pt) on `device` in `precision`, or an exported .onnx file (run by
    onnxruntime on the CPU) -> a calibrated `Detector`."""
    return Detector(load_detector(Path(path), device, precision), Path(path))
