"""Batched inference, evaluation and calibration, with decoding overlapped and memory bounded by the batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._data import HDMInputError, Sample, iter_batches, sample_mask
from ._device import device_of
from ._distributed import Ranks
from ._metrics import compute_metrics, threshold_metrics
from ._model import HDM, to_model_input
from ._progress import bar as progress_bar


@dataclass
class Prediction:
    sample: Sample
    map: np.ndarray  # S x S float32 at model size
    score: float
    shape: tuple[int, int]  # the image's own (H, W)
    error: str | None = None
    image: np.ndarray | None = None  # the decoded image, when asked for
    probability: float | None = None  # calibrated outputs, when asked for
    decision: bool | None = None


def predict_samples(model: HDM, samples: list[Sample], batch_size: int = 16, progress: bool = True,
                    desc: str = "predict", keep_images: bool = False, calibrated: bool = False) -> Iterator[Prediction]:
    """`model` is an `HDM` in eval mode, or anything with its contract: `image_size`, images -> (maps,
    scores) and, with `calibrated`, `detect`: images -> (maps, scores, probabilities, decisions). It
    computes on the model's device."""
    device = device_of(model)
    with torch.inference_mode(), progress_bar(total=len(samples), desc=desc, enabled=progress) as bar:
        for batch in iter_batches(samples, model.image_size, batch_size, keep_originals=keep_images):
            x = to_model_input(batch.images).to(device)
            if calibrated:
                maps, scores, probabilities, decisions = (t.cpu() for t in model.detect(x))
            else:
                (maps, scores), probabilities, decisions = (t.cpu() for t in model(x)), None, None
            for i, sample in enumerate(batch.samples):
                yield Prediction(sample, maps[i, 0].numpy(), float(scores[i]), batch.shapes[i], batch.errors[i],
                                 batch.originals[i],
                                 None if probabilities is None else float(probabilities[i]),
                                 None if decisions is None else bool(decisions[i]))
            bar.update(len(batch.samples))


@dataclass
class Evaluation:
    metrics: dict[str, float]
    predictions: list[Prediction]
    labels: np.ndarray  # N
    scores: np.ndarray  # N
    masks: np.ndarray  # N x S x S bool, at model size
    maps: np.ndarray  # N x S x S float32


def evaluate(model: HDM, samples: list[Sample], batch_size: int = 16, progress: bool = True,
             thresholds: tuple[float, float] | None = None) -> Evaluation:
    """Metrics on a labelled test set, at model size against nearest-resized masks; with
    (image, pixel) `thresholds`, also the recall and false-alarm rates of the decisions."""
    size = model.image_size
    predictions, maps, masks = [], [], []
    for prediction in predict_samples(model, samples, batch_size, progress, desc="test"):
        if prediction.error:
            raise HDMInputError(prediction.error)
        masks.append(sample_mask(prediction.sample, prediction.shape, size))
        maps.append(prediction.map)
        predictions.append(prediction)
    labels = np.array([p.sample.label for p in predictions])
    scores = np.array([p.score for p in predictions])
    masks_array, maps_array = np.stack(masks), np.stack(maps)
    metrics = compute_metrics(labels, scores, masks_array, maps_array)
    if thresholds is not None:
        metrics |= threshold_metrics(labels, scores, masks_array, maps_array, *thresholds)
    return Evaluation(metrics, predictions, labels, scores, masks_array, maps_array)


def calibrate(model: HDM, paths: list[Path], target_fpr: float, batch_size: int = 16, progress: bool = True) -> None:
    """POM's calibration on held-out normal images, in one pass over them: how DDM's head and the density
    prior behave on normal cells, which sets how they are fused, then the score-to-probability mapping
    and thresholds of the fused map. Under torch.distributed each rank scores its shard of `paths` and
    every rank calibrates on all of them."""
    ranks = Ranks.current()
    ranks.need(len(paths), "held-out images", "raise --holdout or use fewer workers")
    voices, device = [], device_of(model)
    mine = ranks.shard(paths)
    with torch.inference_mode(), progress_bar(total=len(mine), desc="calibrate", enabled=progress) as bar:
        for batch in iter_batches([Sample(p, 0) for p in mine], model.image_size, batch_size):
            if any(batch.errors):
                raise HDMInputError(next(e for e in batch.errors if e))
            voices.append(model.voices(to_model_input(batch.images).to(device)))
            bar.update(len(batch.samples))
        logits = ranks.gather_rows(torch.cat([logits for logits, _ in voices]))
        prior = None if model.density is None else ranks.gather_rows(torch.cat([prior for _, prior in voices]))
        if model.density is not None:
            model.density.fit_null(logits, prior)
        chunks = logits.split(batch_size)
        priors = (None,) * len(chunks) if prior is None else prior.split(batch_size)
        finished = [model.finish(chunk, part) for chunk, part in zip(chunks, priors)]
    scores = torch.cat([s for _, s in finished]).cpu().numpy()
    maxima = torch.cat([maps.flatten(1).amax(1) for maps, _ in finished]).cpu().numpy()
    model.calibration.fit(scores, maxima, target_fpr)
