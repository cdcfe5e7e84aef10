"""End-to-end on the real data in ../shared/datasets at reduced size (skipped where it is absent).

Reduced: 25 normal images, batches of 8 and a short schedule, so that this stays around a minute
on two CPU cores. The full-size figures come from bench/accuracy.py, not from here.
"""

import pytest

from conftest import real_dataset
from hdm._anchor import NearestNeighbourAnchor
from hdm._config import HDMConfig
from hdm._data import load_images_resized
from hdm._layouts import DataSource
from hdm._inference import calibrate, evaluate
from hdm._space import FeatureSpace
from hdm._train import fit

pytestmark = pytest.mark.e2e


def small_config() -> HDMConfig:
    config = HDMConfig()
    config.train.steps = 150
    config.train.batch_size = 8
    config.dagm.appearance_per_image = 1
    return config


def test_hdm_learns_metal_plate_defects_from_normal_images_only():
    root = real_dataset("mpdd", "metal_plate")
    source = DataSource("mvtec", root, "metal_plate")
    normal = [s.path for s in source.train_samples()]
    train, holdout = normal[:25], normal[25:]  # calibration sees only normal images never trained on
    model, history = fit(small_config(), train, progress=False, log=lambda m: None)
    calibrate(model, holdout, target_fpr=0.01, progress=False)
    thresholds = (float(model.calibration.image_threshold), float(model.calibration.pixel_threshold))
    evaluation = evaluate(model, source.test_samples(), progress=False, thresholds=thresholds)
    metrics = evaluation.metrics
    assert len(evaluation.predictions) == 98
    assert metrics["image_auroc"] > 0.85  # measured 0.93 at this reduced setting
    assert metrics["pixel_auroc"] > 0.8  # measured 0.86
    assert history.summary()["loss_simple"] < 1.0  # the denoiser learned something about z
    # The threshold chosen from normal images alone catches most defective plates.
    assert metrics["image_recall_at_threshold"] > 0.5, metrics


def test_anchor_on_bottle_matches_its_reference_behaviour():
    root = real_dataset("mvtec_ad", "bottle")
    config = small_config()
    anchor = NearestNeighbourAnchor(FeatureSpace(config.space)).eval()
    source = DataSource("mvtec", root, "bottle")
    anchor.fit(load_images_resized([s.path for s in source.train_samples()[:40]], 256))
    metrics = evaluate(anchor, source.test_samples(), progress=False).metrics
    assert metrics["image_auroc"] > 0.95
    assert metrics["pixel_auroc"] > 0.95


def test_onnx_parity_on_real_test_images(tmp_path):
    import torch

    from hdm._data import list_images
    from hdm._export import OnnxDetector, export_onnx
    from hdm._model import HDM, to_model_input

    root = real_dataset("mvtec_ad", "bottle")
    model = HDM(HDMConfig()).eval()  # default 256^2; parity does not depend on training
    calibrate(model, list_images(root / "bottle" / "train" / "good")[:8], target_fpr=0.01, progress=False)
    export_onnx(model, tmp_path / "m.onnx")
    paths = [p for folder in ("good", "broken_large", "contamination") for p in list_images(root / "bottle" / "test" / folder)[:2]]
    images = to_model_input(load_images_resized(paths, 256))
    with torch.no_grad():
        expected = model.detect(images)
    detector = OnnxDetector(tmp_path / "m.onnx")
    maps, scores, probabilities, decisions = detector.detect(images)
    assert (expected[0] - maps).abs().max().item() <= 1e-4
    assert (expected[1] - scores).abs().max().item() <= 1e-4
    assert (expected[2] - probabilities).abs().max().item() <= 1e-4
    assert torch.equal(expected[3], decisions)
    assert detector.pixel_threshold == model.pixel_threshold
