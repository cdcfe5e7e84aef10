"""Batched inference over samples, with decoding overlapped and memory bounded by the batch."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .data import HDMInputError, Sample, iter_batches, load_mask, resize_mask
from .metrics import compute_metrics
from .model import HDM, to_model_input


@dataclass
class Prediction:
    sample: Sample
    map: np.ndarray  # S x S float32 at model size
    score: float
    shape: tuple[int, int]  # the image's own (H, W)
    error: str | None = None
    image: np.ndarray | None = None  # the decoded original, when asked for


def predict_samples(model: HDM, samples: list[Sample], batch_size: int = 16, progress: bool = True,
                    desc: str = "predict", keep_images: bool = False) -> Iterator[Prediction]:
    """`model` is an `HDM` in eval mode, or anything with its contract (`image_size`, images -> maps, scores)."""
    with torch.inference_mode(), tqdm(total=len(samples), desc=desc, disable=not progress, leave=False) as bar:
        for batch in iter_batches(samples, model.image_size, batch_size, keep_originals=keep_images):
            maps, scores = model(to_model_input(batch.images))
            for i, sample in enumerate(batch.samples):
                yield Prediction(sample, maps[i, 0].numpy(), float(scores[i]), batch.shapes[i], batch.errors[i],
                                 batch.originals[i])
            bar.update(len(batch.samples))


def evaluate(model: HDM, samples: list[Sample], batch_size: int = 16, progress: bool = True) -> tuple[dict[str, float], list[Prediction]]:
    """Metrics on a labelled test set, at model size against nearest-resized masks."""
    size = model.image_size
    predictions, maps, masks = [], [], []
    for prediction in predict_samples(model, samples, batch_size, progress, desc="test"):
        if prediction.error:
            raise HDMInputError(prediction.error)
        sample = prediction.sample
        mask = (load_mask(sample.mask_path, prediction.shape, sample.mask_nonzero) if sample.mask_path
                else np.zeros(prediction.shape, bool))
        masks.append(resize_mask(mask, size))
        maps.append(prediction.map)
        predictions.append(prediction)
    labels = np.array([p.sample.label for p in predictions])
    scores = np.array([p.score for p in predictions])
    return compute_metrics(labels, scores, np.stack(masks), np.stack(maps)), predictions
